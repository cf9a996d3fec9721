"""One process's database connections, lent to one mover at a time.

A Connector owns every connection of a worker process (or of `qmover run`)
and keeps them per database, not per route: routes that share a database
share its idle connections.  A task borrows through a Loan, at most one
connection per database however many of its routes use it, and gives them
back when it ends; a connection is never in two tasks' hands at once,
whatever the Celery pool (prefork, threads, solo, gevent).  A route's checks
run once per process (`checked`), not once per task.

The Connector also keeps the in-process half of the route claim: two tasks of
one process never move the same route at once (the advisory lock in
PostgreSQL keeps other processes out, but a session can take its own lock
twice).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

from psycopg2.extensions import connection, parse_dsn

from qmover.config.route import Route
from qmover.errors import QmoverError, TransientError
from qmover.pg import db
from qmover.pg.db import Side

T = TypeVar("T")


@lru_cache(maxsize=4096)  # sweeps ask it for every route every interval
def database_key(dsn: str) -> tuple[tuple[str, str], ...]:
    """The same connection settings, however the DSN text spells them."""
    return tuple(sorted(parse_dsn(dsn).items()))


def by_database(routes: Iterable[Route], side: Side) -> list[list[Route]]:
    """The routes grouped by the database of one side, in first-seen order."""
    groups: dict[tuple, list[Route]] = {}
    for route in routes:
        groups.setdefault(database_key(route.dsn(side)), []).append(route)
    return list(groups.values())


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
        self._held: set[tuple] = set()
        # Routes whose checks passed in this process: route -> moves through pgq.insert_event
        self.checked: dict[Route, bool] = {}
        self._pid = os.getpid()
        self._inherited: list[Session] = []

    def borrow(self, route: Route, side: Side) -> Session:
        """An idle connection to the side's database, or a new one."""
        key = database_key(route.dsn(side))
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

    def hold(self, route: Route) -> bool:
        """The in-process claim on a route; False when another task of this process has it."""
        key = (database_key(route.dst_dsn), route.consumer)
        with self._lock:
            if key in self._held:
                return False
            self._held.add(key)
            return True

    def unhold(self, route: Route) -> None:
        with self._lock:
            self._held.discard((database_key(route.dst_dsn), route.consumer))

    def run(self, route: Route, side: Side, work: Callable[[Session], T]) -> T:
        """work(session) on a borrowed connection, errors turned into QmoverErrors.

        A kept connection that fails with a connection error (its server
        restarted since) is replaced once at once; after a statement error
        the connection (in autocommit) goes back as it is.
        """
        for attempt in range(2):
            session = self.borrow(route, side)
            try:
                with db.errors(route, side):
                    result = work(session)
            except TransientError:
                db.close(session.conn)
                if session.reused and attempt == 0:
                    self.drop_idle(session.key)
                    continue
                raise
            except QmoverError:
                self.give_back(session)
                raise
            except BaseException:
                db.close(session.conn)
                raise
            self.give_back(session)
            return result
        raise AssertionError("unreachable")

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
            self._held.clear()


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
        key = database_key(route.dsn(side))
        session = self.sessions.get(key)
        if session is None or session.conn.closed:
            session = self.sessions[key] = self.connector.borrow(route, side)
        return session

    def has(self, route: Route, side: Side) -> bool:
        """Whether the loan holds an open connection to the side's database."""
        session = self.sessions.get(database_key(route.dsn(side)))
        return session is not None and not session.conn.closed

    def replace(self, session: Session, route: Route, side: Side) -> Session:
        """See Connector.replace."""
        self.sessions[session.key] = fresh = self.connector.replace(session, route, side)
        return fresh

    def discard(self, route: Route, side: Side) -> None:
        """Close the side's connection (after an error it may have left half-way)."""
        session = self.sessions.pop(database_key(route.dsn(side)), None)
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
