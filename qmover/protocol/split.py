"""The split path: one batch into several target queues, in the one target transaction.

The batch is COPYed into the session's temporary table first; then each
distinct value of the route's split field is resolved to a queue (through
split_map, or by name) and its events are inserted into that queue's current
event table, server-side.  Knows nothing of Celery.
"""

from __future__ import annotations

from qmover.config.route import Route
from qmover.errors import QmoverError
from qmover.pg import queries
from qmover.pg.db import where
from qmover.pg.queries import Target
from qmover.pg.session import Link


def distribute(route: Route, dst: Link, batch_id: int) -> tuple[int, int]:
    """Move the incoming events on to their queues; returns (moved, left out)."""
    split = route.split
    assert split is not None
    counts = dict(dst.rows(queries.split_values(split.field)))
    candidates = {value for value in counts if value is not None} | set(split.known_queues)
    tables = dict(dst.rows(Target.QUEUE_TABLES, names=list(candidates)))
    plan: dict[str, list[str | None]] = {}
    left_out = 0
    for value, count in counts.items():
        try:
            queue = split.queue_for(value, set(tables))
        except LookupError:
            raise QmoverError(
                f"route {route.name}: batch {batch_id}: {split.field} {value!r} names no target queue "
                f"({where(route, 'target')}); nothing was moved. Add it to split_map or create the queue, "
                f"or set split_unknown = skip or to a catch-all queue") from None
        if queue is None:
            left_out += count
        else:
            plan.setdefault(queue, []).append(value)
    moved = 0
    for queue, values in plan.items():
        moved += dst.run(queries.split_insert(split.field, tables[queue]),
                         values=[v for v in values if v is not None], with_null=None in values)
    return moved, left_out
