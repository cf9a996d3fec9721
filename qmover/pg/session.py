"""A kept connection, and the one call every statement goes through.

A Session is one connection a process keeps, with what has been learnt on
it: the statements PREPAREd or set up there, and the statements rendered
for it.  A Link is a route's use of a session, on one side: it sends
statements (qmover.pg.queries), PREPAREs each once per connection before
its first use, and turns driver errors into one-line QmoverErrors that name
that route and side.

A connection lent again after sitting idle may have died meanwhile (its
server restarted): when its first statement fails on the connection, the
link opens a new one in its place (the database's other idle connections
are dropped too) and sends the statement once more.  Nothing had answered
on that connection since it was lent, so nothing of the caller's was on
it: no transaction, no claim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import TRANSACTION_STATUS_IDLE, connection, cursor

from qmover.config.route import Route
from qmover.errors import TransientError
from qmover.pg import db
from qmover.pg.db import Side
from qmover.pg.queries import Statement

if TYPE_CHECKING:
    from qmover.pg.connector import Connector

log = logging.getLogger(__name__)
T = TypeVar("T")
Sent = Statement | sql.Composable


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class Session:
    """One kept connection and what has been learnt on it."""

    def __init__(self, key: tuple, conn: connection, connector: Connector):
        self.key = key
        self.conn = conn
        self.connector = connector
        self.done: set[str] = set()  # statements PREPAREd, or run once (Link.ensure), on this connection
        self.rendered: dict[tuple[object, ...], list[str]] = {}  # statements built for it, by key
        # It sat idle before this loan and has not answered since: a connection
        # error is worth one more try, on a new connection.
        self.reused = False
        self._cursor: cursor | None = None

    def cursor(self) -> cursor:
        """The connection's one cursor, kept: a new one per statement cost a
        quarter of a short statement's client time (34 against 26 us)."""
        if self._cursor is None or self._cursor.connection is not self.conn or self._cursor.closed:
            self._cursor = self.conn.cursor()
        return self._cursor

    @property
    def closed(self) -> bool:
        return bool(self.conn.closed)

    @property
    def idle(self) -> bool:
        """No transaction open on the connection."""
        return bool(self.conn.info.transaction_status == TRANSACTION_STATUS_IDLE)

    def replace(self, conn: connection) -> None:
        """Take a new connection in place of this one, which failed (closed here)."""
        db.close(self.conn)
        self.conn = conn
        self.done.clear()
        self.rendered.clear()


class Link:
    """A route's use of a session, on one side of it."""

    def __init__(self, session: Session, route: Route, side: Side):
        self.session = session
        self.route = route
        self.side = side

    @property
    def closed(self) -> bool:
        return self.session.closed

    @property
    def idle(self) -> bool:
        return self.session.idle

    def rows(self, *statements: Sent, **params: Any) -> list[tuple]:
        """The rows of the last statement; several statements go in one round trip."""
        return self._send(statements, params, _all_rows)

    def one(self, *statements: Sent, **params: Any) -> tuple:
        """The one row of the last statement."""
        row = self._send(statements, params, _first_row)
        assert row is not None, f"{statements[-1]!r} returns a row"
        return tuple(row)

    def value(self, *statements: Sent, **params: Any) -> Any:
        """The first value of the last statement's first row (None without one)."""
        row = self._send(statements, params, _first_row)
        return None if row is None else row[0]

    def run(self, *statements: Sent, **params: Any) -> int:
        """Send the statements; the last one's row count."""
        return self._send(statements, params, _row_count)

    def ensure(self, statement: Statement) -> bool:
        """Run statement once per connection (outside a transaction: it must not roll back);
        whether it ran now (a new connection, or one replaced in place)."""
        if statement.name in self.session.done:
            return False
        self.run(statement)
        self.session.done.add(statement.name)
        return True

    def render(self, key: tuple[object, ...], build: Callable[[], sql.Composable | tuple[sql.Composable, ...]]
               ) -> list[str]:
        """build()'s statement (or parts) as text for this connection, built once per connection and key."""
        parts = self.session.rendered.get(key)
        if parts is None:
            built = build()
            try:
                parts = [part.as_string(self.session.conn) for part in (built if isinstance(built, tuple) else [built])]
            except psycopg2.Error as exc:
                raise db.translate(exc, self.route, self.side) from None
            self.session.rendered[key] = parts
        return parts

    def copy_out(self, statement: str, sink: Writable) -> int:
        """A COPY ... TO STDOUT into sink; the rows sent."""
        return self._copy(statement, sink)

    def copy_in(self, statement: str, source: Readable, *then: Statement, **params: Any) -> int:
        """A COPY ... FROM STDIN from source, and the statements then, in the same round
        trip; the rows taken, or -1 with statements after it (the driver counts the last)."""
        return self._copy(statement, source, then, params)

    def _copy(self, statement: str, file: Any,  # a Readable for COPY FROM, a Writable for COPY TO
              then: tuple[Statement, ...] = (), params: dict[str, Any] | None = None) -> int:
        session = self.session
        try:
            cur = session.cursor()
            if then:
                _prepare(cur, then, session)
                statement = f"{statement}; {cur.mogrify(_joined(then), params or None).decode()}"
            cur.copy_expert(statement, file, size=65536)
            count = cur.rowcount
        except psycopg2.Error as exc:
            raise db.translate(exc, self.route, self.side) from None
        finally:
            session.reused = False
        return int(count)

    def _send(self, statements: tuple[Sent, ...], params: dict[str, Any], read: Callable[[Any], T]) -> T:
        session = self.session
        try:
            return self._send_once(statements, params, read)
        except TransientError:
            if not session.reused:
                raise
            log.debug("%s: a kept connection was dead (its server restarted?): replaced, the statement sent again",
                      db.where(self.route, self.side))
            session.connector.drop_idle(session.key)  # its server restarted: they are dead too
            session.replace(db.connect(self.route, self.side, session.connector.connect_timeout))
            return self._send_once(statements, params, read)
        finally:
            session.reused = False

    def _send_once(self, statements: tuple[Sent, ...], params: dict[str, Any], read: Callable[[Any], T]) -> T:
        session = self.session
        try:
            cur = session.cursor()
            _prepare(cur, statements, session)
            cur.execute(_sent(statements, session.conn), params or None)
            return read(cur)
        except psycopg2.Error as exc:
            raise db.translate(exc, self.route, self.side) from None


def _prepare(cur: Any, statements: tuple[Sent, ...], session: Session) -> None:
    """PREPARE those of the statements that are not yet PREPAREd on the session's connection."""
    for statement in statements:
        if isinstance(statement, Statement) and statement.prepared and statement.name not in session.done:
            cur.execute(statement.preparation)
            session.done.add(statement.name)


def _sent(statements: tuple[Sent, ...], conn: connection) -> str:
    """What one round trip sends: the statements, each as it is run (see Statement.call)."""
    if all(isinstance(statement, Statement) for statement in statements):
        return _joined(statements)
    return "; ".join(s.call if isinstance(s, Statement) else s.as_string(conn) for s in statements)


@lru_cache(maxsize=64)  # the round trips qmover sends are a handful of fixed tuples
def _joined(statements: tuple[Statement, ...]) -> str:
    return "; ".join(statement.call for statement in statements)


def _all_rows(cur: Any) -> list[tuple]:
    return list(cur.fetchall())


def _first_row(cur: Any) -> tuple | None:
    return cur.fetchone()


def _row_count(cur: Any) -> int:
    return int(cur.rowcount)
