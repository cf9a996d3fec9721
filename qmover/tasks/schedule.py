"""Celery settings and the beat schedule, built from the routes of a config file."""

from __future__ import annotations

from typing import Any

from celery.beat import PersistentScheduler

from qmover.config import Config, is_redis_url
from qmover.config.route import database_of
from qmover.protocol.readiness import slices
from qmover.tasks.names import SWEEP_TASK, TICK_TASK


def beat_schedule(config: Config) -> dict[str, dict[str, Any]]:
    """Readiness sweeps per move_interval in use, and a tick per database
    that a route asks beat to tick (named after its first route there).

    An interval's sweeps run each a slice of its source databases, slices
    times an interval (qmover.protocol.readiness).  Ticks expire after one interval: a
    stalled worker lets beat queue at most one pending tick per entry, not a
    backlog (move tasks do not expire: sweeps send each route one at a time).
    """
    options = {"queue": config.celery_queue}
    schedule: dict[str, dict[str, Any]] = {}
    for interval in sorted({route.move_interval for route in config.routes.values()}):
        routes = [route for route in config.routes.values() if route.move_interval == interval]
        period = interval / slices(routes, interval)
        schedule[f"qmover sweep every {interval:g}s"] = {
            "task": SWEEP_TASK, "schedule": period, "args": (interval,),
            "options": {**options, "expires": period}}
    ticked: dict[tuple, dict[str, Any]] = {}
    for route in config.routes.values():
        for side in route.ticker:
            entry = ticked.setdefault((side, database_of(route.dsn(side))), {
                "name": f"qmover tick {side} {route.display(side)}",
                "task": TICK_TASK, "schedule": route.ticker_interval, "args": (route.name, side)})
            entry["schedule"] = min(entry["schedule"], route.ticker_interval)
    for entry in ticked.values():
        schedule[entry.pop("name")] = {**entry, "options": {**options, "expires": entry["schedule"]}}
    return schedule


class SteadyScheduler(PersistentScheduler):
    """Celery's default scheduler, without its spin before each due entry.

    Celery wakes beat 10 ms before an entry is due and, while the entry says
    it is not due yet, asks again without sleeping: about 130 times each
    time an entry is due.  Here beat sleeps the little that is left instead.
    qmover's app starts beat with it; -S (celery-redbeat, which does not
    spin) takes its place.
    """

    def adjust(self, n: float, drift: float = -0.010) -> float:
        return n


def task_routes(config: Config) -> dict[str, dict[str, str]]:
    return {"qmover.*": {"queue": config.celery_queue}}


def celery_settings(config: Config) -> dict[str, Any]:
    """Settings for qmover's own app: at-least-once delivery, idempotent tasks."""
    return {
        "broker_url": config.broker_url,
        "result_backend": config.result_backend,
        "qmover_config": str(config.path),
        "beat_schedule": beat_schedule(config),
        "beat_scheduler": f"{SteadyScheduler.__module__}:{SteadyScheduler.__name__}",
        "task_default_queue": config.celery_queue,  # so a plain `celery -A qmover.tasks worker` consumes it
        "task_routes": task_routes(config),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 3600,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": 600},
        # Flower turns task events on while it runs (its --enable_events, on by
        # default); a worker sending them unasked spent a third of its main
        # process's CPU on them under a steady fan-in.
        "worker_send_task_events": False,
        "timezone": "UTC",
        # Where celery-redbeat keeps the schedule and its lock, for a beat run with
        # -S redbeat.RedBeatScheduler (other schedulers do not read it): the broker
        # when it is a Redis, else the counters' Redis (none: set one, metrics_url).
        "redbeat_redis_url": config.broker_url if is_redis_url(config.broker_url) else config.metrics_url,
    }
