"""Connections to a route's two databases, and the errors they raise.

Database errors become one-line QmoverErrors that name the route, the side
and the database (never the password).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import psycopg2
import psycopg2.errors
from psycopg2.extensions import connection, make_dsn, parse_dsn

from qmover.config.route import Route
from qmover.errors import LoginRefused, QmoverError, TransientError, WrongPooler
from qmover.pg import queries

Side = Literal["source", "target"]
RAISED = "P0001"  # the SQLSTATE of a PL/pgSQL RAISE EXCEPTION (PgQ's "batch not found", say)
# Seconds to wait for a server to answer a new connection, unless the DSN sets connect_timeout:
# a mover's: it holds its task's claims meanwhile, so a server cut off from
# this worker keeps those routes from the others this long at each attempt
CONNECT_TIMEOUT = 5
# whoever asks many databases in turn (sweeps, status, metrics, the checks at
# a worker's start): one that does not answer holds up the others this long
QUICK_CONNECT_TIMEOUT = 2
# A peer that stops answering (a host cut off by the network, not a closed
# socket) is given up within about 15 s on both ends: keepalive probes after 5 s
# without traffic, 2 s apart, and data unacknowledged for 10 s.  These libpq
# settings are added where the DSN sets none of its own, and each session asks
# the server for the same on its end (Session.DEAD_PEER), so that a backend
# whose client is gone ends too, with its transaction and its claims.
DEAD_PEER = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2", "keepalives_count": "3",
             "tcp_user_timeout": "10000"}
NOT_ALLOWED = "42501"  # insufficient_privilege: the role lacks a right
# A statement qmover PREPAREd on this connection missing, or one it has not there already:
# the connection reached another server session (invalid_sql_statement_name, duplicate_prepared_statement).
PREPARED_ELSEWHERE = ("26000", "42P05")
# Connection failures that waiting will not cure: the server answered and said no.
LOGIN_REFUSED = ("password authentication failed", "no password supplied", "pg_hba.conf")


def first_line(exc: BaseException) -> str:
    """The first line of a driver message, without its 'ERROR:' prefix."""
    text = (getattr(exc, "pgerror", None) or str(exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    for prefix in ("ERROR:", "FATAL:"):
        line = line.removeprefix(prefix)
    return line.strip()


def where(route: Route, side: Side) -> str:
    display = route.display(side)
    return f"route {route.name}: {side} database ({display})"


def connect(route: Route, side: Side, timeout: int = CONNECT_TIMEOUT) -> connection:
    """Open one side of a route, in autocommit, with the session settings the COPY
    relies on, and a dead peer noticed on both ends (DEAD_PEER).

    timeout: seconds to wait for the server, unless the DSN sets connect_timeout.
    """
    dsn = route.dsn(side)
    # Shared by the routes that use this database: named after the process, not a route.
    # Text COPY carries timestamps and text: both ends must agree on their
    # spelling, whatever the server defaults are (the encoding is set at login).
    extra: dict[str, Any] = {"application_name": f"qmover {os.getpid()}", "client_encoding": "UTF8"}
    given = parse_dsn(dsn)
    if "connect_timeout" not in given:
        extra["connect_timeout"] = timeout
    dead_peer = {key: given.get(key, default) for key, default in DEAD_PEER.items()}
    extra.update({key: value for key, value in dead_peer.items() if key not in given})
    key = "src_db" if side == "source" else "dst_db"
    try:
        conn = psycopg2.connect(make_dsn(dsn, **extra))
    except psycopg2.Error as exc:
        reason = first_line(exc)
        if any(refusal in reason for refusal in LOGIN_REFUSED):
            raise LoginRefused(
                f"{where(route, side)}: login refused: {reason}; check the user and password in {key} "
                f"(or PGPASSWORD / ~/.pgpass) and the server's pg_hba.conf", side) from None
        raise TransientError(
            f"{where(route, side)}: cannot connect: {reason}; "
            f"check {key} in the config and that the server is up", side) from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            setup = [queries.Session.SETUP.text] + ([queries.Session.DEAD_PEER.text]
                                                     if dead_peer["keepalives"] != "0" else [])
            cur.execute("; ".join(setup), dead_peer)  # one round trip
    except psycopg2.Error as exc:
        raise translate(exc, route, side) from None
    return conn


def wrong_pooler(route: Route, side: Side, seen: str) -> WrongPooler:
    """What a pooler in transaction or statement mode is told (seen: how it showed)."""
    key = "src_db" if side == "source" else "dst_db"
    return WrongPooler(f"{where(route, side)}: {seen}: a pooler in transaction or statement mode hands this "
                       f"connection's transactions to different server sessions, and qmover needs one session "
                       f"per connection; point {key} at a PgBouncer database with pool_mode = session, or at "
                       f"the server itself", side)


def translate(exc: psycopg2.Error, route: Route, side: Side) -> QmoverError:
    """A driver error as the one-line QmoverError that names route and side, with the fix where there is one."""
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return QmoverError(
            f"{where(route, side)}: {first_line(exc)}; a batch must fit in one statement: raise "
            f"statement_timeout for qmover's role (e.g. alter role ... set statement_timeout = 0)", side)
    if isinstance(exc, (psycopg2.errors.UntranslatableCharacter, psycopg2.errors.CharacterNotInRepertoire)):
        return QmoverError(
            f"{where(route, side)}: {first_line(exc)}; the target database's encoding cannot hold "
            f"this event: create the target database with encoding UTF8", side)
    if exc.pgcode in PREPARED_ELSEWHERE:
        return wrong_pooler(route, side, first_line(exc))
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return TransientError(f"{where(route, side)}: connection failed: {first_line(exc)}", side)
    return QmoverError(f"{where(route, side)}: {first_line(exc)}", side, exc.pgcode)


def close(conn: connection | None) -> None:
    """Close without raising: used on paths that are already failing."""
    if conn is not None and not conn.closed:
        try:
            conn.close()
        except psycopg2.Error:
            pass
