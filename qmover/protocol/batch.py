"""The move protocol: one source batch into the target queue, exactly once.

1. source: next_batch_custom (committed, so after a crash the same batch
   comes back) and the SELECT over its events; none -> nothing to do.
2. target transaction: lock the consumer, then read its pgq_ext tick
   position; skip a batch already applied, refuse a lost position.
3. stream the events source -> target with COPY (nothing held in memory);
   type/table filters apply in the source's COPY, kept event ids move the
   target's event sequence, a split route lands the batch in a temporary
   table and hands it out to its queues (split.py).
4. record the batch's end tick in pgq_ext and commit the target.  A small
   batch of a route that neither filters nor hands events on through a
   temporary table sends 3 and 4 with its COPY, in one round trip.
5. source: finish_batch, in step 1's transaction for the next batch (or
   alone, by finish_batch(), when the mover stops).
A crash before 4 commits leaves nothing applied; after it, step 2 of the
redelivered batch sees the end tick and skips.  Knows nothing of Celery.
Both links are in autocommit mode; the target transaction is spelled out
in SQL so that each step is one round trip.
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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO, Literal

from qmover.config.route import Route
from qmover.errors import LostPosition, QmoverError
from qmover.pg import queries
from qmover.pg.db import RAISED
from qmover.pg.queries import Source, Statement, Target, Transaction
from qmover.pg.session import Link
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
# Times next_batch asks when another mover of the route finishes the batch it is reading.
NEXT_BATCH_ATTEMPTS = 3


# Called with the name of each step as it completes: "next_batch" (with the
# finish of the batch before, when there is one), "position", "copy",
# "before_target_commit", "after_target_commit", and "finished" from
# finish_batch().  Tests fail or kill the mover there; the benchmark times
# the steps.
Checkpoint = Callable[[str], None]


def no_checkpoint(_step: str) -> None:
    pass


@dataclass(frozen=True)
class Batch:
    """A source batch, as next_batch() found it."""

    id: int
    prev_tick: int
    cur_tick: int
    select: str  # pgq.batch_event_sql(): the SELECT over its events
    estimate: int | None  # events, as PgQ's event sequence counts them
    last_event_seq: int  # the source's event sequence at the batch's end tick
    more: bool  # the source had a tick past this batch: another batch may be ready now

    def position_says(self, position: int | None) -> Literal["apply", "skip", "lost"]:
        """SerialConsumer's rule for the target's tick position: none (a new route)
        or the batch's start tick, apply it; its end tick, it was applied: skip
        it; any other tick, the position is lost."""
        if position is None or position == self.prev_tick:
            return "apply"
        return "skip" if position == self.cur_tick else "lost"


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


def move_batch(route: Route, src: Link, dst: Link, *, finish: int | None = None, via_insert_event: bool = False,
               checkpoint: Checkpoint = no_checkpoint) -> Moved | None:
    """Move the route's next batch; None when no batch is ready.

    The batch moved is left unfinished on the source (step 5): pass its id
    as `finish` to the next call, or to finish_batch().
    via_insert_event: the target role may not write event tables, so events
    go through a temporary table and pgq.insert_event (which sets ev_time).
    """
    started = time.monotonic()
    batch = next_batch(route, src, finish)
    if batch is None:
        return None
    checkpoint("next_batch")
    events = filtered = 0
    incoming = via_insert_event or route.kind == "split"
    if incoming:
        dst.ensure(Target.CREATE_INCOMING)
    try:
        position, event_table = dst.one(Transaction.BEGIN, Target.LOCK, Target.POSITION,
                                        consumer=route.consumer, queue=route.dst_queue)
        checkpoint("position")
        says = batch.position_says(position)
        if says == "lost":
            if src.value(Source.ACTIVE_BATCH, queue=route.src_queue, consumer=route.consumer) != batch.id:
                dst.run(Transaction.ROLLBACK)
                return None  # another mover applied and finished it meanwhile
            raise lost_position(route, position, batch)
        committed = False
        record = {"consumer": route.consumer, "tick": batch.cur_tick, "queue": route.dst_queue,
                  "last_event_seq": batch.last_event_seq}
        small = batch.estimate is not None and batch.estimate <= SMALL_BATCH
        spooled = small or threads_are_green()
        if says == "apply" and spooled and not incoming and not route.filtered:
            # the events, their end tick and the commit in one round trip (none when the batch is empty)
            ending = ((Target.ADVANCE_EVENT_SEQ,) if route.keep_event_id else ()) + (Target.RECORD,
                                                                                     Transaction.COMMIT)
            events = copy_spooled(route, src, dst, batch.select, event_table,
                                  ending=(ending, partial(checkpoint, "before_target_commit"), record))
            committed = events > 0
            if not committed:
                checkpoint("copy")  # an empty batch: no COPY in, the end tick and the commit come next
        elif says == "apply":
            copy = copy_spooled if spooled else copy_streamed
            events = copy(route, src, dst, batch.select, queries.INCOMING if incoming else event_table)
            if via_insert_event:
                dst.run(Target.INCOMING_TO_QUEUE, queue=route.dst_queue)
            if route.keep_event_id:
                dst.run(Target.ADVANCE_EVENT_SEQ, **record)
            if route.filtered:
                filtered = src.value(queries.count_batch(batch.select)) - events
            if route.kind == "split":
                events, left_out = split.distribute(route, dst, batch.id)
                filtered += left_out
            checkpoint("copy")
        if not committed:
            checkpoint("before_target_commit")
            dst.run(Target.RECORD, Transaction.COMMIT, **record)
    except BaseException:
        _rollback(dst)
        raise
    checkpoint("after_target_commit")
    return Moved(batch.id, events, says == "skip", time.monotonic() - started, position is None,
                 filtered, batch.more)


def next_batch(route: Route, src: Link, finish: int | None = None) -> Batch | None:
    """Finish the batch before (if any), then take the next batch; None when none is ready.

    When another mover of the route finishes the batch while this call is
    reading it, PgQ raises "batch not found"; asking again gets the next one.
    """
    statements = (Source.NEXT_BATCH,) if finish is None else (Source.FINISH, Source.NEXT_BATCH)
    params = next_batch_params(route, finish)
    for attempt in range(1, NEXT_BATCH_ATTEMPTS + 1):
        try:
            row = src.one(*statements, **params)
            break
        except QmoverError as exc:
            if attempt == NEXT_BATCH_ATTEMPTS or exc.sqlstate != RAISED:
                raise
    batch_id, prev_tick, cur_tick, select, estimate, last_event_seq, more = row
    return None if batch_id is None else Batch(batch_id, prev_tick, cur_tick, select, estimate, last_event_seq,
                                               bool(more))


def next_batch_params(route: Route, finish: int | None) -> dict[str, Any]:
    """Source.NEXT_BATCH's parameters (and FINISH's, when a batch is to be finished first).

    A route that is behind takes its waiting ticks merged, up to about
    MERGE_EVENTS, unless it collects batches or keeps a lag of its own (PgQ
    then decides) or says merge_ticks = 0.
    """
    own_rule = route.min_count is not None or route.min_interval is not None or route.keep_lag is not None
    return {"queue": route.src_queue, "consumer": route.consumer, "keep_lag": route.keep_lag,
            "min_count": route.min_count, "min_interval": route.min_interval, "finish": finish,
            "merge": MERGE_EVENTS if route.merge_ticks and not own_rule else None}


def finish_batch(route: Route, src: Link, batch_id: int, checkpoint: Checkpoint = no_checkpoint) -> None:
    """Step 5 on its own, for the last batch a mover moved: not waiting for the flush."""
    src.run(Transaction.BEGIN, Transaction.NO_FLUSH_WAIT, Source.FINISH, Transaction.COMMIT, finish=batch_id)
    checkpoint("finished")


def lost_position(route: Route, position: int, batch: Batch) -> LostPosition:
    return LostPosition(
        f"route {route.name}: lost position: target holds tick {position} but the source "
        f"batch {batch.id} runs from tick {batch.prev_tick} to {batch.cur_tick}; nothing was moved. "
        f"Run 'qmover rewind CONFIG --route {route.name}' to move the source back to the "
        f"target's tick, or 'qmover reset CONFIG --route {route.name}' to drop the target's position")


def copy_statements(route: Route, src: Link, dst: Link, select: str, table: str) -> tuple[str, str]:
    """The batch's COPY out of the source and into the table on the target, rendered once per connection."""
    head, tail = src.render(("copy out", route), lambda: queries.copy_batch_out(route))
    into = dst.render(("copy in", route, table), lambda: queries.copy_events_in(table, route))[0]
    return head + select + tail, into


