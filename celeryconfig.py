"""Celery settings for qmover's own app (`celery -A qmover.tasks ...`, `qmover worker|beat|flower`).

qmover builds its app's settings from the routes file (QMOVER_CONFIG): broker,
result backend, beat schedule, late acks, prefetch 1, ... (see
qmover.tasks.schedule.celery_settings).  Settings written here go on top of
those, as in any Celery project, for example:

    worker_max_tasks_per_child = 10000
    broker_transport_options = {"visibility_timeout": 1800}

qmover's app reads this file by its path, from qmover's source folder, or
the file QMOVER_CELERY_SETTINGS names (the Docker image sets it to this
one); never as a module named celeryconfig, so a Celery project's own
celeryconfig.py never reaches qmover's app, and this one never reaches a
project's app.
"""
