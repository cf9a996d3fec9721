"""A route's mover: the move protocol over two connections borrowed from a Connector.

Connections are borrowed lazily; the route is checked once per process;
after any error they are closed rather than given back, so a restarted
server or a half-finished COPY never leaks into the next batch.
"""

from __future__ import annotations

import logging

from qmover import db, queries, split
from qmover.checks import check_route, require_blocking_driver, target_can_copy
from qmover.connector import Connector, Session, database_key
from qmover.errors import LostPosition, QmoverError, TransientError
from qmover.loops import Hop, require_no_loops, server_identity
from qmover.move import Checkpoint, Moved, finish_batch, move_batch, no_checkpoint
from qmover.route import Route

log = logging.getLogger("qmover")
_warned_routes: set[str] = set()  # the insert_event fallback is announced once per process
UNFINISHED = "the route's next mover finishes the batch (the target's position skips it)"


class RouteMover:
    """Moves batches of one route.  Use as a context manager: on exit the
    route and the connections go back to the connector (a mover made without
    one has a private connector, closed on exit)."""

    def __init__(self, route: Route, checkpoint: Checkpoint = no_checkpoint, connector: Connector | None = None):
        self.route = route
        self.checkpoint = checkpoint
        self.connector = connector or Connector()
        self._own_connector = connector is None
        self._src: Session | None = None
        self._dst: Session | None = None
        self._reused = False  # a borrowed connection had been idle: its server may have restarted since
        self._held = False  # the connector's in-process claim
        self._claimed = False  # the advisory lock on the target connection
        self._via_insert_event = False  # the target role may not COPY into the queue's event tables
        self._unfinished: int | None = None  # moved, not yet finished on the source: goes with the next request

    def __enter__(self) -> RouteMover:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.close()  # an interrupted task leaves no connection half-way
        self.release()
        if self._own_connector:
            self.connector.close()

    def open(self) -> None:
        """Borrow both connections and check the route on them, unless already done."""
        if self._src is not None and self._dst is not None:
            return
        try:
            if self._src is None:
                self._src = self.connector.borrow(self.route, "source")
                self._reused |= self._src.reused
            if self._dst is None:
                self._dst = self.connector.borrow(self.route, "target")
                self._reused |= self._dst.reused
            self._check(self._src, self._dst)
        except BaseException:
            self.close()
            raise

    def _check(self, src: Session, dst: Session) -> None:
        """What a move needs: the route's checks once per process (again after
        any failure), the target session's temporary table once per connection."""
        route = self.route
        via_insert_event = self.connector.checked.get(route)
        if via_insert_event is None:
            via_insert_event = self._check_route(src, dst)
            self.connector.checked[route] = via_insert_event
        self._via_insert_event = via_insert_event
        if (route.kind == "split" or via_insert_event) and route not in dst.routes:
            split.prepare(dst.conn)  # split routes insert server-side: no insert_event fallback
            dst.routes.add(route)

    def _check_route(self, src: Session, dst: Session) -> bool:
        """Raise the first thing that keeps the route from moving; returns
        whether it must move through pgq.insert_event."""
        route = self.route
        require_blocking_driver()
        with db.errors(route, "source"):
            source = server_identity(src.conn)
        with db.errors(route, "target"):
            target = server_identity(dst.conn)
        require_no_loops([Hop(route, source, target)])
        check_route(src.conn, dst.conn, route)
        via_insert_event = route.kind == "queue" and not target_can_copy(dst.conn, route)
        if via_insert_event and route.keep_event_id:
            raise QmoverError(
                f"route {route.name}: keep_event_id needs the target role to write queue "
                f"{route.dst_queue!r}'s event tables itself (pgq.insert_event cannot keep ids); grant "
                f"it INSERT on the event tables and UPDATE on the event sequence, or set keep_event_id = 0")
        if via_insert_event and route.name not in _warned_routes:
            _warned_routes.add(route.name)
            log.warning("route %s: the target role may not COPY into queue %r's event tables; moving "
                        "through pgq.insert_event instead, still exactly once, but slower and with "
                        "ev_time set by the target; grant INSERT on the event tables and USAGE on the "
                        "event sequence to keep it", route.name, route.dst_queue)
        return via_insert_event

    def move_one(self) -> Moved | None:
        """Move the next batch and log it; None when none is ready."""
        self.open()
        assert self._src is not None and self._dst is not None
        try:
            moved = move_batch(self.route, self._src.conn, self._dst.conn, self._src.prepared, self.checkpoint,
                               self._via_insert_event, finish=self._unfinished)
        except QmoverError as exc:
            self.connector.checked.pop(self.route, None)  # the next open checks the route afresh
            precise = None if isinstance(exc, (TransientError, LostPosition)) else self._diagnose()
            self.close()
            if precise is None:
                raise
            raise precise from None
        except BaseException:
            self.close()
            raise
        self._unfinished = None if moved is None else moved.batch_id
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
        assert self._src is not None and self._dst is not None
        try:
            check_route(self._src.conn, self._dst.conn, self.route)
        except QmoverError as found:
            return found
        return None

    def claim(self) -> bool:
        """Take the route for this mover; False when another mover holds it.

        Two claims: the connector's, against other tasks of this process, and
        a session advisory lock on the target connection, against other
        processes.  The lock ends with release() or with the connection
        (close, or the process dying), so it cannot outlive a killed worker.
        Idle connections may have died with a server restart since their
        last loan: those are dropped and the claim is tried once more afresh.
        """
        if not self.connector.hold(self.route):
            return False
        self._held = True
        self._reused = False
        try:
            try:
                self._claimed = self._try_claim()
            except TransientError:
                if not self._reused:
                    raise
                for dsn in (self.route.src_dsn, self.route.dst_dsn):
                    self.connector.drop_idle(database_key(dsn))
                self._claimed = self._try_claim()
        except BaseException:
            self.release()
            raise
        if not self._claimed:
            self.release()
        return self._claimed

    def _try_claim(self) -> bool:
        self.open()
        assert self._src is not None and self._dst is not None
        try:
            if self._src.reused:  # a connection made just now needs no proof of life
                with db.errors(self.route, "source"):
                    db.scalar(self._src.conn, queries.PING)
            with db.errors(self.route, "target"):
                return bool(db.scalar(self._dst.conn, queries.CLAIM_ROUTE, (self.route.consumer,)))
        except BaseException:
            self.close()
            raise

    def finish(self) -> None:
        """Finish on the source the last batch moved, if a next request has not."""
        if self._unfinished is None or self._src is None:
            return
        try:
            finish_batch(self.route, self._src.conn, self._unfinished, self.checkpoint)
        except BaseException:
            self.close()  # the batch comes back, and the target's position skips it
            raise
        self._unfinished = None

    def release(self, finish: bool = True) -> None:
        """Give back the route and the connections, kept open for the next task.

        finish: finish the last batch moved now.  Without, the finish goes with
        this mover's next request for a batch (`qmover run`, back at this route
        within a loop), or with finish_pending().
        """
        if finish:
            try:
                self.finish()
            except QmoverError as exc:
                log.warning("%s; %s", exc, UNFINISHED)
        if self._claimed and self._dst is not None:
            try:
                with db.errors(self.route, "target"):
                    db.scalar(self._dst.conn, queries.RELEASE_ROUTE, (self.route.consumer,))
            except QmoverError:
                self.close()  # closing the connection releases the lock too
        self._claimed = False
        for session in (self._src, self._dst):
            if session is not None:
                self.connector.give_back(session)
        self._src = self._dst = None
        if self._held:
            self._held = False
            self.connector.unhold(self.route)

    def finish_pending(self) -> None:
        """Finish the last batch moved, if release() left it, on borrowed connections."""
        if self._unfinished is None:
            return
        try:
            self.open()
        except QmoverError as exc:
            self._unfinished = None
            log.warning("%s; %s", exc, UNFINISHED)
        self.release()

    def source_lag(self) -> float | None:
        """Seconds since the tick the consumer last finished, as PgQ reports it."""
        self.open()
        assert self._src is not None
        try:
            with db.errors(self.route, "source"):
                return db.scalar(self._src.conn, queries.SOURCE_LAG, (self.route.src_queue, self.route.consumer))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close both connections instead of giving them back (after an error)."""
        for session in (self._src, self._dst):
            if session is not None:
                db.close(session.conn)
        self._src = self._dst = None
        self._claimed = False
        self._unfinished = None
