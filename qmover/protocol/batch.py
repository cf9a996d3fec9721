"""The move protocol: one source batch into the target queue, exactly once.

1. source: next_batch_custom (committed, so after a crash the same batch
   comes back) and the SELECT over its events; none -> nothing to do.
2. target transaction: lock the consumer, then read its pgq_ext tick
   position; skip a batch already applied, refuse a lost position.
3. stream the events source -> target with COPY (nothing held in memory);
   type/table filters apply in the source's COPY, kept event ids move the
   target's event sequence, a split route lands the batch in a temporary
   table and hands it out to its queues (split.py).
4. record the batch's end tick in pgq_ext and commit the target.
5. source: finish_batch, in step 1's transaction for the next batch (or
   alone, by finish_batch(), when the mover stops).
A crash before 4 commits leaves nothing applied; after it, step 2 of the
redelivered batch sees the end tick and skips.  Knows nothing of Celery.
Both connections are in autocommit mode; the target transaction is spelled
out in SQL so that each step is one round trip.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import psycopg2
from psycopg2.extensions import connection

from qmover.config.route import Route
from qmover.errors import LostPosition
from qmover.pg import queries
from qmover.pg.db import errors, prepare_once, scalar
from qmover.protocol import split

# Batches PgQ estimates at up to SMALL_BATCH events are copied through a
# buffer (SPOOL_BYTES in memory at most); bigger ones stream through a pipe.
SMALL_BATCH = 20_000
SPOOL_BYTES = 16 * 1024 * 1024
# A route that is behind takes its waiting ticks as one batch of up to about
# this many events (twice as many at most), unless it collects batches or
# keeps a lag of its own, or says merge_ticks = 0: one batch's cost instead
# of one per tick.
MERGE_EVENTS = 10_000


# Called with the name of each step as it completes: "next_batch" (with the
# finish of the batch before, when there is one), "position", "copy",
# "before_target_commit", "after_target_commit", and "finished" from
# finish_batch().  Tests fail or kill the mover there; the benchmark times
# the steps.
Checkpoint = Callable[[str], None]


Params = Sequence[Any] | Mapping[str, Any]


def no_checkpoint(_step: str) -> None:
    pass


@dataclass(frozen=True)
class Moved:
    """What one call did with one batch."""

    batch_id: int
    events: int
    skipped: bool  # already applied on the target: only finished on the source
    seconds: float
    unplaced: bool = False  # the target held no position: a new route, or a target that was reset
    filtered: int = 0  # events the route's filters left out
    more: bool = True  # the source had a tick past this batch: another batch may be ready now


def move_batch(route: Route, src: connection, dst: connection, src_prepared: set[str], dst_prepared: set[str],
               checkpoint: Checkpoint = no_checkpoint, via_insert_event: bool = False,
               finish: int | None = None) -> Moved | None:
    """Move the route's next batch; None when no batch is ready.

    src_prepared, dst_prepared: the statements PREPAREd on src and dst so far
    (kept with each connection); this call adds to them.
    The batch moved is left unfinished on the source (step 5): pass its id
    as `finish` to the next call, or to finish_batch().
    via_insert_event: the target role may not write event tables, so events
    go through a temporary table and pgq.insert_event (which sets ev_time).
    """
    started = time.monotonic()
    with errors(route, "source"):
        batch_id, prev_tick, cur_tick, select, estimate, last_event_seq, more = _next_batch(
            route, src, src_prepared, finish)
    if batch_id is None:
        return None
    checkpoint("next_batch")
    events = filtered = 0
    try:
        with errors(route, "target"):
            for name, statement in queries.TARGET_STATEMENTS:
                prepare_once(dst, dst_prepared, name, statement)
            position, event_table = _row(dst, queries.BEGIN_AND_READ_POSITION,
                                         {"consumer": route.consumer, "queue": route.dst_queue})
            checkpoint("position")
            if position not in (None, prev_tick, cur_tick):
                if not _still_active(route, src, batch_id):
                    _rollback(dst)
                    return None  # another mover applied and finished it meanwhile
                raise lost_position(route, position, batch_id, prev_tick, cur_tick)
            if position != cur_tick:
                small = estimate is not None and estimate <= SMALL_BATCH
                copy = copy_spooled if small or threads_are_green() else copy_streamed
                into = queries.INCOMING if via_insert_event or route.kind == "split" else event_table
                events = copy(route, src, dst, select, into)
                if via_insert_event:
                    _row(dst, queries.INCOMING_TO_QUEUE, (route.dst_queue,))
                if route.keep_event_id:
                    _row(dst, queries.ADVANCE_EVENT_SEQ, (last_event_seq, route.dst_queue))
                if route.filtered:
                    with errors(route, "source"):
                        filtered = scalar(src, queries.count_batch(select)) - events
                if route.kind == "split":
                    events, left_out = split.distribute(route, dst, batch_id)
                    filtered += left_out
                checkpoint("copy")
            checkpoint("before_target_commit")
            _run(dst, queries.RECORD_POSITION_AND_COMMIT, (route.consumer, cur_tick))
    except BaseException:
        _rollback(dst)
        raise
    checkpoint("after_target_commit")
    return Moved(batch_id, events, position == cur_tick, time.monotonic() - started, position is None, filtered,
                 bool(more))


def lost_position(route: Route, position: int, batch_id: int, prev_tick: int, cur_tick: int) -> LostPosition:
    return LostPosition(
        f"route {route.name}: lost position: target holds tick {position} but the source "
        f"batch {batch_id} runs from tick {prev_tick} to {cur_tick}; nothing was moved. "
        f"Run 'qmover rewind CONFIG --route {route.name}' to move the source back to the "
        f"target's tick, or 'qmover reset CONFIG --route {route.name}' to drop the target's position")


def copy_spooled(route: Route, src: connection, dst: connection, select: str, event_table: str) -> int:
    """Copy a small batch out, then in: no thread hand-off, which costs more than
    it saves on a few hundred events.  Beyond SPOOL_BYTES the buffer spills to a
    temporary file, so memory stays bounded even when PgQ's estimate is wrong."""
    with Spool(SPOOL_BYTES) as buffer:
        with errors(route, "source"), src.cursor() as cur:
            cur.copy_expert(queries.copy_batch_out(select, route, src), buffer)
            sent = cur.rowcount
        buffer.rewind()
        with dst.cursor() as cur:
            cur.copy_expert(queries.copy_events_in(event_table, route, dst), buffer, size=65536)
            return _same_count(sent, cur.rowcount)


