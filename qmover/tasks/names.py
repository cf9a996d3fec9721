"""What qmover's tasks are called, and where their config file is named: shared
by the tasks (jobs), the beat schedule (schedule) and the apps (app)."""

from __future__ import annotations

import os
from pathlib import Path

from qmover.errors import ConfigError

CONFIG_ENV = "QMOVER_CONFIG"
# A file of Celery settings for qmover's own app, on top of those built from the routes (qmover.tasks.app).
SETTINGS_ENV = "QMOVER_CELERY_SETTINGS"
MOVE_TASK = "qmover.move_next_batch"
SWEEP_TASK = "qmover.sweep"
TICK_TASK = "qmover.tick_database"


def config_path_from_env() -> Path:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set; point it at the qmover config file "
                          f"(e.g. {CONFIG_ENV}=/etc/qmover/routes.ini)")
    return Path(path)
