"""Routes that would feed events back into the queue they came from.

A route into its own source queue, or routes that form a cycle (A into B, B
into A), would copy every event round and round forever.  Whether two
endpoints are the same queue is decided from what the servers report (system
identifier and database), not from the DSN text, which can spell one
database many ways.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmover.config.route import Route
from qmover.errors import QmoverError

Server = tuple[str, str]  # (system identifier, database name)
Queue = tuple[Server, str]


@dataclass(frozen=True)
class Hop:
    """A route with the servers its two sides reported."""

    route: Route
    source: Server
    target: Server

    def edges(self) -> list[tuple[Queue, Queue]]:
        start = (self.source, self.route.src_queue)
        return [(start, (self.target, queue)) for queue in self.route.target_queues]


def require_no_loops(found: list[Hop]) -> None:
    """Raise a one-line QmoverError for the first route into its own source or cycle of routes."""
    following: dict[Queue, list[tuple[Queue, Hop]]] = {}
    for hop in found:
        for start, end in hop.edges():
            if start == end:
                raise QmoverError(
                    f"route {hop.route.name}: its target is its own source, queue {end[1]!r} in {_where(end)}, "
                    f"so every batch would be copied back into that queue forever; point dst_db or "
                    f"dst_queue_name at another queue")
            following.setdefault(start, []).append((end, hop))
    for start in following:
        cycle = _cycle_from(start, following)
        if cycle:
            steps = ", ".join(f"{hop.route.name} moves {_name(a)} into {_name(b)}" for a, b, hop in cycle)
            names = ", ".join(dict.fromkeys(hop.route.name for _, _, hop in cycle))
            raise QmoverError(
                f"routes {names} form a cycle ({steps}), so events would go round forever; "
                f"remove one of these routes or point it at another queue")


def _cycle_from(start: Queue, following: dict[Queue, list[tuple[Queue, Hop]]]) -> list[tuple[Queue, Queue, Hop]]:
    """The steps of a cycle back to start, or [] (depth first; configs are small)."""
    path: list[tuple[Queue, Queue, Hop]] = []
    seen: set[Queue] = set()

    def visit(queue: Queue) -> bool:
        for end, hop in following.get(queue, []):
            path.append((queue, end, hop))
            if end == start:
                return True
            if end not in seen:
                seen.add(end)
                if visit(end):
                    return True
            path.pop()
        return False

    return path if visit(start) else []


def _where(queue: Queue) -> str:
    (system, database), _ = queue
    return f"database {database!r} of server {system}"


def _name(queue: Queue) -> str:
    (_, database), name = queue
    return f"{database}/{name}"
