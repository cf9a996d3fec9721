"""Connections per database, sampled on a connection of its own: the peaks the
connection bounds are checked against, for the benchmarks and the tests."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from psycopg2.extensions import connection

# qmover's own sessions, as an SQL condition on pg_stat_activity: qmover.pg.db.connect
# names each by its process ("qmover <pid>"); no % in it, so any query can hold it.
QMOVER = "starts_with(application_name, 'qmover ')"
SESSIONS = ("select datname, client_port, client_addr << '127.0.0.0/8' or client_addr = '::1'"
            " from pg_stat_activity where {who} and datname = any(%s)")
ESTABLISHED = "01"  # the state column of /proc/net/tcp*


def open_client_ports(server_port: int) -> set[int]:
    """This host's ports with a TCP connection to server_port still open on the client's side.

    A client that closed its connection is gone from here at once, while its
    backend stays in pg_stat_activity until that process has exited, which
    on a busy machine can outlast the opening of the next connection (seen
    with one connection open at a time): such a backend is not counted."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, remote, state = line.split()[1:4]
            if state == ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


class ConnectionPeaks(threading.Thread):
    """The most connections seen on the central database, on the busiest of the
    others and on them all, sampled over conn (closed at stop()) every `every`
    seconds (settable while it runs).  Only the databases named count: another
    run may share the server.  who: which connections count (an SQL condition
    on pg_stat_activity).  A connection over loopback counts while its client
    holds it open (open_client_ports); one from another address, or over a
    Unix socket, while its backend is there."""

    def __init__(self, conn: connection, central: str, others: Sequence[str], who: str = QMOVER,
                 every: float = 0.05):
        super().__init__(daemon=True)
        self.conn = conn
        self.every = every
        self.central = self.partition = self.total = 0
        self.samples = 0  # taken so far
        self._central_name = central
        self._names = [central, *others]
        self._query = SESSIONS.format(who=who)
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute("select inet_server_port()")
            (server_port,) = cur.fetchone() or (None,)
            while not self._done.wait(self.every):
                cur.execute(self._query, (self._names,))
                sessions = cur.fetchall()
                local = None if server_port is None else open_client_ports(server_port)  # None: over a Unix socket
                counts = Counter(name for name, port, loopback in sessions
                                 if not loopback or local is None or port in local)
                central = counts.pop(self._central_name, 0)
                self.central = max(self.central, central)
                self.partition = max([self.partition, *counts.values()])
                self.total = max(self.total, central + sum(counts.values()))
                self.samples += 1

    def stop(self) -> tuple[int, int, int]:
        """Stop sampling; the peaks: central, busiest other, all."""
        self._done.set()
        self.join()
        self.conn.close()
        return self.central, self.partition, self.total
