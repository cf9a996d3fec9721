"""Operations on a route besides moving: install, status, rewind, reset, unregister.

Each returns what it did as one line (or a dict for status) and raises a
QmoverError with the cause and the fix when it cannot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from psycopg2 import sql

from qmover.config.route import Route, by_database, database_of
from qmover.errors import QmoverError
from qmover.pg.checks import (
    has_schema,
    is_registered,
    not_registered,
    pgq_ext_missing,
    pgq_ext_too_old,
    pgq_missing,
    queue_missing,
    require_pgq_ext,
    require_queue,
)
from qmover.pg.connector import Connector, Loan
from qmover.pg.db import NOT_ALLOWED, QUICK_CONNECT_TIMEOUT, Side, where
from qmover.pg.queries import PGQ_EXT_COMMENT, WAKE_CHANNEL, WAKE_FUNCTION, WAKE_TRIGGER, Admin, Status
from qmover.pg.session import Link
from qmover.protocol import claim, wake


@contextmanager
def _opened(route: Route, *sides: Side) -> Iterator[list[Link]]:
    """New connections to the route's sides, closed after (admin commands run once)."""
    with Loan(Connector(max_idle=0)) as loan:
        yield [loan.link(route, side) for side in sides]


def _script(*parts: str) -> sql.Composed:
    """qmover's SQL files as one script, so one transaction: all of it or nothing; the
    names they share with qmover.pg.queries ({channel}, ...) filled in by the driver."""
    text = "\n".join(resources.files("qmover.pg").joinpath(part).read_text() for part in parts)
    return sql.SQL(text).format(channel=sql.Literal(WAKE_CHANNEL), trigger=sql.Identifier(WAKE_TRIGGER),
                                function=sql.Identifier(*WAKE_FUNCTION))


def _install_wake(route: Route, src: Link) -> bool:
    """The tick wake on the route's source (wake.sql), unless there; whether it was made now."""
    if src.value(Admin.HAS_WAKE):
        return False
    try:
        src.run(_script("schema.sql", "wake.sql"))
    except QmoverError as exc:
        if exc.sqlstate != NOT_ALLOWED:
            raise
        raise QmoverError(
            f"{where(route, 'source')}: the role may not install the tick wake (wake_on_tick = 1): it needs "
            f"TRIGGER on pgq.tick and CREATE on the database (grant trigger on pgq.tick to ROLE; grant create "
            f"on database DBNAME to ROLE), or install as pgq's owner; or set wake_on_tick = 0 to poll",
            "source", exc.sqlstate) from None
    return True


def install(route: Route) -> str:
    """Check pgq and queues on both sides, make the tick wake where the route
    asks for it, create pgq_ext and qmover's claim table where absent,
    register the consumer."""
    with _opened(route, "source", "target") as (src, dst):
        require_queue(src)
        require_queue(dst)
        woken = _install_wake(route, src) if route.wake_on_tick else None
        created = not has_schema(dst, "pgq_ext")
        # qmover's own pgq_ext, new or from an earlier install, gets upstream's
        # rights and upgrade_schema(); anybody else's is left as it is.
        ours = created or dst.value(Admin.PGQ_EXT_MADE_BY_QMOVER, comment=PGQ_EXT_COMMENT)
        parts = (["pgq_ext.sql"] if created else []) + (["pgq_ext_rights.sql"] if ours else [])
        parts += [] if dst.value(Admin.HAS_CLAIMS) else ["schema.sql", "claims.sql"]
        if parts:
            dst.run(_script(*parts))
        require_pgq_ext(dst)
        new = not is_registered(src)
        if new:
            # As skytools' SerialConsumer: a fresh registration starts at the
            # source's current tick, so an old target position is meaningless.
            dst.run(Admin.SET_LAST_TICK, consumer=route.consumer, tick=None)
        try:
            src.run(Admin.REGISTER, queue=route.src_queue, consumer=route.consumer)
        except QmoverError as exc:
            if "No ticks" in str(exc):
                raise QmoverError(
                    f"{where(route, 'source')}: queue {route.src_queue!r} has no tick yet; start "
                    f"the ticker (pgqd) or run select pgq.ticker() once, then install again") from None
            raise
    if route.split is None:
        targets = f"target queue {route.dst_queue!r} ready"
    else:
        known = ", ".join(map(repr, route.target_queues))
        targets = f"target queues named by {route.split.field}" + (f" ({known} ready)" if known else "")
    return (f"route {route.name}: consumer {route.consumer!r} "
            f"{'registered' if new else 'already registered'} on {route.src_queue!r}; "
            f"{targets}; pgq_ext {'created' if created else 'present'}"
            + ("" if woken is None else f"; tick wake {'installed' if woken else 'present'}"))


