"""A route's two connections, kept open across batches.

Connections are opened and checked lazily and dropped after any error, so a
restarted server or a half-finished COPY never leaks into the next batch.
"""

from __future__ import annotations

from psycopg2.extensions import connection

from qmover import db
from qmover.checks import check_route
from qmover.move import FaultHook, Moved, move_batch
from qmover.route import Route


class RouteMover:
    """Moves batches of one route; use as a context manager to close on exit."""

    def __init__(self, route: Route, fault: FaultHook | None = None):
        self.route = route
        self.fault = fault
        self._src: connection | None = None
        self._dst: connection | None = None

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
            self._dst = db.connect(self.route, "target", autocommit=False)
            check_route(self._src, self._dst, self.route)
            self._dst.rollback()  # the checks' snapshot must not outlive them
        except BaseException:
            self.close()
            raise

    def move_one(self) -> Moved | None:
        """Move the next batch; None when none is ready."""
        self.open()
        try:
            return move_batch(self.route, self._src, self._dst, self.fault)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        db.close(self._src)
        db.close(self._dst)
        self._src = self._dst = None
