"""What must be true of a route's databases before a batch may move.

Run once per process for each route, before its first batch (a mover's
process remembers what it checked, and checks again after a failure): a
missing queue or schema is reported as a cause and a fix instead of a driver
error half-way through.
"""

from __future__ import annotations

import psycopg2.extensions
from psycopg2.extensions import connection

from qmover.config.route import Route
from qmover.errors import QmoverError
from qmover.pg import queries
from qmover.pg.db import Side, errors, scalar, where

PGQ_FIX = ("install PgQ (Debian: apt-get install postgresql-15-pgq3) "
           "and run CREATE EXTENSION pgq in that database")


def has_schema(conn: connection, name: str) -> bool:
    return bool(scalar(conn, queries.HAS_SCHEMA, (name,)))


def pgq_missing(route: Route, side: Side) -> QmoverError:
    return QmoverError(f"{where(route, side)}: PgQ is not installed; {PGQ_FIX}")


def queue_missing(route: Route, side: Side, queue: str) -> QmoverError:
    literal = "'" + queue.replace("'", "''") + "'"
    return QmoverError(f"{where(route, side)}: queue {queue!r} does not exist; "
                       f"create it with: select pgq.create_queue({literal})")


def not_registered(route: Route) -> QmoverError:
    return QmoverError(f"{where(route, 'source')}: consumer {route.consumer!r} is not registered "
                       f"on queue {route.src_queue!r}; run: qmover install CONFIG --route {route.name}")


def pgq_ext_missing(route: Route) -> QmoverError:
    return QmoverError(f"{where(route, 'target')}: schema pgq_ext is missing, so positions cannot be "
                       f"recorded; run: qmover install CONFIG --route {route.name}")


def pgq_ext_too_old(route: Route) -> QmoverError:
    return QmoverError(f"{where(route, 'target')}: pgq_ext has no get_last_tick(text)/set_last_tick(text, "
                       f"bigint); upgrade it to pgq_ext 3.x (qmover does not alter an existing pgq_ext)")


def require_queue(conn: connection, route: Route, side: Side) -> None:
    """pgq installed and the route's queues created on this side."""
    queues = (route.src_queue,) if side == "source" else route.target_queues
    with errors(route, side):
        if not has_schema(conn, "pgq"):
            raise pgq_missing(route, side)
        for queue in queues:
            if not scalar(conn, queries.HAS_QUEUE, (queue,)):
                raise queue_missing(route, side, queue)


def require_registered(conn: connection, route: Route) -> None:
    with errors(route, "source"):
        if not scalar(conn, queries.IS_REGISTERED, (route.src_queue, route.consumer)):
            raise not_registered(route)


def require_pgq_ext(conn: connection, route: Route) -> None:
    with errors(route, "target"):
        if not has_schema(conn, "pgq_ext"):
            raise pgq_ext_missing(route)
        if not scalar(conn, queries.HAS_TICK_API):
            raise pgq_ext_too_old(route)


def require_blocking_driver() -> None:
    """COPY, which moves the events, cannot run while psycopg2 has a wait
    callback: eventlet's monkey patching registers one, so does psycogreen."""
    if psycopg2.extensions.get_wait_callback() is not None:
        raise QmoverError(
            "psycopg2 has a wait callback (eventlet's monkey patching or psycogreen set it), and COPY cannot "
            "run then; run qmover's tasks on the prefork, threads, solo or gevent pool, without psycogreen")


def check_route(src: connection, dst: connection, route: Route) -> None:
    """Everything a move needs; raises the first problem found."""
    require_queue(src, route, "source")
    require_registered(src, route)
    require_queue(dst, route, "target")
    require_pgq_ext(dst, route)


def target_can_copy(conn: connection, route: Route) -> bool:
    """Whether the target role may COPY into the queue's event tables.

    If not, it needs at least pgq_writer (pgq.insert_event), whose path
    copies into a temporary table first (split.prepare).
    """
    with errors(route, "target"):
        if not scalar(conn, queries.IS_QUEUE_WRITER):
            raise QmoverError(
                f"{where(route, 'target')}: the role may not write to queue {route.dst_queue!r}; "
                f"grant it pgq_writer, and to keep ev_time also INSERT on the queue's event tables "
                f"and USAGE on its event sequence (the rights of pgq_admin)")
        return bool(scalar(conn, queries.CAN_COPY_INTO_QUEUE, (route.dst_queue,)))
