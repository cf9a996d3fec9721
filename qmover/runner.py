"""`qmover run`: move batches of several routes in a loop, like skytools' daemon.

A route whose error needs an operator (lost position, missing queue, ...)
stops; the others go on.  Connection errors are retried with a growing
delay, except with --once, which reports them and exits non-zero.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from qmover.config.route import Route
from qmover.errors import QmoverError, TransientError
from qmover.ops.metrics import Counters
from qmover.pg.connector import Connector
from qmover.protocol.mover import RouteMover

log = logging.getLogger("qmover")
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
class RouteTurns:
    """One route in the loop: its mover, and how its failures stand."""

    mover: RouteMover
    stopped: bool = False  # an error that needs an operator
    retries: int = 0  # connection errors in a row
    retry_at: float = 0.0  # monotonic time before which it is skipped

    def due(self) -> bool:
        return not self.stopped and time.monotonic() >= self.retry_at

    def failed(self, delay_base: float) -> float:
        """Count a connection error; the delay before the next turn."""
        self.retries += 1
        delay = min(MAX_RETRY_DELAY, delay_base * 2 ** self.retries)
        self.retry_at = time.monotonic() + delay
        return delay


def run(routes: list[Route], *, once: bool, stop: Stop | None = None, counters: Counters | None = None) -> int:
    """Move until stopped (or, with once, until no route has a batch ready).

    counters: where each batch and failure is counted (qmover.ops.metrics).

    Returns the exit code: 0, or 1 when a route failed.  Raises
    KeyboardInterrupt when a second signal aborted the batch in hand.
    """
    stop = stop or Stop()
    connector = Connector()
    turns = [RouteTurns(RouteMover(route, connector=connector)) for route in routes]
    try:
        while not stop.requested:
            active = [turn for turn in turns if not turn.stopped]
            if not active:
                break
            busy = False
            for turn in active:
                mover = turn.mover
                if stop.requested or not turn.due():
                    continue
                try:
                    moved = mover.move_one()
                    # Its connections may serve the next route of the same database; the
                    # batch's finish goes with the route's next turn.
                    mover.release(finish=False)
                except QmoverError as exc:
                    if stop.abort:  # the driver turned our interrupt into an error
                        raise KeyboardInterrupt from None
                    if counters:
                        counters.record(mover.route, errors=1)
                    if once or not isinstance(exc, TransientError):
                        log.error("%s; route stopped", exc)
                        turn.stopped = True
                        continue
                    log.error("%s; retrying in %.1fs", exc, turn.failed(mover.route.loop_delay))
                    continue
                turn.retries = 0
                busy = busy or moved is not None
                if counters and moved is not None:
                    counters.record(mover.route, events=moved.events, filtered=moved.filtered,
                                    batches=int(not moved.skipped), skipped=int(moved.skipped))
            if not busy:
                if once:
                    break
                stop.sleep(min(turn.mover.route.loop_delay for turn in active))
        for turn in turns:
            turn.mover.finish_pending()
    finally:
        for turn in turns:
            turn.mover.close()
        connector.close()
    return 1 if any(turn.stopped for turn in turns) else 0
