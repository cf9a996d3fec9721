"""Connections per database, sampled on a connection of its own: the peaks the
connection bounds are checked against, for the benchmarks and the tests."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from psycopg2.extensions import connection

# qmover's own connections: its connections name the process (qmover.pg.db.connect).
QMOVER = "application_name like 'qmover %%'"
COUNT = "select datname, count(*) from pg_stat_activity where {who} and datname = any(%s) group by datname"


class ConnectionPeaks(threading.Thread):
    """The most connections seen on the central database, on the busiest of the
    others and on them all, sampled over conn (closed at stop()) every `every`
    seconds (settable while it runs).  Only the databases named count: another
    run may share the server.  who: which connections count (an SQL condition
    on pg_stat_activity)."""

    def __init__(self, conn: connection, central: str, others: Sequence[str], who: str = QMOVER,
                 every: float = 0.05):
        super().__init__(daemon=True)
        self.conn = conn
        self.every = every
        self.central = self.partition = self.total = 0
        self._central_name = central
        self._names = [central, *others]
        self._query = COUNT.format(who=who)
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        with self.conn.cursor() as cur:
            while not self._done.wait(self.every):
                cur.execute(self._query, (self._names,))
                counts = dict(cur.fetchall())
                central = counts.pop(self._central_name, 0)
                self.central = max(self.central, central)
                self.partition = max([self.partition, *counts.values()])
                self.total = max(self.total, central + sum(counts.values()))

    def stop(self) -> tuple[int, int, int]:
        """Stop sampling; the peaks: central, busiest other, all."""
        self._done.set()
        self.join()
        self.conn.close()
        return self.central, self.partition, self.total
