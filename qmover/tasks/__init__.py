"""The Celery layer: tasks and a beat schedule over the move protocol; no SQL.

`celery -A qmover.tasks worker|beat` runs qmover's own app (settings from
the routes file QMOVER_CONFIG names, with qmover's celeryconfig.py on top,
see qmover.tasks.app).  An existing Celery app takes the same tasks and beat
entries with attach().
"""

from qmover.tasks.app import app, attach
from qmover.tasks.jobs import move_next_batch, sweep, tick_database
from qmover.tasks.schedule import beat_schedule

__all__ = ["app", "attach", "beat_schedule", "move_next_batch", "sweep", "tick_database"]
