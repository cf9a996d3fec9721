"""One process's database connections, lent to one task at a time.

A Connector keeps the connections of a worker process (or of `qmover run`,
of beat's sweeps, of a metrics endpoint) per connection settings, not per
route: routes that share a database and a login share its idle
connections.  A task borrows through a Loan, at most one connection per
database however many of its routes use it, and gives them back when it
ends; a connection is never in two tasks' hands at once, whatever the
Celery pool (prefork, threads, solo, gevent).  It only lends: the route
claim is qmover.protocol.claim's, and whoever owns a connector after a fork
is qmover.tasks.process (a child never touches its parent's sockets).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

from psycopg2.extensions import parse_dsn

from qmover.config.route import Route
from qmover.errors import QmoverError, TransientError
from qmover.pg import db
from qmover.pg.db import Side
from qmover.pg.session import Link, Session

log = logging.getLogger(__name__)
T = TypeVar("T")


@lru_cache(maxsize=4096)  # loans ask it for every route every task
def connection_key(dsn: str) -> tuple[tuple[str, str], ...]:
    """The same connection settings (login included), however the DSN text
    spells them: which idle connections a DSN may reuse.  Which *database* a
    DSN names, whoever logs in, is qmover.config.route.database_of."""
    return tuple(sorted(parse_dsn(dsn).items()))


class Connector:
    """Lends connections per database; closes the least recently used idle
    ones beyond max_idle (None: keeps them all).  Thread- and greenlet-safe."""

    def __init__(self, max_idle: int | None = None, connect_timeout: int = db.CONNECT_TIMEOUT):
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._idle: OrderedDict[int, Session] = OrderedDict()  # id(session) -> session, oldest first
        self._idle_by_key: dict[tuple, list[Session]] = {}  # the same, per database, the latest last

    def borrow(self, route: Route, side: Side) -> Session:
        """An idle connection to the side's database, or a new one."""
        key = connection_key(route.dsn(side))
        with self._lock:
            idle = self._idle_by_key.get(key)
            if idle:
                session = idle.pop()  # the most recently used
                del self._idle[id(session)]
                session.reused = True
                return session
        # outside the lock: connecting is slow
        log.debug("%s: a new connection", db.where(route, side))
        return Session(key, db.connect(route, side, self.connect_timeout), self)

    def give_back(self, session: Session) -> None:
        """Take back a connection to keep; one left in a transaction is closed instead."""
        if session.closed or not session.idle:
            db.close(session.conn)
            return
        with self._lock:
            self._idle[id(session)] = session
            self._idle_by_key.setdefault(session.key, []).append(session)
            over = 0 if self.max_idle is None else len(self._idle) - self.max_idle
            surplus = [self._idle.popitem(last=False)[1] for _ in range(over)]
            for old in surplus:
                self._idle_by_key[old.key].remove(old)
        for old in surplus:
            db.close(old.conn)

    def drop_idle(self, key: tuple) -> None:
        """Close the idle connections to one database (its server restarted, say)."""
        with self._lock:
            sessions = self._idle_by_key.pop(key, [])
            for session in sessions:
                del self._idle[id(session)]
        for session in sessions:
            db.close(session.conn)

    def run(self, route: Route, side: Side, work: Callable[[Link], T]) -> T:
        """work(link) on a borrowed connection to one side of route.

        After a statement error the connection (in autocommit) goes back as it
        is; after a connection error, or anything unexpected, it is closed.
        """
        with Loan(self) as loan:
            return work(loan.link(route, side))

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        """Close every idle connection (borrowed ones are their borrowers' to close)."""
        with self._lock:
            sessions = list(self._idle.values())
            self._idle.clear()
            self._idle_by_key.clear()
        for session in sessions:
            db.close(session.conn)


class Loan:
    """The connections one task (or one round of `qmover run`) holds: one per
    database, borrowed on first use and given back together.

    Routes that share a database share its connection within the loan, one
    statement at a time, since a loan serves one thread.  close_after: the
    databases whose connections are closed, not kept, when the loan ends
    (sources capped by max_source_connections).  Ended by an exception other
    than a statement error, the loan closes its connections: an interrupted
    task leaves none half-way.
    """

    def __init__(self, connector: Connector, close_after: frozenset[tuple] = frozenset()):
        self.connector = connector
        self.close_after = close_after
        self.sessions: dict[tuple, Session] = {}

    def link(self, route: Route, side: Side) -> Link:
        """The route's side, on the loan's connection to that database (borrowed now if none)."""
        key = connection_key(route.dsn(side))
        session = self.sessions.get(key)
        if session is None or session.closed:
            session = self.sessions[key] = self.connector.borrow(route, side)
        return Link(session, route, side)

    def has(self, route: Route, side: Side) -> bool:
        """Whether the loan holds an open connection to the side's database."""
        session = self.sessions.get(connection_key(route.dsn(side)))
        return session is not None and not session.closed

    def discard(self, route: Route, side: Side) -> None:
        """Close the side's connection (after an error it may have left half-way), and what it held."""
        session = self.sessions.pop(connection_key(route.dsn(side)), None)
        if session is not None:
            db.close(session.conn)

    def close_capped(self) -> None:
        """Close now the connections close_after names (before their places are given back)."""
        for key in [key for key in self.sessions if key in self.close_after]:
            db.close(self.sessions.pop(key).conn)

    def give_back(self) -> None:
        self.close_capped()
        for session in self.sessions.values():
            self.connector.give_back(session)
        self.sessions.clear()

    def close(self) -> None:
        for session in self.sessions.values():
            db.close(session.conn)
        self.sessions.clear()

    def __enter__(self) -> Loan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None or issubclass(exc_type, QmoverError) and not issubclass(exc_type, TransientError):
            self.give_back()
        else:
            self.close()