# What ends the target transaction in the COPY's round trip: the statements
# after the COPY, a call before it is sent (the last point before the commit),
# and the statements' parameters.
Ending = tuple[tuple[Statement, ...], Callable[[], None], dict[str, Any]]


def copy_spooled(route: Route, src: Link, dst: Link, select: str, table: str, ending: Ending | None = None) -> int:
    """Copy a small batch out, then in: no thread hand-off, which costs more than
    it saves on a few hundred events.  Beyond SPOOL_BYTES the buffer spills to a
    temporary file, so memory stays bounded even when PgQ's estimate is wrong.
    An empty batch (an idle queue's tick) sends no COPY in: a round trip less.

    ending: sent with the COPY in, the transaction's end.  The driver then
    counts no rows for the COPY: the whole spool goes, and COPY takes every
    row of it or fails, and the commit with it."""
    out, into = copy_statements(route, src, dst, select, table)
    with Spool(SPOOL_BYTES) as buffer:
        sent = src.copy_out(out, buffer)
        if sent == 0:
            return 0
        buffer.rewind()
        if ending is None:
            return _same_count(sent, dst.copy_in(into, buffer))
        statements, before, params = ending
        before()
        dst.copy_in(into, buffer, *statements, **params)
        return sent


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


def copy_streamed(route: Route, src: Link, dst: Link, select: str, table: str) -> int:
    """Stream the batch's events (select: its pgq.batch_event_sql) into table.

    The source COPY writes into a pipe from a helper thread while the target
    COPY reads from it, so memory stays at the pipe's size whatever the batch.
    """
    out, into = copy_statements(route, src, dst, select, table)
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []
    sent: list[int] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink:
                sent.append(src.copy_out(out, sink))
        except BaseException as exc:  # re-raised below in the caller's thread
            failure.append(exc)

    producer = threading.Thread(target=produce, name=f"qmover-copy-{route.name}", daemon=True)
    producer.start()
    try:
        with os.fdopen(read_fd, "rb") as source:
            written = dst.copy_in(into, source)
    except QmoverError:
        producer.join()
        if failure and isinstance(failure[0], QmoverError):
            raise failure[0] from None  # the source failed first: the target only saw its input end
        raise
    finally:
        producer.join()  # closing the read end above unblocks a stuck writer
    if failure:
        raise failure[0]
    return _same_count(sent[0], written)


def threads_are_green() -> bool:
    """Under gevent's monkey patching a thread is a greenlet, which cannot run
    beside the blocking COPY that feeds it: big batches are spooled then."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def _same_count(sent: int, written: int) -> int:
    if sent != written:
        raise RuntimeError(f"source sent {sent} events, target took {written}")
    return written


def _rollback(dst: Link) -> None:
    """End the target transaction if the connection still can; harmless otherwise."""
    if dst.closed:
        return
    with contextlib.suppress(Exception):  # the connection is being dropped anyway
        dst.run(Transaction.ROLLBACK)
