"""The readiness sweep: which routes have a batch to move, asking each database once an interval.

Instead of a move task per route per interval, beat sweeps: one query per
source database says where each consumer stands, one per target database
which routes a mover holds; only routes with a batch ready and no mover get
a move task, the most behind first, several routes to a task.  The source
databases of one move_interval are swept in slices, one slice at a time,
each database once an interval, so that the moves a sweep starts are spread
over the interval instead of queuing up behind each other.

A database whose ticks wake the sweep (qmover.protocol.wake) is not asked
when it ticks: its tick is its routes' readiness, and only its target is
asked, unless a route there collects batches (keep_lag, min_count,
min_interval), which its source's state decides.

A route sent a task is not sent another while that task waits (no mover
has taken the route since, as the target's claims say), unless
resend_after() passes: a task the broker lost, or one a killed worker had
taken, is replaced then, and again after twice and four times as long, so
that workers slower than that get no pile of tasks.  So no task expires
unrun, and a route has at most one task queued while the workers keep up.

Errs towards ready: a consumer the query does not find (a dropped queue, an
unregistered consumer) counts as ready, so that its mover says what is
wrong.  A database that does not answer makes only its own routes wait:
sweeps leave it out, and a background thread asks it again every
PROBE_EVERY seconds (with a short connect timeout), so a dead host holds up
no sweep.  Knows nothing of Celery.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from qmover.config.route import Route, by_database, database_of
from qmover.errors import LoginRefused, QmoverError, TransientError
from qmover.pg.connector import Connector
from qmover.pg.db import QUICK_CONNECT_TIMEOUT, Side
from qmover.pg.queries import Session, Source
from qmover.pg.session import Link
from qmover.protocol import claim
from qmover.protocol.wake import Wakes

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_EVERY = 1.0
MAX_SLICES = 4  # slices of one interval's source databases
MIN_SWEEP_PERIOD = 0.05  # seconds between two sweeps of one interval, at least
RESEND_INTERVALS = 5  # a task not yet run is replaced after this many intervals,
RESEND_AT_LEAST = 5.0  # and not before this many seconds,
RESEND_DOUBLINGS = 2  # and, while its position stays, each replacement after twice as long, up to four times


def slices(routes: Iterable[Route], interval: float) -> int:
    """Into how many slices the source databases of these routes (one interval) are swept:
    one when their ticks wake the sweep (the scheduled sweeps then leave most of them out)."""
    routes = list(routes)
    if all(route.wake_on_tick for route in routes):
        return 1
    databases = len(by_database(routes, "source"))
    return max(1, min(MAX_SLICES, databases, int(interval / MIN_SWEEP_PERIOD)))


def sliced(routes: Sequence[Route], interval: float) -> list[list[Route]]:
    """The routes of each slice: their source databases dealt out in turn."""
    count = slices(routes, interval)
    groups = by_database(routes, "source")
    return [[route for n, group in enumerate(groups) if n % count == slice_no for route in group]
            for slice_no in range(count)]


def resend_after(interval: float) -> float:
    return max(RESEND_AT_LEAST, RESEND_INTERVALS * interval)


def chunks(routes: Sequence[Route], size: int) -> list[list[Route]]:
    """The routes in order, size to a task."""
    return [list(routes[n:n + size]) for n in range(0, len(routes), size)]


def waiting(route: Route, row: Sequence[Any] | None, resend: float) -> float | None:
    """How long the route's oldest unmoved tick has waited (the most behind go
    first); -1 when it has nothing to move; None while a mover has its batch open.

    row: the route's Source.SWEEP_STATE columns after queue and consumer
    (batch_age, waiting, events_ahead, seconds_ahead); None when
    the sweep did not find the consumer.
    """
    if row is None:
        return 0.0  # not found: ready, so that its mover says why
    batch_age, waited, events_ahead, seconds_ahead = row
    if batch_age is not None:
        return batch_age if batch_age >= resend else None  # an old open batch: its mover is gone
    if waited is None or (route.keep_lag is not None and waited < route.keep_lag):
        return -1.0
    if route.min_count is not None or route.min_interval is not None:
        # what pgq.next_batch_custom asks of the latest tick before it merges ticks into a batch
        enough = ((route.min_count is not None and events_ahead >= route.min_count)
                  or (route.min_interval is not None and seconds_ahead >= route.min_interval))
        if not enough:
            return -1.0
    return float(waited)


@dataclass(frozen=True)
class Swept:
    """One sweep: which slice it asked, and the routes to move now, the most behind first."""

    slice: int
    slices: int
    routes: int  # routes in the slice
    ready: list[Route]


def candidates(routes: Iterable[Route], state: Mapping[tuple[str, str], Sequence[Any]], resend: float
               ) -> tuple[list[tuple[float, Route]], list[Route]]:
    """From their source's state (Source.SWEEP_STATE rows, by queue and consumer):
    (waiting, route) of the routes with a batch to move, and the routes with none."""
    found, idle = [], []
    for route in routes:
        waited = waiting(route, state.get((route.src_queue, route.consumer)), resend)
        if waited is None:
            continue
        if waited < 0:
            idle.append(route)
        else:
            found.append((waited, route))
    return found, idle


@dataclass
class _Sent:
    at: float  # the target's clock (epoch seconds) when the sweep chose the route, before the send
    sent: float  # monotonic time the task was sent
    resent: int = 0  # tasks sent again since, none of them run

    def due(self, resend: float, now: float) -> bool:
        """Whether the task may be replaced: resend seconds after it was sent, twice and
        then four times that after replacements, so that workers slower than resend do
        not get a queue of tasks that all find nothing."""
        return now - self.sent >= resend * 2 ** min(self.resent, RESEND_DOUBLINGS)


class Outstanding:
    """The routes sent a task that may not have run yet, so that a sweep does
    not send them another; a task that has not run within resend seconds (the
    broker lost it, or a killed worker had it) is replaced then.

    A task has run once a mover took its route after the sweep chose it: the
    target's claims say when (qmover.protocol.claim), on the target's clock.
    """

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}  # route -> its task that may not have run yet
        self._chosen: dict[str, float] = {}  # route -> the target's clock when a sweep last found it ready

    def out(self, route: Route, taken: claim.Taken, resend: float, now: float) -> bool:
        """Whether the route has a task that has not run yet and is not due to be replaced."""
        sent = self._sent.get(route.name)
        if sent is not None and taken.last.get(route.consumer, float("-inf")) > sent.at:
            del self._sent[route.name]  # a mover took the route after the send
            sent = None
        if sent is not None and not sent.due(resend, now):
            return True
        self._chosen[route.name] = taken.now
        return False

    def forget(self, routes: Iterable[Route]) -> None:
        """These routes have nothing to move, or a mover holds them: once it lets go, a new task may go."""
        for route in routes:
            self._sent.pop(route.name, None)

    def sent(self, routes: Iterable[Route], now: float) -> None:
        """These routes (found not out()) have a task on its way."""
        for route in routes:
            before = self._sent.get(route.name)
            resent = before.resent + 1 if before is not None else 0
            self._sent[route.name] = _Sent(self._chosen.get(route.name, float("-inf")), now, resent)


class Sweeper:
    """Keeps one connection per database between sweeps, which databases are
    down, where each interval's slices are, and which routes have a task out."""

    def __init__(self) -> None:
        self.connector = Connector(connect_timeout=QUICK_CONNECT_TIMEOUT)
        self.outstanding = Outstanding()
        self._down: dict[tuple, tuple[Route, Side]] = {}  # database key -> a route to reach it by
        self._prober: threading.Thread | None = None  # runs while any database is down
        self._lock = threading.Lock()  # over _down, shared with the prober
        self._using = threading.RLock()  # over the connections and the rest, shared with the waker
        self.wakes = Wakes(self._using)
        self._next_slice: dict[float, int] = {}  # interval -> the slice its next sweep asks
        self._slicing: dict[float, tuple[tuple[Route, ...], list[list[Route]]]] = {}  # interval -> routes, slices
        self._overdue: dict[str, str] = {}  # route -> the holder it was said to hold it too long

    def sweep(self, routes: Sequence[Route], interval: float, send: Callable[[list[Route]], None]) -> Swept:
        """Ask the next slice of these routes' (one interval's) source databases, and
        send(ready routes); until the next few sweeps, send what their ticks wake too."""
        with self._using:
            swept = self._sweep(tuple(routes), interval)
            self._send(swept.ready, send)
            self.wakes.keep_alive(interval / swept.slices, functools.partial(self._woken, send=send))
        return swept

    def _woken(self, routes: list[Route], interval: float, send: Callable[[list[Route]], None]) -> None:
        """Sweep the routes of databases that ticked (the waker's), and send the ready ones."""
        ready = self.ready(routes, resend_after(interval), interval, woken=True)
        log.debug("wake: %d route(s) ticked, sent %s", len(routes), ", ".join(route.name for route in ready) or "none")
        self._send(ready, send)

    def _send(self, ready: list[Route], send: Callable[[list[Route]], None]) -> None:
        """Send the ready routes' tasks, and note them as on their way (the lock held)."""
        if ready:
            send(ready)
            self.outstanding.sent(ready, time.monotonic())

    def _sweep(self, routes: tuple[Route, ...], interval: float) -> Swept:
        cached = self._slicing.get(interval)
        if cached is None or cached[0] != routes:  # worked out again only when the routes change
            cached = self._slicing[interval] = (routes, sliced(routes, interval))
        slice_no = self._next_slice.get(interval, 0) % len(cached[1])
        self._next_slice[interval] = slice_no + 1
        mine = cached[1][slice_no]
        swept = Swept(slice_no, len(cached[1]), len(mine), self.ready(mine, resend_after(interval), interval))
        log.debug("sweep of slice %d/%d (%d routes): ready %s", swept.slice + 1, swept.slices, swept.routes,
                  ", ".join(route.name for route in swept.ready) or "none")
        return swept

    def ready(self, routes: Iterable[Route], resend: float, interval: float = 1.0, *,
              woken: bool = False) -> list[Route]:
        """The routes to move now: a batch may be ready, no mover on them, and
        no task of theirs waiting (for up to resend seconds); the most behind first.

        A scheduled sweep (not woken) leaves out the databases whose ticks wake
        it, but for a safety sweep now and then (qmover.protocol.wake)."""
        now = time.monotonic()
        found: list[tuple[float, Route]] = []
        for group in by_database(routes, "source"):
            key = database_of(group[0].src_dsn)
            listening = self.wakes.listening(key, interval, now)
            if listening and not woken:
                continue
            if listening and not any(route.collects for route in group):
                found += [(0.0, route) for route in group]  # it ticked: a batch is ready for each
                self.wakes.swept(key, now)
                continue
            rows = self._ask(group, "source", functools.partial(self._source_state, key, group, interval),
                             list[tuple]())
            self.wakes.swept(key, now)  # known to the wake once its first sweep listened
            if rows is not None:
                moving, idle = candidates(group, {(row[0], row[1]): row[2:] for row in rows}, resend)
                found += moving
                self.outstanding.forget(idle)  # their tasks, if any, have run
        waited = {route.name: seconds for seconds, route in found}
        ready: list[tuple[float, Route]] = []
        for group in by_database([route for _, route in found], "target"):
            taken = self._ask(group, "target", functools.partial(claim.claimed, routes=group), claim.Taken.unknown())
            if taken is None:
                continue
            for route in group:
                if route.consumer in taken.held:
                    self.outstanding.forget([route])
                    self._held(route, taken.held[route.consumer])
                elif not self.outstanding.out(route, taken, resend, now):
                    ready.append((waited[route.name], route))
        ready.sort(key=lambda pair: -pair[0])
        return [route for _, route in ready]

    def _source_state(self, key: tuple, group: list[Route], interval: float, src: Link) -> list[tuple]:
        """Where the group's consumers stand (Source.SWEEP_STATE), and the tick wake
        listened for where a route asks for it."""
        wake = any(route.wake_on_tick for route in group) or self.wakes.knows(key)
        if wake:
            self.wakes.listen(key, group, interval, src)
        rows = src.rows(Source.SWEEP_STATE, queues=[route.src_queue for route in group],
                        consumers=[route.consumer for route in group])
        if wake:
            self.wakes.trigger(key, src, bool(rows[0][-1]))
        return [row[:-1] for row in rows if row[0] is not None]

    def _held(self, route: Route, held: claim.Held) -> None:
        """Say once per claim when a mover has held a route with a batch ready for longer than it should."""
        if not held.overdue(route):
            self._overdue.pop(route.name, None)
        elif self._overdue.get(route.name) != held.holder:
            self._overdue[route.name] = held.holder
            log.warning("%s", held.said(route))

    def _ask(self, group: list[Route], side: Side, ask: Callable[[Link], T], otherwise: T) -> T | None:
        """What ask() finds on the group's database; None when it does not answer,
        otherwise when it answers but not as PgQ should (no pgq schema, say):
        the routes' movers will say what is wrong."""
        route = group[0]
        key = database_of(route.dsn(side))
        if key in self._down:
            return None
        try:
            return self.connector.run(route, side, ask)
        except (TransientError, LoginRefused) as exc:
            self._went_down(key, route, side, exc, len(group))
            return None
        except QmoverError:
            return otherwise

    def _went_down(self, key: tuple, route: Route, side: Side, exc: QmoverError, routes: int) -> None:
        log.warning("sweep: %s; its %d route(s) wait until it answers (asked every %g s)", exc, routes,
                    PROBE_EVERY)
        with self._lock:
            self._down[key] = (route, side)
            if self._prober is None:
                self._prober = threading.Thread(target=self._probe, name="qmover-sweep-probe", daemon=True)
                self._prober.start()

    def _probe(self) -> None:
        """Ask the databases that did not answer until each does; then sweeps take them back."""
        while True:
            time.sleep(PROBE_EVERY)
            with self._lock:
                if not self._down:
                    self._prober = None
                    return
            for key, (route, side) in list(self._down.items()):
                try:
                    self.connector.run(route, side, lambda link: link.value(Session.PING))
                except QmoverError:
                    continue
                del self._down[key]
                log.info("sweep: %s database (%s) answers again", side, route.display(side))

    def close(self) -> None:
        self.connector.close()
