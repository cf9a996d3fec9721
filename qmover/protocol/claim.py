"""The route claim: one mover per route at a time, across threads, processes and hosts.

Two holds, both needed: the in-process one (Holds: a PostgreSQL session can
take its own advisory lock twice, so the threads or greenlets of one process
are kept apart first), then a session advisory lock on the task's target
connection, which ends with release() or with the connection, so a
killed worker never keeps a route.  The routes of one target database are
claimed in one statement.  A route whose source is capped
(max_source_connections) also takes one of its source's places, on the same
target connection, before the task may open that source.

The per-consumer lock inside the move protocol stays the last line of
defence: a claim only keeps movers from doing the same work twice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qmover.config.route import Route, by_database, database_of
from qmover.errors import QmoverError, TransientError
from qmover.pg import db, queries
from qmover.pg.connector import Loan, once_more_if_stale


def source_name(route: Route) -> str:
    """The source database, as slot locks name it (whoever logs in)."""
    return " ".join(part or "" for part in database_of(route.src_dsn))


def on_target(loan: Loan, route: Route, query: str, params: Any) -> list[tuple]:
    """One statement on the loan's connection to the route's target (a stale
    kept connection replaced once, see once_more_if_stale); a connection that
    fails is closed, and whatever it had locked with it."""

    def attempt() -> list[tuple]:
        session = loan.session(route, "target")
        with db.errors(route, "target"), session.conn.cursor() as cur:
            cur.execute(query, params)
            rows = cur.fetchall()
        session.reused = False
        return rows

    try:
        return once_more_if_stale(attempt, loan, route)
    except TransientError:
        loan.discard(route, "target")
        raise


class Holds:
    """The in-process half of the claim: the routes a task of this process
    holds.  Thread- and greenlet-safe; after a fork the child starts empty."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[tuple] = set()
        self._pid = os.getpid()

    def take(self, route: Route) -> bool:
        """False when another task of this process holds the route."""
        key = (database_of(route.dst_dsn), route.consumer)
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._held = os.getpid(), set()
            if key in self._held:
                return False
            self._held.add(key)
            return True

    def give_back(self, route: Route) -> None:
        with self._lock:
            self._held.discard((database_of(route.dst_dsn), route.consumer))


HOLDS = Holds()  # this process's


@dataclass
class Claim:
    """The routes a task took, and what kept it from the others."""

    loan: Loan
    routes: list[Route] = field(default_factory=list)  # held by this task
    busy: list[Route] = field(default_factory=list)  # held by another mover, or no place at their source
    failed: dict[Route, QmoverError] = field(default_factory=dict)  # their target did not answer
    _slots: list[tuple[Route, str, int]] = field(default_factory=list)  # (a route of the source, source, place)

    def release(self) -> None:
        """Give every route and place back; a connection that fails is closed, which releases them too."""
        for group in by_database(self.routes, "target"):
            if not self.loan.has(group[0], "target"):
                continue  # the connection is gone, and its locks with it
            try:
                for route, source, slot in [s for s in self._slots if s[0] in group]:
                    on_target(self.loan, route, queries.RELEASE_SOURCE_SLOT, {"source": source, "slot": slot})
                on_target(self.loan, group[0], queries.RELEASE_ROUTES, ([route.consumer for route in group],))
            except QmoverError:
                self.loan.discard(group[0], "target")
        for route in self.routes:
            HOLDS.give_back(route)
        self.routes, self._slots = [], []


def take(loan: Loan, routes: Sequence[Route]) -> Claim:
    """Claim the routes that no other mover holds."""
    claim = Claim(loan)
    held: list[Route] = []
    for route in routes:
        (held if HOLDS.take(route) else claim.busy).append(route)
    for group in by_database(held, "target"):
        try:
            got = {row[0] for row in on_target(loan, group[0], queries.CLAIM_ROUTES,
                                               ([route.consumer for route in group],))}
            mine = [route for route in group if route.consumer in got]
            claim.busy += [route for route in group if route.consumer not in got]
            claim.routes += mine
            _take_places(claim, mine)
        except QmoverError as exc:
            loan.discard(group[0], "target")  # with whatever it had locked
            claim.failed.update(dict.fromkeys(group, exc))
            claim.routes = [route for route in claim.routes if route not in group]
        for route in group:
            if route not in claim.routes:
                HOLDS.give_back(route)
    return claim


def _take_places(claim: Claim, routes: list[Route]) -> None:
    """For each capped source among routes (one target), one of its places, or its routes go back."""
    capped: dict[str, list[Route]] = {}
    for route in routes:
        if route.max_source_connections is not None:
            capped.setdefault(source_name(route), []).append(route)
    for source, group in capped.items():
        slots = min(route.max_source_connections or 1 for route in group)
        row = on_target(claim.loan, group[0], queries.TAKE_SOURCE_SLOT, {"source": source, "slots": slots})
        if row:
            claim._slots.append((group[0], source, row[0][0]))
            continue
        on_target(claim.loan, group[0], queries.RELEASE_ROUTES, ([route.consumer for route in group],))
        claim.routes = [route for route in claim.routes if route not in group]
        claim.busy += group
