"""The split path: one batch into several target queues, in the one target transaction.

The batch is COPYed into the session's temporary table first; then each
distinct value of the route's split field is resolved to a queue (through
split_map, or by name) and its events are inserted into that queue's current
event table, server-side.  Knows nothing of Celery.
"""

from __future__ import annotations

from psycopg2.extensions import connection

from qmover.config.route import Route
from qmover.errors import QmoverError
from qmover.pg import queries
from qmover.pg.db import where


def prepare(dst: connection) -> None:
    """The session's temporary table a batch lands in first, on the split path and
    the pgq.insert_event path; its rows vanish at commit or rollback."""
    with dst.cursor() as cur:
        cur.execute(queries.CREATE_INCOMING)


def distribute(route: Route, dst: connection, batch_id: int) -> tuple[int, int]:
    """Move the incoming events on to their queues; returns (moved, left out)."""
    split = route.split
    assert split is not None
    with dst.cursor() as cur:
        cur.execute(queries.split_values(split.field))
        counts = dict(cur.fetchall())
        candidates = {value for value in counts if value is not None} | set(split.known_queues)
        cur.execute(queries.QUEUE_TABLES, (list(candidates),))
        tables = dict(cur.fetchall())
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
    with dst.cursor() as cur:
        for queue, values in plan.items():
            cur.execute(queries.split_insert(split.field, tables[queue]),
                        {"values": [v for v in values if v is not None], "with_null": None in values})
            moved += cur.rowcount
    return moved, left_out
