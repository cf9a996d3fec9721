"""The route claim: one mover per route at a time, across threads, processes and hosts.

Everything about claims is here: taking them, renewing them, letting go,
and telling the readiness sweep which routes a mover holds and when each
was last taken (whether the task it sent has run).  Two holds,
both needed: the in-process one (the threads or greenlets of one process
share nothing on the server, so they are kept apart first), then a lease in
the target's qmover.claim table (claims.sql), taken on the task's target
connection.  A lease ends when the mover gives it back, when the session
that took it ends, or LEASE seconds after its last renewal: a worker the
network cut off, or one whose pooled server session outlives it, gives its
routes up within LEASE whether or not anybody notices it is gone.  The
routes of one target database are claimed in one statement.  A route whose
source is capped (max_source_connections) also takes one of its source's
places, on the same target connection, before the task may open that source.

The per-consumer lock inside the move protocol stays the last line of
defence: a claim only keeps movers from doing the same work twice, so two
movers that overlap for a moment (a lease that ran out under a batch longer
than LEASE) still apply each batch once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from qmover.config.route import Route, by_database, database_of
from qmover.errors import QmoverError, TransientError
from qmover.pg import queries
from qmover.pg.connector import Loan
from qmover.pg.db import NOT_ALLOWED, where
from qmover.pg.session import Link

log = logging.getLogger(__name__)
LEASE = 15.0  # seconds a claim lasts unless renewed
RENEW_EVERY = LEASE / 3  # seconds between renewals, while the mover moves
HELD_TOO_LONG = 30.0  # seconds past its move_budget a claim may last before the sweep and status say so
# What the server says when claims.sql was never run there, or the role may not use it.
NOT_INSTALLED = ("42P01", "3F000")


def source_name(route: Route) -> str:
    """The source database, as its places are named in qmover.claim (whoever logs in)."""
    return " ".join(part or "" for part in database_of(route.src_dsn))


def holder_key(route: Route) -> tuple:
    """What one claim covers: a consumer on a target database."""
    return database_of(route.dst_dsn), route.consumer


class Claims:
    """The claims of one process's movers.  Thread- and greenlet-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[tuple] = set()  # holder_key of the routes a task of this process holds

    def take(self, loan: Loan, routes: Sequence[Route]) -> Claim:
        """Claim the routes that no other mover holds, on the loan's target connections."""
        claim = Claim(self, loan)
        mine = self.hold(routes)
        claim.busy += [route for route in routes if route not in mine]
        for group in by_database(mine, "target"):
            try:
                got = {row[0] for row in claim.on_target(group[0], queries.Claims.CLAIM, holder=holder(),
                                                         lease=LEASE, consumers=[route.consumer for route in group])}
                claim.routes += [route for route in group if route.consumer in got]
                claim.busy += [route for route in group if route.consumer not in got]
                claim.take_places([route for route in group if route.consumer in got])
            except QmoverError as exc:
                loan.discard(group[0], "target")  # with whatever it had claimed
                claim.failed.update(dict.fromkeys(group, explained(group[0], exc)))
                claim.routes = [route for route in claim.routes if route not in group]
        self.let_go(route for route in mine if route not in claim.routes)
        if claim.busy:
            log.debug("routes another mover holds, left to it: %s", ", ".join(route.name for route in claim.busy))
        return claim

    def hold(self, routes: Iterable[Route]) -> list[Route]:
        """The in-process half: those of the routes no task of this process holds, held now for the caller."""
        with self._lock:
            mine = [route for route in routes if holder_key(route) not in self._held]
            self._held.update(holder_key(route) for route in mine)
        return mine

    def let_go(self, routes: Iterable[Route]) -> None:
        """The in-process holds of routes no task of this process moves any more."""
        with self._lock:
            self._held.difference_update(holder_key(route) for route in routes)


