"""The move protocol: one source batch into the target queue, exactly once.

1. source (autocommit): next_batch_custom; none -> nothing to do.  The batch
   assignment is committed, so after a crash the same batch comes back.
2. target transaction: lock the consumer, read its pgq_ext tick position;
   skip a batch already applied, refuse a lost position.
3. stream the events source -> target with COPY (nothing held in memory).
4. record the batch's end tick in pgq_ext and commit the target.
5. source: finish_batch.
A crash before 4 commits leaves nothing applied; after it, step 2 of the
redelivered batch sees the end tick and skips.  Knows nothing of Celery.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
from psycopg2.extensions import connection

from qmover import queries
from qmover.db import errors, scalar
from qmover.errors import LostPosition
from qmover.route import Route

# Test hook: called with "before_target_commit" / "after_target_commit".
FaultHook = Callable[[str], None]


@dataclass(frozen=True)
class Moved:
    """What one call did with one batch."""

    batch_id: int
    events: int
    skipped: bool  # already applied on the target: only finished on the source
    seconds: float


def move_batch(route: Route, src: connection, dst: connection,
               fault: FaultHook | None = None) -> Moved | None:
    """Move the route's next batch; None when no batch is ready."""
    started = time.monotonic()
    with errors(route, "source"):
        row = _one_row(src, queries.NEXT_BATCH, {
            "queue": route.src_queue, "consumer": route.consumer, "keep_lag": route.keep_lag,
            "min_count": route.min_count, "min_interval": route.min_interval})
    batch_id, prev_tick, cur_tick = row
    if batch_id is None:
        return None
    events = 0
    with errors(route, "target"), dst:  # commits on success, rolls back on any error
        with dst.cursor() as cur:
            cur.execute(queries.LOCK_CONSUMER, (route.consumer,))
            cur.execute(queries.GET_LAST_TICK, (route.consumer,))
            position = cur.fetchone()[0]
        if position not in (None, prev_tick, cur_tick):
            if not _still_active(route, src, batch_id):
                return None  # another mover applied and finished it meanwhile
            raise LostPosition(
                f"route {route.name}: lost position: target holds tick {position} but the source "
                f"batch {batch_id} runs from tick {prev_tick} to {cur_tick}; nothing was moved. "
                f"Run 'qmover rewind CONFIG --route {route.name}' to move the source back to the "
                f"target's tick, or 'qmover reset CONFIG --route {route.name}' to drop the target's position")
        skipped = position == cur_tick
        if not skipped:
            select = _batch_select(route, src, batch_id)
            if select is None:
                return None  # superseded: another mover's next_batch replaced it
            events = copy_batch(route, src, dst, select)
            scalar(dst, queries.SET_LAST_TICK, (route.consumer, cur_tick))
        if fault:
            fault("before_target_commit")
    if fault:
        fault("after_target_commit")
    with errors(route, "source"):
        scalar(src, queries.FINISH_BATCH, (batch_id,))
    return Moved(batch_id, events, skipped, time.monotonic() - started)


def copy_batch(route: Route, src: connection, dst: connection, select: str) -> int:
    """Stream the batch's events (select: its pgq.batch_event_sql) into the target queue.

    The source COPY writes into a pipe from a helper thread while the target
    COPY reads from it, so memory stays at the pipe's size whatever the batch.
    """
    event_table = scalar(dst, queries.CURRENT_EVENT_TABLE, (route.dst_queue,))
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []
    counts = {}

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink, src.cursor() as cur:
                cur.copy_expert(queries.copy_batch_out(select), sink)
                counts["source"] = cur.rowcount
        except BaseException as exc:  # re-raised below in the caller's thread
            failure.append(exc)

    producer = threading.Thread(target=produce, name=f"qmover-copy-{route.name}", daemon=True)
    producer.start()
    try:
        with os.fdopen(read_fd, "rb") as source, dst.cursor() as cur:
            cur.copy_expert(queries.copy_events_in(event_table), source, size=65536)
            written = cur.rowcount
    finally:
        producer.join()  # closing the read end above unblocks a stuck writer
    if failure:
        with errors(route, "source"):
            raise failure[0]
    if counts.get("source") != written:
        raise RuntimeError(f"source sent {counts.get('source')} events, target took {written}")
    return written


def _batch_select(route: Route, src: connection, batch_id: int) -> str | None:
    """The SELECT over the batch's events; None when the batch is no longer active.

    Two movers calling next_batch_custom at the same moment can both be handed
    a batch id, the later one replacing the earlier; the earlier is then gone.
    """
    try:
        return scalar(src, queries.BATCH_EVENT_SQL, (batch_id,))
    except psycopg2.errors.RaiseException:
        if not _still_active(route, src, batch_id):
            return None
        with errors(route, "source"):
            raise


def _still_active(route: Route, src: connection, batch_id: int) -> bool:
    with errors(route, "source"):
        return scalar(src, queries.ACTIVE_BATCH, (route.src_queue, route.consumer)) == batch_id


def _one_row(conn: connection, query: str, params: dict) -> tuple:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchone()
