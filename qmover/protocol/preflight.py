"""What a route must pass before its first batch in a process, and what to
say when a move fails: no loop, PgQ and both queues as the route needs them
(qmover.pg.checks), and which write path the target role allows (COPY into
the event tables, or pgq.insert_event).  And what a whole config must pass
when a worker, `qmover run` or `qmover install` starts (check_at_start)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from qmover.config.route import Route, database_of
from qmover.errors import QmoverError, TransientError, WrongPooler
from qmover.pg.checks import (
    check_route,
    require_blocking_driver,
    require_session_pooling,
    server_identity,
    target_can_copy,
)
from qmover.pg.connector import Connector
from qmover.pg.db import QUICK_CONNECT_TIMEOUT, Side
from qmover.pg.session import Link
from qmover.protocol.cycles import Hop, Server, require_no_loops

log = logging.getLogger(__name__)


class Preflight:
    """The checks a process ran, and their outcome: its one owner.

    A route is checked before its first batch in the process, and again
    after any failure of it (forget()): what a failed move left unsaid (a
    queue dropped, a consumer unregistered) is then found and said.
    """

    def __init__(self) -> None:
        self._passed: dict[Route, bool] = {}  # route -> whether it moves through pgq.insert_event
        self._announced: set[str] = set()  # routes whose insert_event fallback was logged

    def via_insert_event(self, route: Route, src: Link, dst: Link) -> bool:
        """Whether the route must move through pgq.insert_event; raises the first
        thing that keeps it from moving, unless it passed since its last failure."""
        passed = self._passed.get(route)
        if passed is None:
            passed = self._passed[route] = self._check(route, src, dst)
            log.debug("route %s: checks passed; it writes through %s", route.name,
                      "pgq.insert_event" if passed else "COPY into the event tables")
        return passed

    def forget(self, route: Route) -> None:
        """After a failure of the route: its checks run again before its next batch."""
        self._passed.pop(route, None)

    def _check(self, route: Route, src: Link, dst: Link) -> bool:
        require_blocking_driver()
        require_no_loops([Hop(route, server_identity(src), server_identity(dst))])
        check_route(src, dst)
        via_insert_event = route.kind == "queue" and not target_can_copy(dst)
        if via_insert_event and route.keep_event_id:
            raise QmoverError(
                f"route {route.name}: keep_event_id needs the target role to write queue "
                f"{route.dst_queue!r}'s event tables itself (pgq.insert_event cannot keep ids); grant "
                f"it INSERT on the event tables and UPDATE on the event sequence, or set keep_event_id = 0")
        if via_insert_event and route.name not in self._announced:
            self._announced.add(route.name)
            log.warning("route %s: the target role may not COPY into queue %r's event tables; moving "
                        "through pgq.insert_event instead, still exactly once, but slower and with "
                        "ev_time set by the target; grant INSERT on the event tables and USAGE on the "
                        "event sequence to keep it", route.name, route.dst_queue)
        return via_insert_event


def diagnose(src: Link, dst: Link) -> QmoverError | None:
    """After a failed move, the route's checks again: a queue dropped or a
    consumer unregistered while running is reported as such, with its fix."""
    if src.closed or dst.closed:
        return None
    try:
        check_route(src, dst)
    except TransientError:
        return None
    except QmoverError as found:
        return found
    return None


def check_at_start(routes: Iterable[Route]) -> None:
    """Refuse a config whose routes feed a queue back into itself, or that
    reaches a database through a pooler in transaction mode: each database
    asked once.

    One connection at a time, each closed at once (a worker checks at start,
    beside beat's sweeps: it must not double the connections on a server);
    the pooler check opens a second one beside it for a moment.  A database
    that does not answer within QUICK_CONNECT_TIMEOUT is left out: a mover
    checks its routes for loops when it opens them, and a pooler shows at the
    first PREPAREd statement that misses (qmover.pg.db.wrong_pooler).
    """
    connector = Connector(max_idle=0, connect_timeout=QUICK_CONNECT_TIMEOUT)
    servers: dict[tuple, Server | None] = {}

    def checked(link: Link) -> Server:
        require_session_pooling(link)
        return server_identity(link)

    def server(route: Route, side: Side) -> Server | None:
        key = database_of(route.dsn(side))
        if key not in servers:
            try:
                servers[key] = connector.run(route, side, checked)
            except WrongPooler:
                raise
            except QmoverError:
                servers[key] = None
        return servers[key]

    found = []
    for route in routes:
        source, target = server(route, "source"), server(route, "target")
        if source is not None and target is not None:
            found.append(Hop(route, source, target))
    require_no_loops(found)
