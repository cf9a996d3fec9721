"""Throwaway servers a test starts itself, so that it can stop, crash and
restart them without touching the machine's own PostgreSQL and Redis
(Cluster lives in qmover_lab.sandbox: the fan-in benchmark runs one too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2
import redis

from qmover_lab.sandbox import Cluster

from celery_helpers import free_port, wait_until

__all__ = ["Cluster", "PgBouncer", "RedisServer"]


class RedisServer:
    """A Redis server of its own on a free port, keeping nothing on disk."""

    def __init__(self, start: bool = True, address: str | None = None, password: str | None = None) -> None:
        """address: listen there too (then with a password: nothing beyond loopback without one)."""
        assert address is None or password, "a Redis beyond loopback needs a password"
        self.port = free_port()
        self.address = address
        self.password = password
        self.process: subprocess.Popen | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return self.url_at("127.0.0.1")

    def url_at(self, address: str) -> str:
        secret = f":{self.password}@" if self.password else ""
        return f"redis://{secret}{address}:{self.port}/0"

    def start(self) -> None:
        bind = "127.0.0.1" if self.address is None else f"127.0.0.1 {self.address}"
        secret = [] if self.password is None else ["--requirepass", self.password]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", bind, "--save", "", "--appendonly", "no",
             *secret], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=self.password)
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


class PgBouncer:
    """Debian's PgBouncer on a free loopback port, in front of the machine's
    PostgreSQL, in the given pool_mode; it logs in as whoever connects (trust,
    on loopback, like the server behind it)."""

    def __init__(self, pool_mode: str, pool_size: int = 4, server: str = "host=127.0.0.1 port=5432") -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="qmover-pgbouncer-"))
        (self.root / "users.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            f"[databases]\n* = {server}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'users.txt'}\npool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 500\n"
            f"logfile = {self.root / 'pgbouncer.log'}\npidfile = {self.root / 'pgbouncer.pid'}\n")
        as_owner: list[str] = []
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
            as_owner = ["runuser", "-u", "postgres", "--"]
        self.process = subprocess.Popen([*as_owner, "/usr/sbin/pgbouncer", str(self.root / "pgbouncer.ini")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 20, f"pgbouncer on port {self.port}")

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def _answers(self) -> bool:
        try:
            psycopg2.connect(self.dsn("postgres"), connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
