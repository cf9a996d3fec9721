"""A route's mover: the move loop, batch after batch, over two connections a Loan lends.

A mover made with a loan shares its connections with the task's other
routes (one per database); made without one, it borrows its own and gives
them back on release().  Claiming the route is the caller's (qmover.protocol.
claim), the checks before its first batch preflight's.  After an
error the source connection is closed rather than given back, so a
half-finished COPY never leaks into the next batch; the target connection
is closed only when it failed, so the task's claims on it stay.  A kept
connection that fails at its first statement (its server restarted since)
is replaced once at once.
"""

from __future__ import annotations

import logging

from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from qmover.config.route import Route
from qmover.errors import LostPosition, QmoverError, TransientError
from qmover.pg.connector import Connector, Loan, Session, once_more_if_stale
from qmover.protocol import preflight, split
from qmover.protocol.batch import Checkpoint, Moved, finish_batch, move_batch, no_checkpoint

log = logging.getLogger("qmover")
UNFINISHED = "the route's next mover finishes the batch (the target's position skips it)"


class RouteMover:
    """Moves batches of one route.  Use as a context manager: on exit its own
    connections go back to the connector (a mover made without one has a
    private connector, closed on exit)."""

    def __init__(self, route: Route, checkpoint: Checkpoint = no_checkpoint, connector: Connector | None = None,
                 loan: Loan | None = None):
        self.route = route
        self.checkpoint = checkpoint
        self.connector = loan.connector if loan else connector or Connector()
        self._own_connector = loan is None and connector is None
        self.loan = loan or Loan(self.connector)
        self._own_loan = loan is None
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

    def open(self) -> tuple[Session, Session]:
        """Both connections, checked for the route unless already done."""
        try:
            src = self.loan.session(self.route, "source")
            dst = self.loan.session(self.route, "target")
            self._check(src, dst)
        except QmoverError as exc:
            self._drop(exc)
            raise
        except BaseException:
            self.close()
            raise
        return src, dst

    def _check(self, src: Session, dst: Session) -> None:
        """What a move needs: the route's checks once per process (preflight,
        again after any failure), the target session's temporary table once per connection."""
        route = self.route
        via_insert_event = preflight.checked.get(route)
        if via_insert_event is None:
            via_insert_event = preflight.check(route, src.conn, dst.conn)
            preflight.checked[route] = via_insert_event
            src.reused = dst.reused = False  # both answered
        self._via_insert_event = via_insert_event
        if (route.kind == "split" or via_insert_event) and route not in dst.routes:
            split.prepare(dst.conn)  # split routes insert server-side: no insert_event fallback
            dst.routes.add(route)

    def move_one(self) -> Moved | None:
        """Move the next batch and log it; None when none is ready."""
        sessions: list[Session] = []

        def attempt() -> Moved | None:
            src, dst = sessions[:] = self.open()

            def step(name: str) -> None:
                if name == "next_batch":
                    src.reused = False
                elif name == "position":
                    dst.reused = False
                self.checkpoint(name)

            return move_batch(self.route, src.conn, dst.conn, src.prepared, dst.prepared, step,
                              self._via_insert_event, finish=self._unfinished)

        try:
            moved = once_more_if_stale(attempt, self.loan, self.route)
        except TransientError as exc:
            self._failed(exc)
            raise
        except QmoverError as exc:
            precise = None if isinstance(exc, LostPosition) or not sessions else preflight.diagnose(
                self.route, sessions[0].conn, sessions[1].conn)
            self._failed(exc)
            if precise is None:
                raise
            raise precise from None
        except BaseException:
            self.close()
            raise
        src, dst = sessions
        src.reused = dst.reused = False
        self._log(moved)
        return moved

    def _log(self, moved: Moved | None) -> None:
        self._unfinished = None if moved is None else moved.batch_id
        if moved is None:
            return
        if moved.unplaced:
            log.warning("route %s: the target held no position for consumer %r; started from the source's "
                        "(batch %d): expected once on a new route; otherwise the target's pgq_ext was reset, and "
                        "events moved before the reset are not moved again",
                        self.route.name, self.route.consumer, moved.batch_id)
        outcome = "skipped: already applied on target" if moved.skipped else f"events={moved.events}"
        if moved.filtered:
            outcome += f" filtered={moved.filtered}"
        log.info("route=%s batch=%d %s ms=%.1f", self.route.name, moved.batch_id, outcome, moved.seconds * 1000)

    def _failed(self, exc: QmoverError) -> None:
        """After a failed move: the checks again next time; the connections it may have left half-way closed."""
        preflight.checked.pop(self.route, None)
        self._unfinished = None  # the batch comes back, and the target's position skips it
        self.loan.discard(self.route, "source")
        self._drop(exc)

    def _drop(self, exc: QmoverError) -> None:
        """Close a connection that failed, and the target's if not idle; a statement error leaves it usable."""
        if exc.side == "source" and isinstance(exc, TransientError):
            self.loan.discard(self.route, "source")
        if not self.loan.has(self.route, "target"):
            return
        conn = self.loan.session(self.route, "target").conn
        broken = exc.side == "target" and isinstance(exc, TransientError)
        if broken or conn.info.transaction_status != TRANSACTION_STATUS_IDLE:
            self.loan.discard(self.route, "target")

    def finish(self) -> None:
        """Finish on the source the last batch moved, if a next request has not."""
        if self._unfinished is None or not self.loan.has(self.route, "source"):
            self._unfinished = None
            return
        try:
            src = self.loan.session(self.route, "source")
            finish_batch(self.route, src.conn, src.prepared, self._unfinished, self.checkpoint)
        except BaseException:
            self.loan.discard(self.route, "source")  # the batch comes back, and the target's position skips it
            raise
        finally:
            self._unfinished = None

    def release(self, finish: bool = True) -> None:
        """Give back, from its own loan, the connections, kept open for the next task.

        finish: finish the last batch moved now.  Without, the finish goes with
        this mover's next request for a batch (`qmover run`, back at this route
        within a loop), or with finish_pending().
        """
        if finish:
            try:
                self.finish()
            except QmoverError as exc:
                log.warning("%s; %s", exc, UNFINISHED)
        if self._own_loan:
            self.loan.give_back()

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

    def close(self) -> None:
        """Close this route's connections instead of giving them back (after an error)."""
        self.loan.discard(self.route, "source")
        self.loan.discard(self.route, "target")
        self._unfinished = None
