"""Connections per database, sampled on a connection of its own: the peaks the
connection bounds are checked against, for the benchmarks and the tests."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from psycopg2.extensions import connection

# qmover's own sessions, as an SQL condition on pg_stat_activity: qmover.pg.db.connect
# names each by its process ("qmover <pid>"); no % in it, so any query can hold it.
QMOVER = "starts_with(application_name, 'qmover ')"
SESSIONS = ("select datname, pid, backend_start, client_addr << '127.0.0.0/8' or client_addr = '::1'"
            " from pg_stat_activity where {who} and datname = any(%s)")
ESTABLISHED = "01"  # the state column of /proc/net/tcp*


def established_sockets(server_port: int) -> set[int]:
    """The inodes of this host's sockets on the server's side of server_port that are still ESTABLISHED.

    A client that closes its connection moves the server's socket out of
    ESTABLISHED at once, while the backend stays in pg_stat_activity until it
    has exited, which on a busy machine can outlast the opening of the next
    connection.  The client's port is no test: on loopback Linux reuses a
    closed connection's port for the next one at once, maybe another
    process's."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == ESTABLISHED and int(fields[1].rsplit(":", 1)[1], 16) == server_port:
                inodes.add(int(fields[9]))
    return inodes


def sockets_of(pid: int) -> set[int] | None:
    """The inodes of the sockets a process holds; None when they cannot be read (another user's process)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    found = set()
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
    return found


class ConnectionPeaks(threading.Thread):
    """The most connections seen on the central database, on the busiest of the
    others and on them all, sampled over conn (closed at stop()) every `every`
    seconds (settable while it runs).  Only the databases named count: another
    run may share the server.  who: which connections count (an SQL condition
    on pg_stat_activity).  A connection over loopback counts while its backend's
    socket is ESTABLISHED (established_sockets); one from another address, over
    a Unix socket, or of a backend whose sockets cannot be read, while its
    backend is there."""

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
        self._sockets: dict[tuple, set[int] | None] = {}  # (pid, backend_start) -> its sockets, read once
        self.start()

    def run(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute("select inet_server_port()")
            (server_port,) = cur.fetchone() or (None,)
            while not self._done.wait(self.every):
                cur.execute(self._query, (self._names,))
                sessions = cur.fetchall()
                open_ = None if server_port is None else established_sockets(server_port)  # None: a Unix socket
                counts = Counter(name for name, pid, started, loopback in sessions
                                 if not loopback or open_ is None or self._holds_open(pid, started, open_))
                self._sockets = {key: self._sockets[key] for key in
                                 {(pid, started) for _, pid, started, _ in sessions} if key in self._sockets}
                central = counts.pop(self._central_name, 0)
                self.central = max(self.central, central)
                self.partition = max([self.partition, *counts.values()])
                self.total = max(self.total, central + sum(counts.values()))
                self.samples += 1

    def _holds_open(self, pid: int, started: object, established: set[int]) -> bool:
        """Whether the backend's connection is still open on its side (or its sockets cannot be read)."""
        key = (pid, started)
        if key not in self._sockets:
            self._sockets[key] = sockets_of(pid)
        sockets = self._sockets[key]
        return sockets is None or bool(sockets & established)

    def stop(self) -> tuple[int, int, int]:
        """Stop sampling; the peaks: central, busiest other, all."""
        self._done.set()
        self.join()
        self.conn.close()
        return self.central, self.partition, self.total
