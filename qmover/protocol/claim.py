"""The route claim: one mover per route at a time, across threads, processes and hosts.

Everything about claims is here: taking them, letting go, and telling the
readiness sweep which routes a mover holds.  Two holds, both needed: the
in-process one (a PostgreSQL session can take its own advisory lock twice,
so the threads or greenlets of one process are kept apart first), then a
session advisory lock on the task's target connection (Claims.CLAIM), which
ends with release() or with the connection, so a worker that dies never
keeps a route.  The routes of one target database are claimed in one
statement.  A route whose source is capped (max_source_connections) also
takes one of its source's places, on the same target connection, before
the task may open that source.

The per-consumer lock inside the move protocol stays the last line of
defence: a claim only keeps movers from doing the same work twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from qmover.config.route import Route, by_database, database_of
from qmover.errors import QmoverError, TransientError
from qmover.pg import queries
from qmover.pg.connector import Loan
from qmover.pg.session import Link

log = logging.getLogger(__name__)


def source_name(route: Route) -> str:
    """The source database, as place locks name it (whoever logs in)."""
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
                got = {row[0] for row in claim.on_target(group[0], queries.Claims.CLAIM,
                                                         consumers=[route.consumer for route in group])}
                claim.routes += [route for route in group if route.consumer in got]
                claim.busy += [route for route in group if route.consumer not in got]
                claim.take_places([route for route in group if route.consumer in got])
            except QmoverError as exc:
                loan.discard(group[0], "target")  # with whatever it had locked
                claim.failed.update(dict.fromkeys(group, exc))
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
    places: list[tuple[Route, str, int]] = field(default_factory=list)  # (a route of the source, source, place)

    def on_target(self, route: Route, statement: queries.Statement, **params: object) -> list[tuple]:
        """One claim statement on the loan's connection to the route's target; a
        connection that fails is closed, and whatever it had locked with it."""
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
            row = self.on_target(group[0], queries.Claims.TAKE_PLACE, source=source, places=places)
            if row:
                self.places.append((group[0], source, row[0][0]))
                continue
            self.on_target(group[0], queries.Claims.RELEASE, consumers=[route.consumer for route in group])
            self.routes = [route for route in self.routes if route not in group]
            self.busy += group

    def release(self) -> None:
        """Give every route and place back; a connection that fails is closed, which releases them too."""
        for group in by_database(self.routes, "target"):
            if not self.loan.has(group[0], "target"):
                continue  # the connection is gone, and its locks with it
            try:
                for route, source, place in [p for p in self.places if p[0] in group]:
                    self.on_target(route, queries.Claims.RELEASE_PLACE, source=source, place=place)
                self.on_target(group[0], queries.Claims.RELEASE, consumers=[route.consumer for route in group])
            except QmoverError:
                self.loan.discard(group[0], "target")
        self.claims.let_go(self.routes)
        self.routes, self.places = [], []


def claimed(dst: Link, routes: Sequence[Route]) -> set[str]:
    """The consumers among these routes' (one target database) that a mover holds now."""
    return {row[0] for row in dst.rows(queries.Claims.CLAIMED, consumers=[route.consumer for route in routes])}
