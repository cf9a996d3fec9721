"""Celery settings and the beat schedule, built from the routes of a config file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery

from qmover.config import Config, load_config
from qmover.errors import ConfigError

CONFIG_ENV = "QMOVER_CONFIG"
MOVE_TASK = "qmover.move_next_batch"
TICK_TASK = "qmover.tick_database"


def config_path_from_env() -> Path:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set; point it at the qmover config file "
                          f"(e.g. {CONFIG_ENV}=/etc/qmover/routes.ini)")
    return Path(path)


def beat_schedule(config: Config) -> dict[str, dict[str, Any]]:
    """One move entry per route, plus ticker entries where a route asks for them.

    Each task expires after one interval: a stalled worker lets beat queue
    at most one pending task per entry, not a backlog.
    """
    schedule: dict[str, dict[str, Any]] = {}
    for route in config.routes.values():
        schedule[f"qmover move {route.name}"] = {
            "task": MOVE_TASK, "schedule": route.move_interval, "args": (route.name,),
            "options": {"expires": route.move_interval}}
        for side in route.ticker:
            schedule[f"qmover tick {route.name} {side}"] = {
                "task": TICK_TASK, "schedule": route.ticker_interval, "args": (route.name, side),
                "options": {"expires": route.ticker_interval}}
    return schedule


def celery_settings(config: Config) -> dict[str, Any]:
    """Settings for qmover's own app: at-least-once delivery, idempotent tasks."""
    return {
        "broker_url": config.broker_url,
        "result_backend": config.result_backend,
        "qmover_config": str(config.path),
        "beat_schedule": beat_schedule(config),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 3600,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": 600},
        "worker_send_task_events": True,  # Flower's task list
        "task_send_sent_event": True,
        "timezone": "UTC",
    }


def attach(app: Celery, config_path: str | os.PathLike[str]) -> None:
    """Add qmover's tasks and its routes' beat entries to an existing Celery app."""
    config = load_config(config_path)
    import qmover.tasks.jobs  # noqa: F401  (registers the shared tasks)

    app.conf.qmover_config = str(config.path)
    app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), **beat_schedule(config)}
