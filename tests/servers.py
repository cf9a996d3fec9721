"""Throwaway servers a test starts itself, so that it can stop, crash and
restart them without touching the machine's own PostgreSQL and Redis
(Cluster lives in qmover_lab.sandbox: the fan-in benchmark runs one too)."""

from __future__ import annotations

import subprocess
import time

import redis

from qmover_lab.sandbox import Cluster

from celery_helpers import free_port, wait_until

__all__ = ["Cluster", "RedisServer"]


class RedisServer:
    """A Redis server of its own on a free port, keeping nothing on disk."""

    def __init__(self, start: bool = True) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        wait_until(lambda: self._pings(client), 20, f"redis-server on port {self.port}")
        client.close()

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """SIGKILL: whatever the broker held in memory is gone, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self, down: float = 0.0) -> None:
        self.stop()
        time.sleep(down)
        self.start()

    def close(self) -> None:
        self.stop()
