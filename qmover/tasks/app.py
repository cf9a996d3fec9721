"""qmover's own Celery app, and attach(), which gives a shop's existing app the same tasks and beat entries.

qmover's app never loads settings by a module name: `celeryconfig` in the
current folder is a Celery project's own (Celery's first-steps guide puts
one beside every app), and must not reach it.  Its settings are built from
the routes file (QMOVER_CONFIG); the Celery settings file for qmover's app
(settings_file) goes on top, read by its path.  Nothing of qmover is a
top-level module a shop's app could import in its place.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

from celery import Celery

from qmover.config import load_config
from qmover.errors import ConfigError
from qmover.tasks import jobs  # noqa: F401  (registers the shared tasks)
from qmover.tasks.names import SETTINGS_ENV, config_path_from_env
from qmover.tasks.schedule import beat_schedule, celery_settings, task_routes

# qmover's source folder, in a checkout (or an editable install): its celeryconfig.py is the default file.
SOURCE_FOLDER = Path(__file__).resolve().parents[2]


def settings_file() -> Path | None:
    """The Celery settings file for qmover's own app: the one QMOVER_CELERY_SETTINGS
    names, else celeryconfig.py of qmover's source folder when qmover runs from it."""
    named = os.environ.get(SETTINGS_ENV)
    if named:
        return Path(named)
    beside = SOURCE_FOLDER / "celeryconfig.py"
    return beside if (SOURCE_FOLDER / "pyproject.toml").is_file() and beside.is_file() else None


def settings_in(path: Path) -> dict[str, Any]:
    """The Celery settings a Python file sets (lowercase names, as Celery 5 spells them)."""
    try:
        found = runpy.run_path(str(path), run_name="qmover_celery_settings")
    except FileNotFoundError:
        raise ConfigError(f"{path}: Celery settings file not found; fix or unset {SETTINGS_ENV}") from None
    except Exception as exc:  # the file is the user's: any error in it is theirs to see, in one line
        raise ConfigError(f"{path}: cannot read the Celery settings ({type(exc).__name__}: {exc})") from None
    return {name: value for name, value in found.items()
            if name.islower() and not name.startswith("_") and not isinstance(value, (ModuleType, FunctionType, type))}


def own_settings() -> dict[str, Any]:
    """qmover's app's settings: from the routes file, then the settings file's on top."""
    settings = celery_settings(load_config(config_path_from_env()))
    path = settings_file()
    return {**settings, **(settings_in(path) if path else {})}


# Not the current app: importing qmover.tasks into another Celery project
# must not take over that project's app.  Settings are read at first use.
app = Celery("qmover", set_as_current=False)
app.add_defaults(own_settings)


def attach(app: Celery, config_path: str | os.PathLike[str]) -> None:
    """Add qmover's tasks and beat entries to an existing Celery app; its
    tasks go to their own queue (celery_queue), for `-Q qmover` workers."""
    config = load_config(config_path)
    app.conf.qmover_config = str(config.path)
    app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), **beat_schedule(config)}
    theirs = app.conf.task_routes
    theirs = list(theirs) if isinstance(theirs, (list, tuple)) else [theirs] if theirs else []
    app.conf.task_routes = [task_routes(config), *theirs]
