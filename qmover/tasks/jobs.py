"""The tasks: move a route's ready batches; tick a database that has no pgqd.

Arguments are route names only, never a DSN.  Each worker process keeps a
route's connections from task to task.  Connection errors retry with
backoff; config and position errors fail at once, as one logged line.
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery, Task, shared_task
from celery.signals import worker_ready

from qmover import metrics, ticker
from qmover.config import Config, load_config
from qmover.errors import QmoverError, TransientError
from qmover.mover import RouteMover
from qmover.route import Route
from qmover.tasks.schedule import MOVE_TASK, TICK_TASK, config_path_from_env

log = logging.getLogger("qmover")
MAX_RETRIES = 5
METRICS_PORT_ENV = "QMOVER_METRICS_PORT"


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
def counters_at(url: str) -> metrics.Counters:
    """One Redis client per worker process for the route counters."""
    return metrics.Counters(url)


@worker_ready.connect
def serve_metrics(sender: Any, **_kwargs: Any) -> None:
    """With QMOVER_METRICS_PORT set, the worker serves /metrics for its config's routes."""
    port = os.environ.get(METRICS_PORT_ENV)
    if not port:
        return
    config = config_for(sender.app)
    server = metrics.serve(list(config.routes.values()), counters_at(config.metrics_url), int(port),
                           os.environ.get("QMOVER_METRICS_ADDRESS", "127.0.0.1"))
    log.info("metrics at http://%s:%d/metrics", *server.server_address[:2])


_movers: dict[str, RouteMover] = {}


def mover_for(route: Route) -> RouteMover:
    """This worker process's mover for the route: connections and checks are
    kept from task to task (a changed route gets a new mover)."""
    mover = _movers.get(route.name)
    if mover is None or mover.route != route:
        if mover is not None:
            mover.close()
        mover = _movers[route.name] = RouteMover(route)
    return mover


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


def _retry_or_fail(task: Task, exc: QmoverError) -> None:
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
        route = route_for(self, route_name)
        mover = mover_for(route)
        try:
            if not mover.claim():
                result["busy"] = True
            else:
                _move_while_ready(mover, result, started)
                mover.release()
        except BaseException:
            mover.close()  # a failed or interrupted task leaves no connection half-way
            raise
    except QmoverError as exc:
        if route is not None:
            _count(self, route, result, errors=1)
        _retry_or_fail(self, exc)
    if not result["busy"]:
        _count(self, route, result)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


@shared_task(bind=True, name=TICK_TASK, throws=(QmoverError,))
def tick_database(self: Task, route_name: str, side: str) -> dict[str, Any]:
    """pgq.ticker() and due maintenance on one side of a route (instead of pgqd)."""
    try:
        ticked = ticker.tick(route_for(self, route_name), side)  # type: ignore[arg-type]
    except QmoverError as exc:
        _retry_or_fail(self, exc)
    return {"route": route_name, "side": side, "queues_ticked": ticked.queues,
            "maintenance_steps": ticked.maintenance_steps}
