"""The readiness sweep: which routes have a batch to move, asking each database once.

Instead of a move task per route per interval, beat sweeps: one query per
source database finds the consumers with nothing to do, one per target
database the routes a mover holds; only the rest get a move task.  Errs
towards ready: a consumer the query does not find (a dropped queue, an
unregistered consumer) counts as ready, so that its mover says what is
wrong.  A database that does not answer makes only its own routes wait:
sweeps leave it out, and a background thread asks it again every
PROBE_EVERY seconds (with a short connect timeout), so a dead host holds up
no sweep.  Knows nothing of Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from psycopg2 import sql

from qmover import db, queries
from qmover.connector import Connector, Session, by_database, database_key
from qmover.db import Side, prepare_once
from qmover.errors import LoginRefused, QmoverError, TransientError
from qmover.route import Route

log = logging.getLogger("qmover")
PROBE_EVERY = 1.0
CONNECT_TIMEOUT = 2


class Sweeper:
    """Keeps one connection per database between sweeps, and which databases are down."""

    def __init__(self) -> None:
        self.connector = Connector(connect_timeout=CONNECT_TIMEOUT)
        self._down: dict[tuple, tuple[Route, Side]] = {}  # database key -> a route to reach it by
        self._prober: threading.Thread | None = None  # runs while any database is down
        self._lock = threading.Lock()

    def ready(self, routes: Iterable[Route]) -> list[Route]:
        """The routes to move now: maybe a batch ready, and no mover on them."""
        candidates = []
        for group in by_database(routes, "source"):
            idle = self._ask(group, "source", "qmover_idle_consumers", queries.IDLE_CONSUMERS)
            if idle is not None:
                candidates += [route for route in group if (route.src_queue, route.consumer) not in idle]
        ready = []
        for group in by_database(candidates, "target"):
            claimed = self._ask(group, "target", "qmover_claimed_consumers", queries.CLAIMED_CONSUMERS)
            if claimed is not None:
                ready += [route for route in group if (route.consumer,) not in claimed]
        return ready

    def _ask(self, group: list[Route], side: Side, name: str, query: str) -> set[tuple] | None:
        """The query's rows for the group's consumers; None when the database does not answer."""
        route = group[0]
        key = database_key(route.dsn(side))
        if key in self._down:
            return None

        def rows(session: Session) -> set[tuple]:
            prepare_once(session.conn, session.prepared, name, query)  # sweeps repeat it every interval
            with session.conn.cursor() as cur:
                cur.execute(sql.SQL("execute {}(%s)").format(sql.Identifier(name)), ([r.consumer for r in group],))
                return set(cur.fetchall())

        try:
            return self.connector.run(route, side, rows)
        except (TransientError, LoginRefused) as exc:
            self._went_down(key, route, side, exc, len(group))
            return None
        except QmoverError:
            return set()  # it answered, but not as PgQ should (no pgq schema, say): the movers will say why

    def _went_down(self, key: tuple, route: Route, side: Side, exc: QmoverError, routes: int) -> None:
        log.warning("sweep: %s; its %d route(s) wait until it answers (asked every %g s)", exc, routes,
                    PROBE_EVERY)
        with self._lock:
            self._down[key] = (route, side)
            if self._prober is None:
                self._prober = threading.Thread(target=self._probe, name="qmover-sweep-probe", daemon=True)
                self._prober.start()

    def _probe(self) -> None:
        """Ask the databases that did not answer until each does; then sweeps take them back."""
        while True:
            time.sleep(PROBE_EVERY)
            with self._lock:
                if not self._down:
                    self._prober = None
                    return
            for key, (route, side) in list(self._down.items()):
                try:
                    self.connector.run(route, side, lambda session: db.scalar(session.conn, queries.PING))
                except QmoverError:
                    continue
                del self._down[key]
                log.info("sweep: %s database (%s) answers again", side, route.display(side))

    def close(self) -> None:
        self.connector.close()
