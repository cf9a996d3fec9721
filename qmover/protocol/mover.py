"""The one move loop, and the mover of a process that runs it.

A Mover owns what a process keeps from one move to the next: its
connections (a Connector), its claims (Claims) and the checks its routes
passed (Preflight).  Mover.move() is the loop that `qmover run` and the
Celery task both go through: claim the routes, move one batch of each in
turn, again while some have more, until the budget passes or the caller
says stop, then finish the last batches and let the routes go.

Routes that share a database share its connection, so a loop holds one
connection per database however many routes it moves.  One route's failure
is its own: it is reported in its Outcome, and the others go on.  After an
error the route's source connection is closed rather than given back, so a
half-finished COPY never leaks into the next batch; its target connection
is closed only when it failed or was left in a transaction, so the loop's
claims on it stay.  Knows nothing of Celery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from qmover.config.route import Route
from qmover.errors import LostPosition, QmoverError, TransientError
from qmover.pg.connector import Connector, Loan, connection_key
from qmover.protocol import preflight
from qmover.protocol.batch import Checkpoint, Moved, finish_batch, move_batch, no_checkpoint
from qmover.protocol.claim import Claims
from qmover.protocol.preflight import Preflight

log = logging.getLogger(__name__)
UNFINISHED = "the route's next mover finishes the batch (the target's position skips it)"


@dataclass
class Outcome:
    """What one loop did for one route."""

    route: Route
    batches: int = 0  # applied on the target
    skipped: int = 0  # found applied already (after a crash, or by another mover): only finished
    events: int = 0
    filtered: int = 0
    busy: bool = False  # another mover held it
    error: QmoverError | None = None

    @property
    def moved(self) -> bool:
        """Whether a batch was applied or skipped: the route's position went forward."""
        return bool(self.batches or self.skipped)


@dataclass
class _Turns:
    """One route in the loop."""

    outcome: Outcome
    checkpoint: Checkpoint  # the caller's, for this route
    unfinished: int | None = None  # moved, not yet finished on the source: goes with the next request

    @property
    def route(self) -> Route:
        return self.outcome.route


def never() -> bool:
    return False


class Mover:
    """One process's mover: its connections, its claims and its checks, for
    move() after move(), on any number of threads at once.

    batch_log_level: the level of the line each batch logs.  `qmover run`
    keeps INFO, as skytools' daemon does; a Celery worker logs at DEBUG, since
    its task's result line at INFO already says what each route moved, and a
    line per batch was an eighth of the pool's time under a steady fan-in.
    """

    def __init__(self, connector: Connector | None = None, batch_log_level: int = logging.INFO) -> None:
        self.connector = connector or Connector()
        self.claims = Claims()
        self.preflight = Preflight()
        self.batch_log_level = batch_log_level

    def move(self, routes: Sequence[Route], budget: float, *, stop: Callable[[], bool] = never,
             checkpoint: Callable[[Route, str], None] | None = None,
             moved: Callable[[Route, Moved], None] | None = None) -> list[Outcome]:
        """Move the routes' ready batches, one batch of each in turn, for up to budget seconds.

        stop(): asked between batches; True ends the loop early.
        checkpoint(route, step): called at each step of the move protocol (see
        qmover.protocol.batch.Checkpoint), where tests fail or kill a mover.
        moved(route, batch): called after each batch the target committed.
        """
        started = time.monotonic()
        outcomes = [Outcome(route) for route in routes]
        capped = frozenset(connection_key(route.src_dsn) for route in routes
                           if route.max_source_connections is not None)
        with Loan(self.connector, close_after=capped) as loan:
            claim = self.claims.take(loan, routes)
            turns = []
            for outcome in outcomes:
                outcome.busy = outcome.route in claim.busy
                outcome.error = claim.failed.get(outcome.route)
                if outcome.route in claim.routes:
                    steps = no_checkpoint if checkpoint is None else partial(checkpoint, outcome.route)
                    turns.append(_Turns(outcome, steps))
            try:
                active = turns
                while active and not stop() and time.monotonic() - started < budget:
                    claim.renew()
                    held = set(claim.routes)
                    active = [turn for turn in active if turn.route in held and self._turn(loan, turn, moved)]
            finally:
                for turn in turns:
                    self._finish(loan, turn)
                loan.close_capped()  # closed before their places go back: another mover may open one then
                claim.release()
        return outcomes

    def _turn(self, loan: Loan, turn: _Turns, moved: Callable[[Route, Moved], None] | None) -> bool:
        """One batch of the route; whether it may have another ready now."""
        route = turn.route
        if not loan.has(route, "target"):
            return False  # its target connection failed under another route, and the claim went with it
        checked = None
        try:
            src, dst = loan.link(route, "source"), loan.link(route, "target")
            via_insert_event = self.preflight.via_insert_event(route, src, dst)
            checked = src, dst
            done = move_batch(route, src, dst, finish=turn.unfinished, via_insert_event=via_insert_event,
                              checkpoint=turn.checkpoint)
        except QmoverError as exc:
            turn.unfinished = None  # the batch comes back, and the target's position skips it
            self.preflight.forget(route)
            found = None
            if checked is not None and not isinstance(exc, (TransientError, LostPosition)):
                found = preflight.diagnose(*checked)  # what went wrong meanwhile, with its fix
            loan.discard(route, "source")
            if loan.has(route, "target") and (exc.side == "target" and isinstance(exc, TransientError)
                                              or not loan.link(route, "target").idle):
                loan.discard(route, "target")
            turn.outcome.error = found or exc
            return False
        except BaseException:
            loan.discard(route, "source")
            loan.discard(route, "target")
            raise
        turn.unfinished = None if done is None else done.batch_id
        if done is None:
            return False
        self._count(turn.outcome, done)
        if moved is not None:
            moved(route, done)
        return done.more

    def _count(self, outcome: Outcome, done: Moved) -> None:
        route = outcome.route
        if done.unplaced:
            log.warning("route %s: the target held no position for consumer %r; started from the source's "
                        "(batch %d): expected once on a new route; otherwise the target's pgq_ext was reset, and "
                        "events moved before the reset are not moved again", route.name, route.consumer,
                        done.batch_id)
        if done.skipped:
            outcome.skipped += 1
            log.log(self.batch_log_level, "route=%s batch=%d skipped: already applied on target ms=%.1f",
                    route.name, done.batch_id, done.seconds * 1000)
            return
        outcome.batches += 1
        outcome.events += done.events
        outcome.filtered += done.filtered
        log.log(self.batch_log_level, "route=%s batch=%d events=%d%s ms=%.1f", route.name, done.batch_id,
                done.events, f" filtered={done.filtered}" if done.filtered else "", done.seconds * 1000)

    @staticmethod
    def _finish(loan: Loan, turn: _Turns) -> None:
        """Finish on the source the last batch the route moved, on its own."""
        route, batch_id, turn.unfinished = turn.route, turn.unfinished, None
        if batch_id is None or not loan.has(route, "source"):
            return
        try:
            finish_batch(route, loan.link(route, "source"), batch_id, turn.checkpoint)
        except QmoverError as exc:
            loan.discard(route, "source")
            log.warning("%s; %s", exc, UNFINISHED)
        except BaseException:
            loan.discard(route, "source")
            raise

    def close(self) -> None:
        """Close the connections kept between moves."""
        self.connector.close()

    def __enter__(self) -> Mover:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