@dataclass
class Claim:
    """The routes one task took, and what kept it from the others."""

    claims: Claims
    loan: Loan
    routes: list[Route] = field(default_factory=list)  # held by this task
    busy: list[Route] = field(default_factory=list)  # held by another mover, or no place at their source
    failed: dict[Route, QmoverError] = field(default_factory=dict)  # their target did not answer
    renewed: float = field(default_factory=time.monotonic)

    def on_target(self, route: Route, statement: queries.Statement, **params: object) -> list[tuple]:
        """One claim statement on the loan's connection to the route's target; a
        connection that fails is closed, and whatever it had claimed with it."""
        try:
            return self.loan.link(route, "target").rows(statement, **params)
        except TransientError:
            self.loan.discard(route, "target")
            raise

    def take_places(self, routes: list[Route]) -> None:
        """For each capped source among routes (one target), one of its places, or its routes go back."""
        capped: dict[str, list[Route]] = {}
        for route in routes:
            if route.max_source_connections is not None:
                capped.setdefault(source_name(route), []).append(route)
        for source, group in capped.items():
            places = min(route.max_source_connections or 1 for route in group)
            if self.on_target(group[0], queries.Claims.TAKE_PLACE, source=source, places=places, holder=holder(),
                              lease=LEASE):
                continue
            self.on_target(group[0], queries.Claims.RELEASE, consumers=[route.consumer for route in group])
            self.routes = [route for route in self.routes if route not in group]
            self.busy += group

    def renew(self) -> None:
        """Every RENEW_EVERY seconds, a new deadline for each claim; a route
        whose claim another mover took meanwhile (its lease ran out) is let go."""
        if time.monotonic() - self.renewed < RENEW_EVERY:
            return
        self.renewed = time.monotonic()
        kept: list[Route] = []
        for group in by_database(self.routes, "target"):
            if not self.loan.has(group[0], "target"):
                continue  # the connection is gone, and its claims with it
            try:
                held = {name for kind, name in self.on_target(group[0], queries.Claims.RENEW, lease=LEASE)
                        if kind == "route"}
            except QmoverError:
                self.loan.discard(group[0], "target")
                continue
            kept += [route for route in group if route.consumer in held]
        lost = [route for route in self.routes if route not in kept]
        if lost:
            log.info("claims run out and taken by another mover, or lost with their connection: %s",
                     ", ".join(route.name for route in lost))
            self.routes = kept
            self.claims.let_go(lost)

    def release(self) -> None:
        """Give every route and place back; a connection that fails is closed, which ends them too."""
        for group in by_database(self.routes, "target"):
            if not self.loan.has(group[0], "target"):
                continue  # the connection is gone, and its claims with it
            try:
                self.on_target(group[0], queries.Claims.RELEASE_ALL)
            except QmoverError:
                self.loan.discard(group[0], "target")
        self.claims.let_go(self.routes)
        self.routes = []


def holder() -> str:
    """Who holds a claim, as status and the log show it: host and process."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def not_installed(route: Route) -> QmoverError:
    return QmoverError(f"{where(route, 'target')}: qmover's claim table (qmover.claim) is missing, so routes "
                       f"cannot be claimed; run: qmover install CONFIG --route {route.name}", "target")


def explained(route: Route, exc: QmoverError) -> QmoverError:
    """A claim statement's error, with the fix when the target lacks qmover's claims or the right to them."""
    if exc.sqlstate in NOT_INSTALLED:
        return not_installed(route)
    if exc.sqlstate == NOT_ALLOWED:
        return QmoverError(f"{where(route, 'target')}: the role may not claim routes in qmover.claim; grant it "
                           f"pgq_writer (or INSERT, UPDATE, DELETE on qmover.claim)", "target", exc.sqlstate)
    return exc


@dataclass(frozen=True)
class Held:
    """A live claim of a route, as the sweep and status see it."""

    holder: str
    seconds: float  # since it was taken

    def overdue(self, route: Route) -> bool:
        """Held for longer than a task of the route should take, by more than HELD_TOO_LONG."""
        return self.seconds - route.move_budget > HELD_TOO_LONG

    def said(self, route: Route) -> str:
        return (f"route {route.name}: held by {self.holder} for {self.seconds:.0f} s, beyond its move_budget "
                f"({route.move_budget:g} s) by more than {HELD_TOO_LONG:g} s: that mover is stuck or cut off; "
                f"its claim ends {LEASE:g} s after its last renewal, or with its session")


@dataclass(frozen=True)
class Taken:
    """What the sweep and status read of the claims of some routes on one target database."""

    now: float  # the server's clock when read (epoch seconds)
    held: dict[str, Held]  # consumer -> its live claim
    last: dict[str, float]  # consumer -> when a mover last took it (epoch seconds), held still or given back

    @classmethod
    def unknown(cls) -> Taken:
        """What a target without qmover's claims says: nothing held, and no task seen to run."""
        return cls(float("-inf"), {}, {})


def claimed(dst: Link, routes: Sequence[Route]) -> Taken:
    """Who holds these routes (of one target database) now, and when each was last taken."""
    try:
        rows = dst.rows(queries.Claims.CLAIMED, consumers=[route.consumer for route in routes])
    except QmoverError as exc:
        raise explained(dst.route, exc) from None
    now = rows[0][4] if rows else float("-inf")
    return Taken(now, {consumer: Held(who, seconds) for consumer, who, seconds, _, _ in rows if who is not None},
                 {consumer: since for consumer, _, _, since, _ in rows if since is not None})
