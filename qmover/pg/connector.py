"""One process's database connections, lent to one mover at a time.

A Connector owns every connection of a worker process (or of `qmover run`)
and keeps them per connection settings, not per route: routes that share a
database and a login share its idle connections.  A task borrows through a
Loan, at most one connection per database however many of its routes use
it, and gives them back when it ends; a connection is never in two tasks'
hands at once, whatever the Celery pool (prefork, threads, solo, gevent).
It only lends: the route claim is qmover.protocol.claim's, the checks'
cache qmover.protocol.preflight's.

A kept connection may have died while idle (its server restarted): the one
retry for that case is once_more_if_stale, which every caller goes through.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

from psycopg2.extensions import connection, parse_dsn

from qmover.config.route import Route
from qmover.errors import QmoverError, TransientError
from qmover.pg import db
from qmover.pg.db import Side

T = TypeVar("T")


@lru_cache(maxsize=4096)  # loans ask it for every route every task
def connection_key(dsn: str) -> tuple[tuple[str, str], ...]:
    """The same connection settings (login included), however the DSN text
    spells them: which idle connections a DSN may reuse.  Which *database* a
    DSN names, whoever logs in, is qmover.config.route.database_of."""
    return tuple(sorted(parse_dsn(dsn).items()))


@dataclass(eq=False)
class Session:
    """A borrowed connection and what has been learnt on it."""

    key: tuple[tuple[str, str], ...]
    conn: connection
    routes: set[Route] = field(default_factory=set)  # routes whose temporary table is set up here
    prepared: set[str] = field(default_factory=set)  # statements PREPAREd on this connection
    # It sat idle before this loan and has not answered since: its server may
    # have restarted meanwhile, so a connection error is worth one retry afresh.
    reused: bool = False


class Connector:
    """Lends connections per database; closes the least recently used idle
    ones beyond max_idle (None: keeps them all).  Thread- and greenlet-safe;
    after a fork the child starts empty (it never touches the parent's sockets)."""

    def __init__(self, max_idle: int | None = None, connect_timeout: int = db.CONNECT_TIMEOUT):
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._idle: OrderedDict[int, Session] = OrderedDict()  # id(session) -> session, oldest first
        self._idle_by_key: dict[tuple, list[Session]] = {}  # the same, per database, the latest last
        self._pid = os.getpid()
        self._inherited: list[Session] = []

    def borrow(self, route: Route, side: Side) -> Session:
        """An idle connection to the side's database, or a new one."""
        key = connection_key(route.dsn(side))
        with self._lock:
            self._forget_after_fork()
            idle = self._idle_by_key.get(key)
            if idle:
                session = idle.pop()  # the most recently used
                del self._idle[id(session)]
                session.reused = True
                return session
        # outside the lock: connecting is slow
        return Session(key, db.connect(route, side, autocommit=True, timeout=self.connect_timeout))

    def give_back(self, session: Session) -> None:
        """Return a connection that is idle (no transaction, no claim)."""
        if session.conn.closed:
            return
        with self._lock:
            self._forget_after_fork()
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

    def run(self, route: Route, side: Side, work: Callable[[Session], T]) -> T:
        """work(session) on a borrowed connection, errors turned into QmoverErrors.

        A kept connection that fails with a connection error is replaced once
        (once_more_if_stale); after a statement error the connection (in
        autocommit) goes back as it is; after a connection error it is closed.
        """
        loan = Loan(self)

        def attempt() -> T:
            session = loan.session(route, side)
            with db.errors(route, side):
                return work(session)

        try:
            result = once_more_if_stale(attempt, loan, route)
        except TransientError:
            loan.close()
            raise
        except QmoverError:
            loan.give_back()
            raise
        except BaseException:
            loan.close()
            raise
        loan.give_back()
        return result

    def replace(self, session: Session, route: Route, side: Side) -> Session:
        """A new connection for one that failed before it answered: the
        database's other idle connections are dropped too (its server restarted)."""
        db.close(session.conn)
        self.drop_idle(session.key)
        return self.borrow(route, side)

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

    def _forget_after_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            # The parent's connections: kept referenced and never closed here,
            # since closing (or collecting) one would end the parent's session.
            self._inherited += self._idle.values()
            self._idle.clear()
            self._idle_by_key.clear()


class Loan:
    """The connections one task (or one turn of `qmover run`) holds: one per
    database, borrowed on first use and given back together.

    Routes that share a database share its connection within the loan, one
    statement at a time, since a loan serves one thread.  close_after: the
    databases whose connections are closed, not kept, when the loan ends
    (sources capped by max_source_connections).
    """

    def __init__(self, connector: Connector, close_after: frozenset[tuple] = frozenset()):
        self.connector = connector
        self.close_after = close_after
        self.sessions: dict[tuple, Session] = {}

    def session(self, route: Route, side: Side) -> Session:
        key = connection_key(route.dsn(side))
        session = self.sessions.get(key)
        if session is None or session.conn.closed:
            session = self.sessions[key] = self.connector.borrow(route, side)
        return session

    def has(self, route: Route, side: Side) -> bool:
        """Whether the loan holds an open connection to the side's database."""
        session = self.sessions.get(connection_key(route.dsn(side)))
        return session is not None and not session.conn.closed

    def replace(self, session: Session, route: Route, side: Side) -> Session:
        """See Connector.replace."""
        self.sessions[session.key] = fresh = self.connector.replace(session, route, side)
        return fresh

    def discard(self, route: Route, side: Side) -> None:
        """Close the side's connection (after an error it may have left half-way)."""
        session = self.sessions.pop(connection_key(route.dsn(side)), None)
        if session is not None:
            db.close(session.conn)

    def give_back(self) -> None:
        for key, session in self.sessions.items():
            if key in self.close_after:
                db.close(session.conn)
            else:
                self.connector.give_back(session)
        self.sessions.clear()

    def close(self) -> None:
        for session in self.sessions.values():
            db.close(session.conn)
        self.sessions.clear()

    def __enter__(self) -> Loan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.give_back()
        else:
            self.close()  # an interrupted task leaves no connection half-way


def once_more_if_stale(attempt: Callable[[], T], loan: Loan, route: Route) -> T:
    """attempt(), and once more if it failed with a connection error on a kept
    connection that had not answered since it was lent (its server restarted
    while it sat idle): that connection, and the database's other idle ones,
    are replaced first.  Any other failure is attempt()'s to report."""
    try:
        return attempt()
    except TransientError as exc:
        if exc.side not in ("source", "target"):
            raise
        side: Side = "source" if exc.side == "source" else "target"
        session = loan.sessions.get(connection_key(route.dsn(side)))
        if session is None or not session.reused:
            raise
        loan.replace(session, route, side)
    return attempt()
