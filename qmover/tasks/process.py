"""What a worker (or beat) process keeps from task to task, in one object.

Process holds the process's mover (its connections, claims and checks), the
readiness sweeper (used where sweeps run: beat), the counters' Redis
clients and the config files read.  It has one after-fork rule, in
current(): a process forked from another (a prefork pool's child) starts
with a new Process, and keeps its parent's referenced and untouched, since
closing, or collecting, one of the parent's connections would end the
parent's session on the server.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from qmover.config import Config, load_config
from qmover.ops.metrics import Counters
from qmover.protocol.mover import Mover
from qmover.protocol.readiness import Sweeper


class Process:
    """One process's state for qmover's tasks.  Thread- and greenlet-safe."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.mover = Mover(batch_log_level=logging.DEBUG)  # the task's result line says what moved
        self.in_beat = False  # beat's process, where sweeps run in place (qmover.tasks.jobs.RunsInBeat)
        self._lock = threading.Lock()
        self._sweeper: Sweeper | None = None
        self._counters: dict[str | None, Counters] = {}
        self._configs: dict[Path, tuple[float, Config]] = {}  # path -> (mtime, config)

    def config(self, path: Path) -> Config:
        """The config file, read again when it changes; its max_idle_connections bounds the mover's connector."""
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0  # load_config reports the missing file
        with self._lock:
            known = self._configs.get(path)
        if known is not None and known[0] == mtime:
            return known[1]
        config = load_config(path)
        with self._lock:
            self._configs[path] = (mtime, config)
            self.mover.connector.max_idle = config.max_idle_connections
        return config

    @property
    def sweeper(self) -> Sweeper:
        with self._lock:
            if self._sweeper is None:
                self._sweeper = Sweeper()
            return self._sweeper

    def counters(self, url: str | None) -> Counters:
        """One Redis client per process for the route counters (none when they are off)."""
        with self._lock:
            if url not in self._counters:
                self._counters[url] = Counters(url)
            return self._counters[url]


_current: Process | None = None
_parents: list[Process] = []  # a forked child's inherited Processes: kept, never used or closed
_lock = threading.Lock()


def current() -> Process:
    """This process's Process, a new one in a process forked from another."""
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            if _current is not None:
                _parents.append(_current)
            _current = Process()
        return _current
