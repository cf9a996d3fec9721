"""What must be true of a route's databases before a batch may move.

Each check raises a QmoverError that names the cause and the fix instead of
a driver error half-way through a batch.  qmover.protocol.preflight runs
them before a route's first batch in a process; install and status ask the
same questions.
"""

from __future__ import annotations

import psycopg2
import psycopg2.extensions

from qmover.config.route import Route
from qmover.errors import QmoverError
from qmover.pg import db
from qmover.pg.db import Side, where
from qmover.pg.queries import Checks, Transaction
from qmover.pg.session import Link

PGQ_FIX = ("install PgQ (Debian: apt-get install postgresql-15-pgq3) "
           "and run CREATE EXTENSION pgq in that database")


def has_schema(link: Link, name: str) -> bool:
    return bool(link.value(Checks.HAS_SCHEMA, schema=name))


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


def require_queue(link: Link) -> None:
    """pgq installed and the route's queues created on the link's side."""
    route, side = link.route, link.side
    if not has_schema(link, "pgq"):
        raise pgq_missing(route, side)
    for queue in (route.src_queue,) if side == "source" else route.target_queues:
        if not link.value(Checks.HAS_QUEUE, queue=queue):
            raise queue_missing(route, side, queue)


def is_registered(src: Link) -> bool:
    return bool(src.value(Checks.IS_REGISTERED, queue=src.route.src_queue, consumer=src.route.consumer))


def require_registered(src: Link) -> None:
    if not is_registered(src):
        raise not_registered(src.route)


def require_pgq_ext(dst: Link) -> None:
    if not has_schema(dst, "pgq_ext"):
        raise pgq_ext_missing(dst.route)
    if not dst.value(Checks.HAS_TICK_API):
        raise pgq_ext_too_old(dst.route)


def require_blocking_driver() -> None:
    """COPY, which moves the events, cannot run while psycopg2 has a wait
    callback: eventlet's monkey patching registers one, so does psycogreen."""
    if psycopg2.extensions.get_wait_callback() is not None:
        raise QmoverError(
            "psycopg2 has a wait callback (eventlet's monkey patching or psycogreen set it), and COPY cannot "
            "run then; run qmover's tasks on the prefork, threads, solo or gevent pool, without psycogreen")


def check_route(src: Link, dst: Link) -> None:
    """Everything a move needs; raises the first problem found."""
    require_queue(src)
    require_registered(src)
    require_queue(dst)
    require_pgq_ext(dst)


def target_can_copy(dst: Link) -> bool:
    """Whether the target role may COPY into the queue's event tables.

    If not, it needs at least pgq_writer (pgq.insert_event), whose path
    copies into a temporary table first (Target.CREATE_INCOMING).
    """
    route = dst.route
    if not dst.value(Checks.IS_QUEUE_WRITER):
        raise QmoverError(
            f"{where(route, 'target')}: the role may not write to queue {route.dst_queue!r}; "
            f"grant it pgq_writer, and to keep ev_time also INSERT on the queue's event tables "
            f"and USAGE on its event sequence (the rights of pgq_admin)")
    return bool(dst.value(Checks.CAN_COPY_INTO_QUEUE, queue=route.dst_queue))


def require_session_pooling(link: Link) -> None:
    """Refuse a pooler that hands one connection's transactions to different
    server sessions (PgBouncer's pool_mode = transaction or statement): a
    claim belongs to the server session that took it, and statements
    PREPAREd in one transaction would be missing in the next.

    A pooler does not say so; what shows it is the backend: a second
    connection takes a transaction while this one asks again, three times.
    One server session per connection never changes, and is never shared.
    """
    other = db.connect(link.route, link.side, db.QUICK_CONNECT_TIMEOUT)
    try:
        mine = {link.value(Checks.BACKEND)}
        with other.cursor() as cur:
            for _ in range(3):
                cur.execute(f"{Transaction.BEGIN.text}; {Checks.BACKEND.text}")
                if (cur.fetchone() or (None,))[0] in mine:
                    raise db.wrong_pooler(link.route, link.side, "two connections reached one server session")
                mine.add(link.value(Checks.BACKEND))
                cur.execute(Transaction.COMMIT.text)
                if len(mine) > 1:
                    raise db.wrong_pooler(link.route, link.side, "one connection reached two server sessions")
    except psycopg2.Error:  # statement mode refuses the transaction
        raise db.wrong_pooler(link.route, link.side, "it refuses a transaction block") from None
    finally:
        db.close(other)


def server_identity(link: Link) -> tuple[str, str]:
    """The server (system identifier) and database a connection reached."""
    system, database = link.one(Checks.SERVER_IDENTITY)
    return system, database
