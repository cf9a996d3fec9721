"""A route: one source queue, one consumer, one target queue."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from psycopg2.extensions import parse_dsn

# DSN parts that are safe to show in logs and status output.
_SHOWN_DSN_KEYS = ("service", "host", "hostaddr", "port", "dbname", "user")


@lru_cache(maxsize=4096)  # sweeps ask it for every route every interval
def database_of(dsn: str) -> tuple[str | None, ...]:
    """Which database a DSN names, whoever logs in (user and password left out).

    qmover's one notion of "the same database": routes are grouped by it for
    sweeps, ticks, status, claims and loop checks (which then also compare
    what the servers report, since two host names can reach one server).
    """
    parts = parse_dsn(dsn)
    return tuple(parts.get(key) for key in ("service", "host", "hostaddr", "port", "dbname"))


def by_database(routes: Iterable[Route], side: str) -> list[list[Route]]:
    """The routes grouped by the database of one side (database_of), in first-seen order."""
    groups: dict[tuple, list[Route]] = {}
    for route in routes:
        groups.setdefault(database_of(route.dsn(side)), []).append(route)
    return list(groups.values())


def describe_dsn(dsn: str) -> str:
    """The DSN without password or other options, for messages and status."""
    parts = parse_dsn(dsn)
    shown = [f"{key}={parts[key]}" for key in _SHOWN_DSN_KEYS if key in parts]
    return " ".join(shown) or "(libpq defaults)"


SPLIT_FIELDS = ("ev_type", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4")
RouteKind = Literal["queue", "split"]


@dataclass(frozen=True)
class Split:
    """Each event goes to the target queue its field names (queue_splitter's job).

    With a mapping, only mapped values are known; without one, a value is
    known when a queue of that name exists on the target.  Unknown values
    (and NULL) follow ``unknown``: "error", "skip", or the name of a queue.
    """

    field: str
    mapping: tuple[tuple[str, str], ...] = ()
    unknown: str = "error"

    def queue_for(self, value: str | None, existing: set[str]) -> str | None:
        """The queue for a value; None to leave its events out.  Raises LookupError
        for an unknown value under split_unknown = error."""
        if value is not None:
            if self.mapping:
                mapped = dict(self.mapping).get(value)
                if mapped is not None:
                    return mapped
            elif value in existing:
                return value
        if self.unknown == "error":
            raise LookupError(value)
        return None if self.unknown == "skip" else self.unknown

    @property
    def known_queues(self) -> tuple[str, ...]:
        """Queues that must exist before anything moves."""
        fallback = () if self.unknown in ("error", "skip") else (self.unknown,)
        return tuple(dict.fromkeys([queue for _, queue in self.mapping] + list(fallback)))


@dataclass(frozen=True, eq=False)
class Route:
    """Everything the move protocol needs to know about one route.

    Batch sizing follows skytools: ``min_count`` / ``min_interval`` ask PgQ to
    merge ticks into bigger batches, ``keep_lag`` holds events back.
    """

    name: str
    consumer: str
    src_dsn: str
    dst_dsn: str
    src_queue: str
    dst_queue: str | None  # None: a split route, whose events pick their queues
    min_count: int | None = None
    min_interval: float | None = None
    keep_lag: float | None = None
    loop_delay: float = 1.0
    move_interval: float = 1.0  # Celery beat: seconds between move_next_batch tasks
    move_budget: float = 10.0  # Celery: seconds one task keeps moving ready batches
    ticker: tuple[str, ...] = ()  # sides ("source", "target") ticked by Celery beat
    ticker_interval: float = 1.0
    type_filter: tuple[str, ...] = ()  # ev_type patterns, * as wildcard: only these move
    table_filter: tuple[str, ...] = ()  # schema-qualified names in ev_extra1: only these move
    keep_event_id: bool = False  # write the source ev_id on the target (the route owns its target queue)
    split: Split | None = None  # several target queues chosen per event (kind "split")
    # Celery: at most this many worker connections to the source database at
    # once, closed after each task (None: one per worker process, kept open)
    max_source_connections: int | None = None
    merge_ticks: bool = True  # a route behind takes its waiting ticks as one batch (see qmover.protocol.batch)
    # Celery: the source's ticks wake beat's sweep (a trigger, qmover.protocol.wake) instead of a
    # sweep once a move_interval
    wake_on_tick: bool = False

    def __eq__(self, other: object) -> bool:
        """Every field equal, as a dataclass compares, in a tenth of its time
        (0.1 against 1 us): loops and sweeps look routes up in lists and sets."""
        return self is other or (type(other) is Route and self.__dict__ == other.__dict__)

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def collects(self) -> bool:
        """Whether its batches wait for more than the next tick (keep_lag, min_count, min_interval)."""
        return self.keep_lag is not None or self.min_count is not None or self.min_interval is not None

    @property
    def kind(self) -> RouteKind:
        """"queue": every event into dst_queue; "split": each into the queue its field names."""
        return "split" if self.split else "queue"

    @property
    def target_queues(self) -> tuple[str, ...]:
        """The target queues known before moving (a split route finds more per batch)."""
        if self.split is not None:
            return self.split.known_queues
        assert self.dst_queue is not None, "a route that does not split has a target queue"
        return (self.dst_queue,)

    @property
    def filtered(self) -> bool:
        return bool(self.type_filter or self.table_filter)

    def dsn(self, side: str) -> str:
        """The DSN of one side, "source" or "target" (any other word is a bug, not the target)."""
        if side not in ("source", "target"):
            raise ValueError(f"a route's side is 'source' or 'target', not {side!r}")
        return self.src_dsn if side == "source" else self.dst_dsn

    def display(self, side: str) -> str:
        """One side's DSN without password, for messages."""
        return describe_dsn(self.dsn(side))

    @property
    def src_display(self) -> str:
        return describe_dsn(self.src_dsn)

    @property
    def dst_display(self) -> str:
        return describe_dsn(self.dst_dsn)
