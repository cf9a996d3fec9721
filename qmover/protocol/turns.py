"""Several routes moved in turn on one loan: what one move task does with the routes a sweep gave it.

The task claims its routes (qmover.protocol.claim), then moves one batch of each in
turn, again and again while some have more, until move_budget has passed;
a route's last finish goes alone (PgQ keeps it cheap: no flush waited for).
Routes that share a database share its connection, so a task holds one
connection per database however many routes it moves.  One route's failure
is its own: it is reported, and the others go on.  Knows nothing of Celery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from qmover.config.route import Route
from qmover.errors import QmoverError
from qmover.pg.connector import Connector, Loan, connection_key
from qmover.protocol import claim
from qmover.protocol.batch import no_checkpoint
from qmover.protocol.mover import UNFINISHED, RouteMover, log


@dataclass
class Outcome:
    """What a task did for one route."""

    route: Route
    batches: int = 0  # applied, or found applied (skipped)
    events: int = 0
    filtered: int = 0
    skipped: int = 0
    busy: bool = False  # another mover held it
    error: QmoverError | None = None


def move_in_turn(routes: Sequence[Route], connector: Connector, budget: float,
                 checkpoint: Callable[[Route, str], None] | None = None) -> list[Outcome]:
    """Move the routes' ready batches, one batch of each in turn, for up to budget seconds.

    checkpoint(route, step): called at each step of the move protocol (see
    qmover.protocol.batch.Checkpoint), where tests fail a route.
    """
    started = time.monotonic()
    outcomes = {route: Outcome(route) for route in routes}
    capped = frozenset(connection_key(route.src_dsn) for route in routes if route.max_source_connections is not None)
    with Loan(connector, close_after=capped) as loan:
        taken = claim.take(loan, routes)
        for route in taken.busy:
            outcomes[route].busy = True
        for route, exc in taken.failed.items():
            outcomes[route].error = exc
        movers = [RouteMover(route, loan=loan, checkpoint=partial(checkpoint, route) if checkpoint else no_checkpoint)
                  for route in taken.routes]
        try:
            active = movers
            while active and time.monotonic() - started < budget:
                active = [mover for mover in active if _turn(mover, outcomes[mover.route])]
        finally:
            for mover in movers:
                try:
                    mover.finish()
                except QmoverError as exc:
                    log.warning("%s; %s", exc, UNFINISHED)
            taken.release()
    return list(outcomes.values())


def _turn(mover: RouteMover, outcome: Outcome) -> bool:
    """One batch of the route; whether it may have another ready now."""
    if not mover.loan.has(mover.route, "target"):
        return False  # its target connection failed under another route, and the claim went with it
    try:
        moved = mover.move_one()
    except QmoverError as exc:
        outcome.error = exc
        return False
    if moved is None:
        return False
    outcome.batches += 1
    outcome.events += moved.events
    outcome.filtered += moved.filtered
    outcome.skipped += int(moved.skipped)
    return moved.more
