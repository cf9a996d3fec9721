"""Databases and clusters the demo, the benchmarks and the tests make for themselves."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection


def connect(server: str, database: str, autocommit: bool = True) -> connection:
    conn = psycopg2.connect(f"{server} dbname={database}")
    conn.autocommit = autocommit
    return conn


def value(conn: connection, query: str | sql.Composable, params: tuple | None = None) -> Any:
    """The first value of the query's first row (None without one), on a connection of the lab's own."""
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    return None if row is None else row[0]


def run_sql(server: str, database: str, *statements: str | sql.Composable) -> list[tuple]:
    """Run statements in autocommit on a fresh connection; the last one's rows."""
    rows: list[tuple] = []
    with closing(connect(server, database)) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
            rows = cur.fetchall() if cur.description else []
    return rows


def drop_database(server: str, name: str) -> None:
    run_sql(server, "postgres", sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def recreate_database(server: str, name: str) -> None:
    drop_database(server, name)
    run_sql(server, "postgres", sql.SQL("create database {}").format(sql.Identifier(name)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bindir() -> Path:
    configured = os.environ.get("QMOVER_TEST_PG_BINDIR")
    if configured:
        return Path(configured)
    found = subprocess.run(["pg_config", "--bindir"], check=False, capture_output=True, text=True)
    bindir = Path(found.stdout.strip())
    # Debian's pg_config names the client's directory; the server tools sit beside postgres
    if not (bindir / "initdb").exists():
        bindir = Path("/usr/lib/postgresql/15/bin")
    return bindir


class Cluster:
    """A PostgreSQL cluster of its own (initdb on a free port), removed by close().

    PostgreSQL refuses to run as root, so as root the cluster belongs to the
    postgres user.  auth="scram" makes TCP logins need the superuser's password.
    """

    def __init__(self, auth: str = "trust", password: str = "soak-secret", settings: dict[str, str] | None = None,
                 network: tuple[str, str] | None = None):
        """network: (address, subnet): the cluster listens on that address too,
        and takes logins from the subnet with the password alone."""
        self.port = free_port()
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="qmover-cluster-"))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.bindir = _pg_bindir()
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        pwfile = self.root / "pwfile"
        pwfile.write_text(password + "\n")
        if self.as_owner:
            shutil.chown(pwfile, "postgres", "postgres")
        host_auth = "scram-sha-256" if auth == "scram" else "trust"
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync",
                 "--auth-local=trust", f"--auth-host={host_auth}", f"--pwfile={pwfile}")
        if network is not None:
            with (self.data / "pg_hba.conf").open("a") as file:
                file.write(f"host all all {network[1]} scram-sha-256\n")
        listen = "127.0.0.1" if network is None else f"127.0.0.1,{network[0]}"
        conf = {"port": str(self.port), "listen_addresses": f"'{listen}'",
                "unix_socket_directories": f"'{self.root}'", "max_connections": "60",
                "logging_collector": "off", **(settings or {})}
        with (self.data / "postgresql.conf").open("a") as file:
            file.writelines(f"{key} = {value}\n" for key, value in conf.items())
        self.start()

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_owner, str(self.bindir / tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def dsn(self, dbname: str = "postgres", password: bool = False) -> str:
        secret = f" password={self.password}" if password else ""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}{secret}"

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """mode "immediate" is a crash: no checkpoint, recovery from WAL at the next start."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast", down: float = 0.0) -> None:
        self.stop(mode)
        time.sleep(down)
        self.start()

    def connect(self, dbname: str = "postgres") -> psycopg2.extensions.connection:
        conn = psycopg2.connect(self.dsn(dbname, password=True))
        conn.autocommit = True
        return conn

    def execute(self, dbname: str, query: str, params: tuple | None = None) -> list[tuple]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