@dataclass
class _SourceState:
    pgq: bool
    wake: bool | None = None  # the tick wake is there (None: no route there asks for it)
    queues: set[str] = field(default_factory=set)
    consumers: dict[tuple[str, str], tuple] = field(default_factory=dict)  # (queue, consumer) -> info


@dataclass
class _TargetState:
    pgq: bool
    pgq_ext: bool
    tick_api: bool
    claims: bool  # qmover.claim is there
    queues: set[str] = field(default_factory=set)
    ticks: dict[str, int | None] = field(default_factory=dict)  # consumer -> pgq_ext last tick
    held: dict[str, claim.Held] = field(default_factory=dict)  # consumer -> its live claim


def _read_source(group: list[Route], src: Link) -> _SourceState:
    if not has_schema(src, "pgq"):
        return _SourceState(pgq=False)
    state = _SourceState(pgq=True)
    if any(route.wake_on_tick for route in group):
        state.wake = bool(src.value(Admin.HAS_WAKE))
    for queue, consumer, *info in src.rows(Status.SOURCE):
        state.queues.add(queue)
        if consumer is not None:
            state.consumers[(queue, consumer)] = tuple(info)
    return state


def _read_target(group: list[Route], dst: Link) -> _TargetState:
    state = _TargetState(*dst.one(Status.TARGET_SCHEMAS))
    if state.pgq:
        state.queues = {queue for (queue,) in dst.rows(Status.QUEUE_NAMES)}
    if state.pgq_ext and state.tick_api:
        state.ticks = dict(dst.rows(Status.LAST_TICKS, consumers=[route.consumer for route in group]))
    if state.claims:
        state.held = claim.claimed(dst, group).held
    return state


@dataclass
class _Failed:
    """A database that could not be read, as its first route met it."""

    route: Route
    side: Side
    error: QmoverError

    def said_to(self, route: Route) -> str:
        """The same message, naming another route of that database (messages start with where())."""
        return where(route, self.side) + str(self.error).removeprefix(where(self.route, self.side))


def _read_each(routes: list[Route], side: Side, connector: Connector,
               read: Callable[[list[Route], Link], Any]) -> dict[tuple, Any]:
    """read() once per database of the side; a failure is kept as _Failed."""
    found: dict[tuple, Any] = {}
    for group in by_database(routes, side):
        key = database_of(group[0].dsn(side))
        try:
            found[key] = connector.run(group[0], side, functools.partial(read, group))
        except QmoverError as exc:
            found[key] = _Failed(group[0], side, exc)
    return found


def statuses(routes: list[Route], connector: Connector | None = None) -> list[dict[str, Any]]:
    """Per route: source position and lag, target position; problems go in 'error'.

    Each database is asked once, whatever the number of routes on it; one
    that does not answer within QUICK_CONNECT_TIMEOUT marks only its own
    routes.  connector: kept connections (qmover metrics keeps them between
    scrapes); without one, connections are opened and closed here.
    """
    own = connector is None
    connector = connector or Connector(connect_timeout=QUICK_CONNECT_TIMEOUT)
    try:
        sources = _read_each(routes, "source", connector, _read_source)
        targets = _read_each(routes, "target", connector, _read_target)
    finally:
        if own:
            connector.close()
    return [_status(route, sources[database_of(route.src_dsn)], targets[database_of(route.dst_dsn)])
            for route in routes]


def _status(route: Route, source: Any, target: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "route": route.name, "consumer": route.consumer,
        "source": route.src_display, "source_queue": route.src_queue,
        "target": route.dst_display, "target_queue": route.dst_queue,
        "lag_seconds": None, "last_seen_seconds": None, "pending_events": None,
        "source_last_tick": None, "current_batch": None, "target_last_tick": None,
        "held_by": None, "held_seconds": None, "held_too_long": None,
        "tick_wake": None, "wake_missing": None,
        "error": _source_problem(route, source) or _target_problem(route, target),
    }
    if route.wake_on_tick and isinstance(source, _SourceState) and source.wake is not None:
        info.update(tick_wake=source.wake, wake_missing=None if source.wake else wake.missing([route]))
    if isinstance(source, _SourceState) and (route.src_queue, route.consumer) in source.consumers:
        lag, seen, last_tick, batch, pending = source.consumers[(route.src_queue, route.consumer)]
        info.update(lag_seconds=lag, last_seen_seconds=seen, pending_events=pending,
                    source_last_tick=last_tick, current_batch=batch)
    if info["error"] is None:
        info["target_last_tick"] = target.ticks.get(route.consumer)
        held = target.held.get(route.consumer)
        if held is not None:
            info.update(held_by=held.holder, held_seconds=held.seconds,
                        held_too_long=held.said(route) if held.overdue(route) else None)
    return info