class Spool:
    """A COPY's rows, in memory up to `limit` bytes and in a temporary file beyond.

    COPY writes once per row, and a write here costs half of one to
    tempfile.SpooledTemporaryFile (25 against 49 us for 100 rows).
    """

    def __init__(self, limit: int) -> None:
        self.memory = io.BytesIO()
        self.buffer: BinaryIO = self.memory
        self.room: float = limit
        self.read = self.buffer.read

    def write(self, data: bytes) -> int:
        self.room -= len(data)
        if self.room < 0:
            self._spill()
        return self.buffer.write(data)

    def _spill(self) -> None:
        spilled = tempfile.TemporaryFile()
        spilled.write(self.memory.getvalue())
        self.memory.close()
        self.buffer, self.room, self.read = spilled, math.inf, spilled.read

    def rewind(self) -> None:
        self.buffer.seek(0)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.buffer.close()


def copy_streamed(route: Route, src: connection, dst: connection, select: str, event_table: str) -> int:
    """Stream the batch's events (select: its pgq.batch_event_sql) into event_table.

    The source COPY writes into a pipe from a helper thread while the target
    COPY reads from it, so memory stays at the pipe's size whatever the batch.
    """
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []
    counts = {}

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink, src.cursor() as cur:
                cur.copy_expert(queries.copy_batch_out(select, route, src), sink)
                counts["source"] = cur.rowcount
        except BaseException as exc:  # re-raised below in the caller's thread
            failure.append(exc)

    producer = threading.Thread(target=produce, name=f"qmover-copy-{route.name}", daemon=True)
    producer.start()
    try:
        with os.fdopen(read_fd, "rb") as source, dst.cursor() as cur:
            cur.copy_expert(queries.copy_events_in(event_table, route, dst), source, size=65536)
            written = cur.rowcount
    except psycopg2.Error:
        producer.join()
        if failure and isinstance(failure[0], psycopg2.Error):
            with errors(route, "source"):  # the source failed first: the target only saw its input end
                raise failure[0] from None
        raise
    finally:
        producer.join()  # closing the read end above unblocks a stuck writer
    if failure:
        with errors(route, "source"):
            raise failure[0]
    return _same_count(counts.get("source"), written)


def threads_are_green() -> bool:
    """Under gevent's monkey patching a thread is a greenlet, which cannot run
    beside the blocking COPY that feeds it: big batches are spooled then."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def _same_count(sent: int | None, written: int) -> int:
    if sent != written:
        raise RuntimeError(f"source sent {sent} events, target took {written}")
    return written


def finish_batch(route: Route, src: connection, src_prepared: set[str], batch_id: int,
                 checkpoint: Checkpoint = no_checkpoint) -> None:
    """Step 5 on its own, for the last batch a mover moved."""
    with errors(route, "source"):
        prepare_once(src, src_prepared, queries.FINISH_STATEMENT, queries.FINISH)
        _run(src, queries.FINISH_BATCH, {"finish": batch_id})
    checkpoint("finished")


def _next_batch(route: Route, src: connection, prepared: set[str], finish: int | None, attempts: int = 3) -> tuple:
    """Finish the batch before (if any), then the next batch and its events' SELECT.

    When another mover of the route finishes the batch while this call is
    reading it, PgQ raises "batch not found"; asking again gets the next one.
    """
    own_rule = route.min_count is not None or route.min_interval is not None or route.keep_lag is not None
    merge = route.merge_ticks and not own_rule
    params = {"queue": route.src_queue, "consumer": route.consumer, "keep_lag": route.keep_lag,
              "min_count": route.min_count, "min_interval": route.min_interval, "finish": finish,
              "merge": MERGE_EVENTS if merge else None}
    prepare_once(src, prepared, queries.NEXT_BATCH_STATEMENT, queries.NEXT_BATCH_SELECT)
    prepare_once(src, prepared, queries.FINISH_STATEMENT, queries.FINISH)
    query = queries.NEXT_BATCH if finish is None else queries.FINISH_AND_NEXT_BATCH
    for _ in range(attempts - 1):
        with contextlib.suppress(psycopg2.errors.RaiseException):
            return _row(src, query, params)
    return _row(src, query, params)


def _still_active(route: Route, src: connection, batch_id: int) -> bool:
    with errors(route, "source"):
        return scalar(src, queries.ACTIVE_BATCH, (route.src_queue, route.consumer)) == batch_id


def _row(conn: connection, query: str, params: Params) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    assert row is not None, "each of these statements returns a row"
    return row


def _run(conn: connection, query: str, params: Params) -> None:
    with conn.cursor() as cur:
        cur.execute(query, params)


def _rollback(conn: connection) -> None:
    """End the target transaction if the connection still can; harmless otherwise."""
    if conn.closed:
        return
    try:
        _run(conn, queries.ROLLBACK, ())
    except Exception:  # the connection is being dropped anyway
        pass
