"""Celery settings for qmover's own app (`celery -A qmover.tasks worker|beat`).

Routes, broker and result backend come from the config file named by
QMOVER_CONFIG; add or override Celery settings below as in any project.
"""

from qmover.config import load_config
from qmover.tasks.names import config_path_from_env
from qmover.tasks.schedule import celery_settings

globals().update(celery_settings(load_config(config_path_from_env())))
