"""The tasks: sweep for ready routes; move the ready batches of a few routes; tick a database that has no pgqd.

Arguments are route names only, never a DSN.  Each worker process keeps its
connections from task to task, per database (qmover.tasks.process), and
lends them to one task at a time, so every Celery pool (prefork, threads,
solo, gevent) is safe.  Connection errors retry with backoff; config and
position errors fail at once, as one logged line.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, NoReturn

from celery import Celery, Task, shared_task
from celery.signals import beat_init, worker_init, worker_ready

from qmover.config import Config
from qmover.config.route import Route
from qmover.errors import QmoverError, TransientError
from qmover.ops import metrics, ticker
from qmover.pg.checks import require_blocking_driver
from qmover.protocol import preflight
from qmover.protocol.mover import Outcome
from qmover.protocol.readiness import chunks
from qmover.tasks import process
from qmover.tasks.names import CONFIG_ENV, MOVE_TASK, SWEEP_TASK, TICK_TASK, config_path_from_env

log = logging.getLogger(__name__)
MAX_RETRIES = 5
METRICS_PORT_ENV = "QMOVER_METRICS_PORT"


def config_for(app: Celery) -> Config:
    """The app's config file (re-read when the file changes)."""
    configured = app.conf.get("qmover_config")
    return process.current().config(Path(configured) if configured else config_path_from_env())


def route_for(task: Task, name: str) -> Route:
    return config_for(task.app).select([name])[0]


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
        preflight.check_at_start(config_for(sender.app).routes.values())
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
    server = metrics.serve(list(config.routes.values()), metrics.Counters(config.metrics_url), int(port),
                           os.environ.get("QMOVER_METRICS_ADDRESS", "127.0.0.1"))
    log.info("metrics at http://%s:%d/metrics", *server.server_address[:2])


def _retry_or_fail(task: Task, exc: QmoverError) -> NoReturn:
    if isinstance(exc, TransientError) and task.request.retries < MAX_RETRIES:
        log.warning("%s; retry %d of %d", exc, task.request.retries + 1, MAX_RETRIES)
        raise task.retry(exc=exc, countdown=min(60, 2 ** task.request.retries))
    log.error("%s", exc)
    raise exc


def result(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    """A move task's result: small, since Celery cuts what it logs and Flower
    shows past 1 KB; per route only what moved."""
    return {"moved": {o.route.name: o.events for o in outcomes if o.batches},
            "busy": [o.route.name for o in outcomes if o.busy],
            **{field: sum(getattr(o, field) for o in outcomes)
               for field in ("batches", "events", "filtered", "skipped")},
            "seconds": round(seconds, 3)}


@shared_task(bind=True, name=MOVE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             throws=(QmoverError,))
def move_next_batch(self: Task, *route_names: str) -> dict[str, Any]:
    """Move the routes' ready batches, one batch of each in turn, for up to move_budget seconds.

    Safe to run anywhere, any number of times: a route another mover holds
    is left to it (listed as busy), and the move protocol applies each batch
    exactly once whatever happens.  One route's failure is its own: it is
    logged, and only its connection errors are retried (the task with just
    those routes); an error that needs an operator fails the task after the
    other routes have moved.
    """
    started = time.monotonic()
    try:
        if not route_names:
            raise QmoverError("move_next_batch needs the names of the routes to move")
        config = config_for(self.app)
        routes = config.select(list(route_names))
    except QmoverError as exc:
        _retry_or_fail(self, exc)
    state = process.current()
    outcomes = state.mover.move(routes, min(route.move_budget for route in routes))
    state.counters(config.metrics_url).record(outcomes)
    failed = [o.error for o in outcomes if o.error is not None]
    retry = [o.route.name for o in outcomes if isinstance(o.error, TransientError)]
    retrying = bool(retry) and self.request.retries < MAX_RETRIES
    for error in failed:
        if retrying and isinstance(error, TransientError):
            log.warning("%s; retry %d of %d", error, self.request.retries + 1, MAX_RETRIES)
        else:
            log.error("%s", error)
    if retrying:
        first = next(error for error in failed if isinstance(error, TransientError))
        raise self.retry(args=retry, exc=first, countdown=min(60, 2 ** self.request.retries))
    if failed:
        raise failed[0]
    return result(outcomes, time.monotonic() - started)


@beat_init.connect
def _beat_starts(**_kwargs: Any) -> None:
    process.current().in_beat = True


class RunsInBeat(Task):
    """A task that beat runs in its own process instead of sending it.

    Beat is the one process of a deployment that schedules: sweeping there
    keeps one connection per database for the whole deployment, where a
    sweep in every worker process would keep one per database per process.
    Beat's process is known by the beat_init signal, which every Celery
    release sends (a header beat adds to what it sends exists only from 5.7).
    Sent by anyone else, it runs on a worker like any task.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if process.current().in_beat:
            return self.apply(args, kwargs, throw=True)  # a bug shows in beat's log
        return super().apply_async(args, kwargs, **options)


@shared_task(bind=True, base=RunsInBeat, name=SWEEP_TASK, ignore_result=True)
def sweep(self: Task, interval: float) -> dict[str, Any]:
    """Send move tasks for the routes of this move_interval, in its next slice
    of source databases, that have a batch ready and no mover or task waiting:
    the most behind first, routes_per_task routes to a task.  Until the next
    few sweeps, the same for the databases whose ticks wake beat (wake_on_tick)."""
    try:
        config = config_for(self.app)
    except QmoverError as exc:
        log.error("%s", exc)
        return {"routes": 0, "sent": []}
    move = self.app.tasks[MOVE_TASK]

    def send(ready: list[Route]) -> None:
        for chunk in chunks(ready, config.routes_per_task):
            move.apply_async(tuple(route.name for route in chunk), queue=config.celery_queue)

    routes = [route for route in config.routes.values() if route.move_interval == interval]
    swept = process.current().sweeper.sweep(routes, interval, send)
    return {"slice": f"{swept.slice + 1}/{swept.slices}", "routes": swept.routes,
            "sent": [route.name for route in swept.ready]}


@shared_task(bind=True, name=TICK_TASK, ignore_result=True, throws=(QmoverError,))
def tick_database(self: Task, route_name: str, side: str) -> dict[str, Any]:
    """pgq.ticker() and due maintenance on one side of a route (instead of pgqd)."""
    try:
        if side not in ("source", "target"):
            raise QmoverError(f"tick_database: side is 'source' or 'target', not {side!r}")
        route = route_for(self, route_name)
        ticked = ticker.tick(route, "source" if side == "source" else "target", process.current().mover.connector)
    except QmoverError as exc:
        _retry_or_fail(self, exc)
    return {"route": route_name, "side": side, "queues_ticked": ticked.queues,
            "maintenance_steps": ticked.maintenance_steps}
