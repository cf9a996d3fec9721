"""`qmover run`: move batches of several routes in a loop, like skytools' daemon.

Round after round of the one move loop (qmover.protocol.mover), sleeping
loop_delay when a round moved nothing.  A route whose error needs an
operator (lost position, missing queue, ...) stops; the others go on.
Connection errors are retried with a growing delay, except with --once,
which reports them and exits non-zero.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from qmover.config.route import Route
from qmover.errors import TransientError
from qmover.ops.metrics import Counters
from qmover.protocol.mover import Mover, Outcome

log = logging.getLogger(__name__)
MAX_RETRY_DELAY = 60.0


class Stop:
    """Set by signals: `requested` stops after the batch in hand, `abort` at once.

    Plain flags, not threading.Event: a signal handler that calls Event.set()
    deadlocks when the signal lands while the main thread holds the Event's
    lock inside wait().
    """

    def __init__(self) -> None:
        self.requested = False
        self.abort = False

    def sleep(self, seconds: float) -> None:
        """Sleep, waking within 50 ms of a stop request."""
        end = time.monotonic() + seconds
        while not self.requested and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.05, left))


@contextmanager
def stop_on_signals(stop: Stop) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the batch in hand, then stop. Second: abort it."""

    def handle(signum: int, _frame: object) -> None:
        if stop.requested:
            stop.abort = True
            raise KeyboardInterrupt  # the target transaction rolls back
        stop.requested = True
        log.info("got %s: stopping after the batch in hand", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Backoff:
    """One route's standing in the loop: stopped, or when it may move again."""

    stopped: bool = False  # an error that needs an operator
    retries: int = 0  # connection errors in a row
    retry_at: float = 0.0  # monotonic time before which it is left out

    def due(self, now: float) -> bool:
        return not self.stopped and now >= self.retry_at

    def failed(self, delay_base: float, now: float) -> float:
        """Count a connection error; the delay before the route's next turn."""
        self.retries += 1
        delay = min(MAX_RETRY_DELAY, delay_base * 2 ** self.retries)
        self.retry_at = now + delay
        return delay


def run(routes: list[Route], *, once: bool, stop: Stop | None = None, counters: Counters | None = None) -> int:
    """Move until stopped (or, with once, until no route has a batch ready).

    Each round is the move loop (qmover.protocol.mover) over the routes that
    are due, claims included: a route another mover holds waits for it.
    counters: where each round's outcomes are counted (qmover.ops.metrics).

    Returns the exit code: 0, or 1 when a route failed.  Raises
    KeyboardInterrupt when a second signal aborted the batch in hand.
    """
    stop = stop or Stop()
    mover = Mover()
    standing = {route: Backoff() for route in routes}
    try:
        while not stop.requested and not all(backoff.stopped for backoff in standing.values()):
            now = time.monotonic()
            due = [route for route in routes if standing[route].due(now)]
            outcomes = mover.move(due, min((route.move_budget for route in due), default=0.0),
                                  stop=lambda: stop.requested)
            if stop.abort:  # the driver may have turned our interrupt into an error
                raise KeyboardInterrupt
            if counters:  # what moved or failed: an idle round costs the counters' Redis nothing
                counters.record([outcome for outcome in outcomes if outcome.moved or outcome.error])
            for outcome in outcomes:
                _after(outcome, standing[outcome.route], once)
            if not any(outcome.moved for outcome in outcomes):
                if once:
                    break
                stop.sleep(min((route.loop_delay for route in routes if not standing[route].stopped), default=0))
    finally:
        mover.close()
    return 1 if any(backoff.stopped for backoff in standing.values()) else 0


def _after(outcome: Outcome, backoff: Backoff, once: bool) -> None:
    """A route's round: its error logged, and the route stopped or its retry put off."""
    exc = outcome.error
    if outcome.busy and once:
        log.info("route %s: another mover holds it (a worker, or another qmover run): left to it", outcome.route.name)
    if exc is None:
        backoff.retries = 0
        return
    if once or not isinstance(exc, TransientError):
        log.error("%s; route stopped", exc)
        backoff.stopped = True
        return
    log.error("%s; retrying in %.1fs", exc, backoff.failed(outcome.route.loop_delay, time.monotonic()))
