"""What a route must pass before its first batch in a process, and what to
say when a move fails: no loop, PgQ and both queues as the route needs them
(qmover.pg.checks), and which write path the target role allows (COPY into
the event tables, or pgq.insert_event).  The movers keep the outcome per
process (`checked`), dropped after any failure of the route."""

from __future__ import annotations

import logging

from psycopg2.extensions import connection

from qmover.config.route import Route
from qmover.errors import QmoverError, TransientError
from qmover.pg import db
from qmover.pg.checks import check_route, require_blocking_driver, target_can_copy
from qmover.protocol.cycles import Hop, require_no_loops, server_identity

log = logging.getLogger("qmover")
# Routes whose checks passed in this process: route -> whether it moves through pgq.insert_event.
checked: dict[Route, bool] = {}
_warned_routes: set[str] = set()  # the insert_event fallback is announced once per process


def check(route: Route, src: connection, dst: connection) -> bool:
    """Raise the first thing that keeps the route from moving; returns
    whether it must move through pgq.insert_event."""
    require_blocking_driver()
    with db.errors(route, "source"):
        source = server_identity(src)
    with db.errors(route, "target"):
        target = server_identity(dst)
    require_no_loops([Hop(route, source, target)])
    check_route(src, dst, route)
    via_insert_event = route.kind == "queue" and not target_can_copy(dst, route)
    if via_insert_event and route.keep_event_id:
        raise QmoverError(
            f"route {route.name}: keep_event_id needs the target role to write queue "
            f"{route.dst_queue!r}'s event tables itself (pgq.insert_event cannot keep ids); grant "
            f"it INSERT on the event tables and UPDATE on the event sequence, or set keep_event_id = 0")
    if via_insert_event and route.name not in _warned_routes:
        _warned_routes.add(route.name)
        log.warning("route %s: the target role may not COPY into queue %r's event tables; moving "
                    "through pgq.insert_event instead, still exactly once, but slower and with "
                    "ev_time set by the target; grant INSERT on the event tables and USAGE on the "
                    "event sequence to keep it", route.name, route.dst_queue)
    return via_insert_event


def diagnose(route: Route, src: connection, dst: connection) -> QmoverError | None:
    """After a failed move, the route's checks again: a queue dropped or a
    consumer unregistered while running is reported as such, with its fix."""
    if src.closed or dst.closed:
        return None
    try:
        check_route(src, dst, route)
    except TransientError:
        return None
    except QmoverError as found:
        return found
    return None
