"""qmover's own Celery app (configured by the celeryconfig module), and
attach(), which gives a shop's existing app the same tasks and beat entries."""

from __future__ import annotations

import os

from celery import Celery

from qmover.config import load_config
from qmover.tasks import jobs  # noqa: F401  (registers the shared tasks)
from qmover.tasks.schedule import beat_schedule, task_routes

# Not the current app: importing qmover.tasks into another Celery project
# must not take over that project's app.
app = Celery("qmover", set_as_current=False)
app.config_from_object("celeryconfig")


def attach(app: Celery, config_path: str | os.PathLike[str]) -> None:
    """Add qmover's tasks and beat entries to an existing Celery app; its
    tasks go to their own queue (celery_queue), for `-Q qmover` workers."""
    config = load_config(config_path)
    app.conf.qmover_config = str(config.path)
    app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), **beat_schedule(config)}
    theirs = app.conf.task_routes
    theirs = list(theirs) if isinstance(theirs, (list, tuple)) else [theirs] if theirs else []
    app.conf.task_routes = [task_routes(config), *theirs]
