"""qmover's own Celery app, configured by the celeryconfig module."""

from celery import Celery

# Not the current app: importing qmover.tasks into another Celery project
# must not take over that project's app.
app = Celery("qmover", set_as_current=False)
app.config_from_object("celeryconfig")
