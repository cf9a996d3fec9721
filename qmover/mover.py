"""A route's two connections, kept open across batches.

Connections are opened and checked lazily and dropped after any error, so a
restarted server or a half-finished COPY never leaks into the next batch.
"""

from __future__ import annotations

import logging

from psycopg2.extensions import connection

from qmover import db, queries, split
from qmover.checks import check_route, target_can_copy
from qmover.errors import LostPosition, QmoverError, TransientError
from qmover.move import Checkpoint, Moved, move_batch, no_checkpoint
from qmover.route import Route

log = logging.getLogger("qmover")
_warned_routes: set[str] = set()  # the insert_event fallback is announced once per process


class RouteMover:
    """Moves batches of one route; use as a context manager to close on exit."""

    def __init__(self, route: Route, checkpoint: Checkpoint = no_checkpoint):
        self.route = route
        self.checkpoint = checkpoint
        self._src: connection | None = None
        self._dst: connection | None = None
        self._via_insert_event = False

    def __enter__(self) -> RouteMover:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Connect both sides and check the route, unless already done."""
        if self._src is not None and self._dst is not None:
            return
        try:
            self._src = db.connect(self.route, "source", autocommit=True)
            self._dst = db.connect(self.route, "target", autocommit=True)
            check_route(self._src, self._dst, self.route)
            if self.route.split:
                split.prepare(self._dst)  # split routes insert server-side: no insert_event fallback
                return
            self._via_insert_event = not target_can_copy(self._dst, self.route)
            if self._via_insert_event and self.route.keep_event_id:
                raise QmoverError(
                    f"route {self.route.name}: keep_event_id needs the target role to write queue "
                    f"{self.route.dst_queue!r}'s event tables itself (pgq.insert_event cannot keep ids); grant "
                    f"it INSERT on the event tables and UPDATE on the event sequence, or set keep_event_id = 0")
            if self._via_insert_event and self.route.name not in _warned_routes:
                _warned_routes.add(self.route.name)
                log.warning("route %s: the target role may not COPY into queue %r's event tables; moving "
                            "through pgq.insert_event instead, still exactly once, but slower and with "
                            "ev_time set by the target; grant INSERT on the event tables and USAGE on the "
                            "event sequence to keep it", self.route.name, self.route.dst_queue)
        except BaseException:
            self.close()
            raise

    def move_one(self) -> Moved | None:
        """Move the next batch and log it; None when none is ready."""
        self.open()
        try:
            moved = move_batch(self.route, self._src, self._dst, self.checkpoint, self._via_insert_event)
        except QmoverError as exc:
            precise = None if isinstance(exc, (TransientError, LostPosition)) else self._diagnose()
            self.close()
            if precise is None:
                raise
            raise precise from None
        except BaseException:
            self.close()
            raise
        if moved is not None and moved.unplaced:
            log.warning("route %s: the target held no position for consumer %r; started from the source's "
                        "(batch %d): expected once on a new route; otherwise the target's pgq_ext was reset, and "
                        "events moved before the reset are not moved again",
                        self.route.name, self.route.consumer, moved.batch_id)
        if moved is not None:
            outcome = "skipped: already applied on target" if moved.skipped else f"events={moved.events}"
            if moved.filtered:
                outcome += f" filtered={moved.filtered}"
            log.info("route=%s batch=%d %s ms=%.1f", self.route.name, moved.batch_id, outcome,
                     moved.seconds * 1000)
        return moved

    def _diagnose(self) -> QmoverError | None:
        """After a failed move, the route's checks again: a queue dropped or a
        consumer unregistered while running is reported as such, with its fix."""
        try:
            check_route(self._src, self._dst, self.route)
        except QmoverError as found:
            return found
        return None

    def claim(self) -> bool:
        """Take the route for this mover; False when another mover holds it.

        The claim lives on the target connection until release() or the
        connection's end (close, or the process dying), so it cannot outlive
        a killed worker.  Kept connections may have died with a server
        restart since their last use: both are tried first, and opened
        afresh once if they fail.
        """
        kept = self._src is not None
        try:
            return self._claim()
        except TransientError:
            self.close()
            if not kept:
                raise
            return self._claim()

    def _claim(self) -> bool:
        self.open()
        with db.errors(self.route, "source"):
            db.scalar(self._src, queries.PING)
        with db.errors(self.route, "target"):
            return bool(db.scalar(self._dst, queries.CLAIM_ROUTE, (self.route.consumer,)))

    def release(self) -> None:
        """Give the route back while keeping the connections for the next task."""
        if self._dst is None:
            return
        try:
            with db.errors(self.route, "target"):
                db.scalar(self._dst, queries.RELEASE_ROUTE, (self.route.consumer,))
        except QmoverError:
            self.close()  # closing the connection releases the claim too

    def source_lag(self) -> float | None:
        """Seconds since the tick the consumer last finished, as PgQ reports it."""
        self.open()
        with db.errors(self.route, "source"):
            return db.scalar(self._src, queries.CONSUMER_INFO, (self.route.src_queue, self.route.consumer))

    def close(self) -> None:
        db.close(self._src)
        db.close(self._dst)
        self._src = self._dst = None
