"""The tick wake: a source database's ticks wake beat's sweep of it.

PgQ tells no one when it ticks, so a route without the wake waits for the
next sweep of its database, once a move_interval.  Where a route sets
wake_on_tick, `qmover install` puts a trigger on the source's pgq.tick
(qmover/pg/wake.sql) that NOTIFYs at each ticking commit, and the sweep's
own connection to that database LISTENs: a waker thread waits on those
connections and sweeps a database as soon as it has ticked (all its routes:
the trigger is the database's).  That sweep does not ask the source again:
the tick says a batch is ready (qmover.protocol.readiness).

A listening database is left out of the scheduled sweeps except once every
SAFETY_SWEEP seconds, which also looks for the trigger again: a task the
broker lost, or a mover that died with its batch open on a queue that no
longer ticks, is still found.  A database whose trigger is missing (never
installed, or lost in a dump and restore) is swept every move_interval, as
without the wake, and the log says so once.  A connection that fails or
closes stops listening; the next scheduled sweep of its database listens
on the new one.

The waker sends only while scheduled sweeps keep coming: beat's scheduler,
or celery-redbeat's lock, decides which beat sweeps, and a standby's waker
never starts.  Knows nothing of Celery.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psycopg2
from psycopg2.extensions import connection

from qmover.config.route import Route
from qmover.pg.queries import Source
from qmover.pg.session import Link, Session

log = logging.getLogger(__name__)
SAFETY_SWEEP = 30.0  # seconds: a listening database is swept (and its trigger looked for) this often all the same
WAIT_AT_MOST = 1.0  # seconds the waker waits on its connections before it looks at which they are again
# Seconds at least between two sweeps of databases that ticked: a tick alone
# is swept at once, and the ticks of many partitions go in fewer, fuller
# sweeps and tasks (at most 1 / COALESCE a second), each waiting at most that long.
COALESCE = 0.1
ALIVE_PERIODS = 3  # the waker sends while a scheduled sweep came within this many sweep periods
ALIVE_AT_LEAST = 3.0  # seconds, however short the period


def missing(routes: list[Route]) -> str:
    """What to say of routes (of one source database) that set wake_on_tick where the trigger is missing."""
    return (f"route{'s' if len(routes) > 1 else ''} {', '.join(route.name for route in routes)}: wake_on_tick = 1, "
            f"but the source database ({routes[0].src_display}) has no tick wake (run qmover install; a dump and "
            f"restore leaves it out): swept every {routes[0].move_interval:g} s instead")


@dataclass
class _Database:
    """What the wake knows of one source database."""

    # its routes, by move_interval: a tick wakes them all, whichever of them set wake_on_tick
    routes: dict[float, list[Route]] = field(default_factory=dict)
    session: Session | None = None  # beat's kept connection to it, LISTENing with the trigger there
    swept: float = float("-inf")  # monotonic time it was last swept
    missing: bool = False  # the trigger was not there when last looked for


class Wakes:
    """The source databases whose ticks wake the sweep, and the thread that waits for them.

    lock: the sweeper's, held by every user of the sweeper's connections;
    the waker holds it while it reads notifications and sweeps.
    """

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._databases: dict[tuple, _Database] = {}  # database key -> its wake
        self._thread: threading.Thread | None = None
        self._alive_until = 0.0
        self._sweep: Callable[[list[Route], float], None] | None = None
        self._version = 0  # changes whenever a database starts or stops listening

    def listen(self, key: tuple, routes: list[Route], interval: float, link: Link) -> None:
        """Before a sweep of the database reads its state (the lock held): note its
        routes, and listen on its connection (once per connection), so that a tick
        after the read is heard."""
        self._databases.setdefault(key, _Database()).routes[interval] = routes
        if link.ensure(Source.LISTEN):
            self._version += 1  # the waker waits on the connection that listens now, not on one gone

    def trigger(self, key: tuple, link: Link, found: bool) -> None:
        """What that sweep's read said of the trigger (the lock held): where it is
        there, the database listens (on this connection, unless another listens
        already); said when it goes missing or comes back."""
        database = self._databases[key]
        session = (database.session if self._on(database) else link.session) if found else None
        if session is not database.session:
            database.session = session
            self._version += 1
        if not found and not database.missing:
            log.warning("sweep: %s", missing([route for group in database.routes.values() for route in group
                                               if route.wake_on_tick]))
        elif found and database.missing:
            log.info("sweep: %s: the tick wake is back; swept when it ticks", link.route.src_display)
        database.missing = not found

    def knows(self, key: tuple) -> bool:
        """Whether a route of the database asked for the wake: its other routes are woken too."""
        return key in self._databases

    def listening(self, key: tuple, interval: float, now: float) -> bool:
        """Whether a scheduled sweep of this interval's routes may leave the database out:
        they are woken with it, it listens, and it was swept lately."""
        database = self._databases.get(key)
        return (database is not None and interval in database.routes and self._on(database)
                and now - database.swept < SAFETY_SWEEP)

    @staticmethod
    def _on(database: _Database) -> bool:
        """Whether the database listens: a session's connection replaced after a
        failure listens no more (qmover.pg.session)."""
        listening = database.session
        return listening is not None and not listening.closed and Source.LISTEN.name in listening.done

    def swept(self, key: tuple, now: float) -> None:
        database = self._databases.get(key)
        if database is not None:
            database.swept = now

    def keep_alive(self, period: float, sweep: Callable[[list[Route], float], None]) -> None:
        """A scheduled sweep ran (the lock held): send for the next few periods through
        sweep(routes, interval), and start waiting for ticks if any database listens."""
        self._alive_until = time.monotonic() + max(ALIVE_AT_LEAST, ALIVE_PERIODS * period)
        self._sweep = sweep
        if self._thread is None and self._databases:
            self._thread = threading.Thread(target=self._wait, name="qmover-waker", daemon=True)
            self._thread.start()

    def _wait(self) -> None:
        """Wait for ticks; sweep a database that ticked at once, unless the last such sweep was
        less than COALESCE ago: then with the others that tick until then."""
        selector = selectors.DefaultSelector()  # epoll: a fan-in has more than select()'s 1,024 sockets
        registered: dict[int, tuple[connection, _Database]] = {}  # file descriptor -> what it was registered for
        woken: dict[int, _Database] = {}  # id -> a database that ticked, not yet swept
        swept_at = float("-inf")  # monotonic time of the last sweep of woken databases
        version = -1
        while True:
            if version != self._version:
                with self._lock:
                    version = self._version
                    self._register(selector, registered)
            if woken:  # what ticks until the window's end goes together: read at its end, not one by one
                time.sleep(max(0.0, swept_at + COALESCE - time.monotonic()))
            wait = 0.0 if woken else WAIT_AT_MOST
            if registered:
                ready = [registered[key.fd][1] for key, _ in selector.select(wait) if key.fd in registered]
            else:
                time.sleep(wait)
                ready = []
            with self._lock:
                # on a timeout, also what a sweep's statement read on a connection meanwhile
                asked = ready if ready or woken else [database for _, database in registered.values()]
                for database in self._woken(asked, polled=bool(ready)):
                    woken[id(database)] = database
                if not woken or time.monotonic() < swept_at + COALESCE:
                    continue
                swept, swept_at = list(woken.values()), time.monotonic()
                woken.clear()
                if swept_at < self._alive_until and self._sweep is not None:
                    self._sweep_woken(swept, self._sweep)
                for database in self._woken(swept, polled=False):  # ticked while it was swept
                    woken[id(database)] = database

    def _register(self, selector: selectors.BaseSelector, registered: dict[int, tuple[connection, _Database]]
                  ) -> None:
        """The selector waits on the listening connections, and no others (the lock held)."""
        wanted = {session.conn.fileno(): (session.conn, database) for database in self._databases.values()
                  if self._on(database) and (session := database.session) is not None}
        for fd, (conn, _) in list(registered.items()):
            if fd not in wanted or wanted[fd][0] is not conn:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    selector.unregister(fd)
                del registered[fd]
        for fd, pair in wanted.items():
            if fd not in registered:
                selector.register(fd, selectors.EVENT_READ)
            registered[fd] = pair

    @staticmethod
    def _sweep_woken(woken: list[_Database], sweep: Callable[[list[Route], float], None]) -> None:
        """Sweep the routes of the databases that ticked, per move_interval (the lock held)."""
        by_interval: dict[float, list[Route]] = {}
        for database in woken:
            for interval, routes in database.routes.items():
                by_interval.setdefault(interval, []).extend(routes)
        for interval, routes in by_interval.items():
            try:
                sweep(routes, interval)
            except Exception as exc:  # the broker down, say: the next tick or sweep tries again
                log.warning("wake: could not send the moves of %d route(s) that ticked: %s", len(routes), exc)

    def _woken(self, databases: Iterable[_Database], polled: bool) -> list[_Database]:
        """The databases among these whose connection brought a notification (the lock
        held); polled: their sockets are readable, so read them first.

        A connection that fails here is closed with the database's other idle
        ones: its sweep, done now, opens another and listens there, or finds
        the database down."""
        woken = []
        for database in databases:
            session = database.session
            if session is None or not self._on(database):
                continue
            try:
                if polled:
                    session.conn.poll()
            except psycopg2.Error:
                session.connector.drop_idle(session.key)
                database.session = None
                self._version += 1
                woken.append(database)
                continue
            if session.conn.notifies:
                session.conn.notifies.clear()
                woken.append(database)
        return woken