def _source_problem(route: Route, source: Any) -> str | None:
    if isinstance(source, _Failed):
        return source.said_to(route)
    if not source.pgq:
        return str(pgq_missing(route, "source"))
    if route.src_queue not in source.queues:
        return str(queue_missing(route, "source", route.src_queue))
    if (route.src_queue, route.consumer) not in source.consumers:
        return str(not_registered(route))
    return None


def _target_problem(route: Route, target: Any) -> str | None:
    if isinstance(target, _Failed):
        return target.said_to(route)
    if not target.pgq:
        return str(pgq_missing(route, "target"))
    for queue in route.target_queues:
        if queue not in target.queues:
            return str(queue_missing(route, "target", queue))
    if not target.pgq_ext:
        return str(pgq_ext_missing(route))
    if not target.tick_api:
        return str(pgq_ext_too_old(route))
    if not target.claims:
        return str(claim.not_installed(route))
    return None


def rewind(route: Route) -> str:
    """skytools --rewind: move the source consumer back to the target's tick."""
    with _opened(route, "target") as (dst,):
        require_pgq_ext(dst)
        tick = dst.value(Admin.GET_LAST_TICK, consumer=route.consumer)
    if tick is None:
        raise QmoverError(
            f"{where(route, 'target')}: no position recorded for consumer {route.consumer!r}, "
            f"so there is nothing to rewind to; the next batch will be applied as it comes")
    with _opened(route, "source") as (src,):
        require_queue(src)
        try:
            src.run(Admin.REGISTER_AT, queue=route.src_queue, consumer=route.consumer, tick=tick)
        except QmoverError as exc:
            if "tick not found" in str(exc):
                raise QmoverError(
                    f"{where(route, 'source')}: tick {tick} is no longer kept on queue "
                    f"{route.src_queue!r}; use 'qmover reset' to drop the target position and "
                    f"continue from the source's current position") from None
            raise
    return f"route {route.name}: source consumer {route.consumer!r} moved to tick {tick}"


def reset(route: Route) -> str:
    """skytools --reset: forget the target's position; the next batch applies as it comes."""
    with _opened(route, "target") as (dst,):
        require_pgq_ext(dst)
        dst.run(Admin.SET_LAST_TICK, consumer=route.consumer, tick=None)
    return f"route {route.name}: target position of consumer {route.consumer!r} cleared"


def unregister(route: Route) -> str:
    """Unregister the source consumer and clear its target position; with the
    database's last consumer, drop the tick wake too."""
    with _opened(route, "source") as (src,):
        require_queue(src)
        unwoken = (src.value(Admin.HAS_WAKE)
                   and not src.value(Admin.OTHER_CONSUMERS, queue=route.src_queue, consumer=route.consumer))
        if unwoken:
            _drop_wake(route, src)
        count = src.value(Admin.UNREGISTER, queue=route.src_queue, consumer=route.consumer)
    with _opened(route, "target") as (dst,):
        if has_schema(dst, "pgq_ext"):
            dst.run(Admin.SET_LAST_TICK, consumer=route.consumer, tick=None)
    state = "unregistered" if count else "was not registered"
    return (f"route {route.name}: consumer {route.consumer!r} {state} on {route.src_queue!r}; target position cleared"
            + ("; tick wake removed (the database's last consumer)" if unwoken else ""))


def _drop_wake(route: Route, src: Link) -> None:
    try:
        src.run(Admin.DROP_WAKE)
    except QmoverError as exc:
        if exc.sqlstate != NOT_ALLOWED:
            raise
        raise QmoverError(
            f"{where(route, 'source')}: consumer {route.consumer!r} is the database's last, and the role may "
            f"not drop the tick wake that goes with it: only pgq.tick's owner may (the role that created "
            f"extension pgq); run qmover unregister as that role", "source", exc.sqlstate) from None
