"""Operations on a route besides moving: install, status, rewind, reset, unregister.

Each returns what it did as one line (or a dict for status) and raises a
QmoverError with the cause and the fix when it cannot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import psycopg2
from psycopg2.extensions import connection

from qmover import db, queries
from qmover.checks import has_schema, require_pgq_ext, require_queue, require_registered
from qmover.db import Side, errors, first_line, scalar, where
from qmover.errors import QmoverError
from qmover.route import Route


@contextmanager
def _opened(route: Route, side: Side) -> Iterator[connection]:
    conn = db.connect(route, side, autocommit=side == "source")
    try:
        yield conn
    finally:
        db.close(conn)


def install(route: Route) -> str:
    """Check pgq and queues on both sides, create pgq_ext if absent, register the consumer."""
    with _opened(route, "source") as src, _opened(route, "target") as dst:
        require_queue(src, route, "source")
        require_queue(dst, route, "target")
        with errors(route, "target"):
            created = not has_schema(dst, "pgq_ext")
            if created:
                with dst.cursor() as cur:
                    cur.execute(resources.files("qmover").joinpath("pgq_ext.sql").read_text())
                dst.commit()
        require_pgq_ext(dst, route)
        dst.rollback()
        with errors(route, "source"):
            new = not scalar(src, queries.IS_REGISTERED, (route.src_queue, route.consumer))
        if new:
            # As skytools' SerialConsumer: a fresh registration starts at the
            # source's current tick, so an old target position is meaningless.
            with errors(route, "target"):
                scalar(dst, queries.SET_LAST_TICK, (route.consumer, None))
                dst.commit()
        try:
            scalar(src, queries.REGISTER, (route.src_queue, route.consumer))
        except psycopg2.Error as exc:
            if "No ticks" in first_line(exc):
                raise QmoverError(
                    f"{where(route, 'source')}: queue {route.src_queue!r} has no tick yet; start "
                    f"the ticker (pgqd) or run select pgq.ticker() once, then install again") from None
            with errors(route, "source"):
                raise
    return (f"route {route.name}: consumer {route.consumer!r} "
            f"{'registered' if new else 'already registered'} on {route.src_queue!r}; "
            f"target queue {route.dst_queue!r} ready; "
            f"pgq_ext {'created' if created else 'present'}")


def status(route: Route) -> dict[str, Any]:
    """Source position and lag, target position; problems go in 'error'."""
    info: dict[str, Any] = {
        "route": route.name, "consumer": route.consumer,
        "source": route.src_display, "source_queue": route.src_queue,
        "target": route.dst_display, "target_queue": route.dst_queue,
        "lag_seconds": None, "last_seen_seconds": None, "pending_events": None,
        "source_last_tick": None, "current_batch": None, "target_last_tick": None,
        "error": None,
    }
    try:
        with _opened(route, "source") as src:
            require_queue(src, route, "source")
            require_registered(src, route)
            with errors(route, "source"), src.cursor() as cur:
                cur.execute(queries.CONSUMER_INFO, (route.src_queue, route.consumer))
                lag, seen, last_tick, batch, _next_tick, pending = cur.fetchone()
            info.update(lag_seconds=lag, last_seen_seconds=seen, pending_events=pending,
                        source_last_tick=last_tick, current_batch=batch)
        with _opened(route, "target") as dst:
            require_queue(dst, route, "target")
            require_pgq_ext(dst, route)
            with errors(route, "target"):
                info["target_last_tick"] = scalar(dst, queries.GET_LAST_TICK, (route.consumer,))
    except QmoverError as exc:
        info["error"] = str(exc)
    return info


def rewind(route: Route) -> str:
    """skytools --rewind: move the source consumer back to the target's tick."""
    with _opened(route, "target") as dst:
        require_pgq_ext(dst, route)
        with errors(route, "target"):
            tick = scalar(dst, queries.GET_LAST_TICK, (route.consumer,))
    if tick is None:
        raise QmoverError(
            f"{where(route, 'target')}: no position recorded for consumer {route.consumer!r}, "
            f"so there is nothing to rewind to; the next batch will be applied as it comes")
    with _opened(route, "source") as src:
        require_queue(src, route, "source")
        try:
            scalar(src, queries.REGISTER_AT, (route.src_queue, route.consumer, tick))
        except psycopg2.Error as exc:
            if "tick not found" in first_line(exc):
                raise QmoverError(
                    f"{where(route, 'source')}: tick {tick} is no longer kept on queue "
                    f"{route.src_queue!r}; use 'qmover reset' to drop the target position and "
                    f"continue from the source's current position") from None
            with errors(route, "source"):
                raise
    return f"route {route.name}: source consumer {route.consumer!r} moved to tick {tick}"


def reset(route: Route) -> str:
    """skytools --reset: forget the target's position; the next batch applies as it comes."""
    with _opened(route, "target") as dst:
        require_pgq_ext(dst, route)
        with errors(route, "target"):
            scalar(dst, queries.SET_LAST_TICK, (route.consumer, None))
            dst.commit()
    return f"route {route.name}: target position of consumer {route.consumer!r} cleared"


def unregister(route: Route) -> str:
    """Unregister the source consumer and clear its target position."""
    with _opened(route, "source") as src:
        require_queue(src, route, "source")
        with errors(route, "source"):
            count = scalar(src, queries.UNREGISTER, (route.src_queue, route.consumer))
    with _opened(route, "target") as dst:
        if has_schema(dst, "pgq_ext"):
            with errors(route, "target"):
                scalar(dst, queries.SET_LAST_TICK, (route.consumer, None))
                dst.commit()
    state = "unregistered" if count else "was not registered"
    return f"route {route.name}: consumer {route.consumer!r} {state} on {route.src_queue!r}; target position cleared"
