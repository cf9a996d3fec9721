"""The tasks: sweep for ready routes; move a route's ready batches; tick a database that has no pgqd.

Arguments are route names only, never a DSN.  Each worker process keeps its
connections from task to task, per database, and lends them to one task at
a time, so every Celery pool (prefork, threads, solo, gevent) is safe.
Connection errors retry with backoff; config and position errors fail at
once, as one logged line.
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

from celery import Celery, Task, shared_task
from celery.signals import worker_init, worker_ready

from qmover import loops, metrics, ticker
from qmover.checks import require_blocking_driver
from qmover.config import Config, load_config
from qmover.connector import Connector
from qmover.errors import QmoverError, TransientError
from qmover.mover import RouteMover
from qmover.route import Route
from qmover.sweep import Sweeper
from qmover.tasks.schedule import CONFIG_ENV, MOVE_TASK, SWEEP_TASK, TICK_TASK, config_path_from_env

log = logging.getLogger("qmover")
MAX_RETRIES = 5
METRICS_PORT_ENV = "QMOVER_METRICS_PORT"
# This process's connections, lent to one task at a time (see qmover.connector).
connector = Connector()
# The readiness sweep's connections, one per database (used where sweeps run: beat).
sweeper = Sweeper()


@lru_cache(maxsize=4)
def _load(path: Path, _mtime: float) -> Config:
    return load_config(path)


def config_for(app: Celery) -> Config:
    """The app's config file (re-read when the file changes)."""
    configured = app.conf.get("qmover_config")
    path = Path(configured) if configured else config_path_from_env()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0  # load_config reports the missing file
    return _load(path, mtime)


def route_for(task: Task, name: str) -> Route:
    return config_for(task.app).select([name])[0]


@lru_cache(maxsize=2)
def counters_at(url: str | None) -> metrics.Counters:
    """One Redis client per worker process for the route counters (none when they are off)."""
    return metrics.Counters(url)


def _has_config(app: Celery) -> bool:
    """Whether this worker's app carries qmover's routes (its own app, or one attach()ed)."""
    return bool(app.conf.get("qmover_config") or os.environ.get(CONFIG_ENV))


@worker_init.connect
def refuse_what_cannot_work(sender: Any, **_kwargs: Any) -> None:
    """Stop the worker at start, with one line, on a pool where COPY cannot
    run or with routes that feed a queue back into itself."""
    if not _has_config(sender.app):
        return
    pool = getattr(sender.pool_cls, "__module__", str(sender.pool_cls)).rsplit(".", 1)[-1]  # "eventlet", ...
    try:
        try:
            require_blocking_driver()
        except QmoverError as exc:
            raise QmoverError(f"qmover cannot run on the {pool} pool: {exc}") from None
        loops.check_routes(config_for(sender.app).routes.values())
    except QmoverError as exc:
        raise SystemExit(f"qmover: error: {exc}") from None


@worker_ready.connect
def announce_and_serve_metrics(sender: Any, **_kwargs: Any) -> None:
    """Say once when the counters are off; with QMOVER_METRICS_PORT set, serve /metrics."""
    if not _has_config(sender.app):
        return
    config = config_for(sender.app)
    metrics.say_if_off(config.metrics_url)
    port = os.environ.get(METRICS_PORT_ENV)
    if not port:
        return
    server = metrics.serve(list(config.routes.values()), counters_at(config.metrics_url), int(port),
                           os.environ.get("QMOVER_METRICS_ADDRESS", "127.0.0.1"))
    log.info("metrics at http://%s:%d/metrics", *server.server_address[:2])


def _move_while_ready(mover: RouteMover, result: dict[str, Any], started: float) -> None:
    while time.monotonic() - started < mover.route.move_budget:
        moved = mover.move_one()
        if moved is None:
            break
        result["batches"] += 1
        result["events"] += moved.events
        result["filtered"] += moved.filtered
        result["skipped"] += moved.skipped
    result["source_lag"] = mover.source_lag()


def _count(task: Task, route: Route, result: dict[str, Any], errors: int = 0) -> None:
    """Add what a task did to the route's counters (qmover.metrics)."""
    counters_at(config_for(task.app).metrics_url).record(
        route, events=result["events"], filtered=result["filtered"], batches=result["batches"] - result["skipped"],
        skipped=result["skipped"], errors=errors)


def _retry_or_fail(task: Task, exc: QmoverError) -> NoReturn:
    if isinstance(exc, TransientError) and task.request.retries < MAX_RETRIES:
        log.warning("%s; retry %d of %d", exc, task.request.retries + 1, MAX_RETRIES)
        raise task.retry(exc=exc, countdown=min(60, 2 ** task.request.retries))
    log.error("%s", exc)
    raise exc


@shared_task(bind=True, name=MOVE_TASK, acks_late=True, reject_on_worker_lost=True,
             throws=(QmoverError,))
def move_next_batch(self: Task, route_name: str) -> dict[str, Any]:
    """Move the route's ready batches for up to move_budget seconds.

    Safe to run anywhere, any number of times: a mover that finds the route
    claimed by another returns at once, and the move protocol applies each
    batch exactly once whatever happens.
    """
    started = time.monotonic()
    result: dict[str, Any] = {"route": route_name, "batches": 0, "events": 0, "filtered": 0, "skipped": 0,
                              "busy": False, "source_lag": None}
    route = None
    try:
        config = config_for(self.app)
        route = config.select([route_name])[0]
        connector.max_idle = config.max_idle_connections
        with RouteMover(route, connector=connector) as mover:
            if mover.claim():
                _move_while_ready(mover, result, started)
            else:
                result["busy"] = True
    except QmoverError as exc:
        if route is not None:
            _count(self, route, result, errors=1)
        _retry_or_fail(self, exc)
    if not result["busy"]:
        _count(self, route, result)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


class RunsInBeat(Task):
    """A task that beat runs in its own process instead of sending it.

    Beat is the one process of a deployment that schedules: sweeping there
    keeps one connection per database for the whole deployment, where a
    sweep in every worker process would keep one per database per process.
    Sent by anyone else, it runs on a worker like any task.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if options.get("headers", {}).get("celery_beat_task"):  # beat marks what it sends
            return self.apply(args, kwargs, throw=True)  # a bug shows in beat's log
        return super().apply_async(args, kwargs, **options)


@shared_task(bind=True, base=RunsInBeat, name=SWEEP_TASK)
def sweep(self: Task, interval: float) -> dict[str, Any]:
    """Send a move task for each route of this move_interval that has a batch
    ready and no mover; idle routes cost a query per database, no task."""
    try:
        config = config_for(self.app)
    except QmoverError as exc:
        log.error("%s", exc)
        return {"routes": 0, "sent": []}
    routes = [route for route in config.routes.values() if route.move_interval == interval]
    ready = sweeper.ready(routes)
    move = self.app.tasks[MOVE_TASK]
    for route in ready:
        move.apply_async((route.name,), queue=config.celery_queue, expires=route.move_interval)
    return {"routes": len(routes), "sent": [route.name for route in ready]}


@shared_task(bind=True, name=TICK_TASK, throws=(QmoverError,))
def tick_database(self: Task, route_name: str, side: str) -> dict[str, Any]:
    """pgq.ticker() and due maintenance on one side of a route (instead of pgqd)."""
    try:
        ticked = ticker.tick(route_for(self, route_name), side)  # type: ignore[arg-type]
    except QmoverError as exc:
        _retry_or_fail(self, exc)
    return {"route": route_name, "side": side, "queues_ticked": ticked.queues,
            "maintenance_steps": ticked.maintenance_steps}
