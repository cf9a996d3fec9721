"""Real Celery workers, beat and Flower as child processes of a test."""

from __future__ import annotations

import ast
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import redis

from qmover_lab.processes import move_results, moves_in, start_celery, wait_for_celery  # noqa: F401 (the tests import them from here)
from qmover_lab.processes import stop as stop_celery
from qmover_lab.sandbox import free_port  # noqa: F401 (the tests import it from here)

# The Celery whose worker, beat and Flower the tests start: the newest, in this
# venv; with QMOVER_CELERY=5.4, the release scripts/setup.sh put in .venv-celery-5.4.
CELERY_RELEASE = os.environ.get("QMOVER_CELERY")
CELERY_PYTHON = (str(Path(__file__).resolve().parents[1] / f".venv-celery-{CELERY_RELEASE}" / "bin" / "python")
                 if CELERY_RELEASE else sys.executable)


# Celery releases whose worker exits ("Unrecoverable error: AttributeError ... 'hostname'") when its
# Redis connection drops while it holds unacknowledged tasks: 5.7.0's consumer closes the
# connection again after collect() has detached its transport.  Run under a supervisor, the
# worker comes back (tests/test_celery.py::test_a_redis_restart_while_the_worker_holds_tasks).
EXITS_ON_REDIS_LOSS = frozenset({"5.7.0"})


def celery_under_test() -> tuple[str, str]:
    """(celery, kombu) versions of CELERY_PYTHON's environment."""
    script = "import celery, kombu; print(celery.__version__, kombu.__version__)"
    versions = subprocess.run([CELERY_PYTHON, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return versions[0], versions[1]


def earlier_celery_releases() -> list[str]:
    """The minors of scripts/celery-releases.txt."""
    lines = (Path(__file__).resolve().parents[1] / "scripts" / "celery-releases.txt").read_text().splitlines()
    return [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def events_per_route(results: Iterable[str]) -> dict[str, int]:
    """Events moved per route, summed over move_next_batch results as Flower or a worker log shows them."""
    totals: dict[str, int] = {}
    for result in results:
        for route, events in ast.literal_eval(result)["moved"].items():
            totals[route] = totals.get(route, 0) + events
    return totals




def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "ERROR" in line or "CRITICAL" in line or "Traceback" in line]


class Redis:
    """A Redis database of the machine's server, the test's alone, emptied before and after it.

    Test runs side by side (scripts/test.sh runs two) share the server: each
    database 1-15 is taken by a key in database 0 that only one test can set,
    and that lapses if its run is killed."""

    CLAIM = "qmover-tests:redis-db:{}"

    def __init__(self, port: int = 6379):
        self.port = port
        self._claims = redis.Redis(host="127.0.0.1", port=port, db=0)
        taken = (db for db in random.sample(range(1, 16), 15)
                 if self._claims.set(self.CLAIM.format(db), os.getpid(), nx=True, ex=1800))
        self.db = next(taken, None)
        if self.db is None:
            raise AssertionError("every Redis database 1-15 is taken by other tests")
        self.client = redis.Redis(host="127.0.0.1", port=port, db=self.db)
        self.client.flushdb()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    def everything(self) -> bytes:
        """Every key and value, for secret scans."""
        dump = b""
        for key in self.client.scan_iter():
            kind = self.client.type(key)
            if kind == b"string":
                value = self.client.get(key) or b""
            elif kind == b"list":
                value = b"".join(self.client.lrange(key, 0, -1))
            elif kind == b"hash":
                value = b"".join(k + v for k, v in self.client.hgetall(key).items())
            elif kind == b"zset":
                value = b"".join(self.client.zrange(key, 0, -1))
            elif kind == b"set":
                value = b"".join(self.client.smembers(key))
            else:
                value = b""
            dump += key + b"=" + value + b"\n"
        return dump

    def close(self) -> None:
        self.client.flushdb()
        self.client.close()
        self._claims.delete(self.CLAIM.format(self.db))
        self._claims.close()


class RabbitVhost:
    """A virtual host of the machine's RabbitMQ (127.0.0.1:5672, guest), deleted after a test."""

    def __init__(self) -> None:
        self.name = f"qmt_{random.getrandbits(48):012x}"
        self._ctl("add_vhost", self.name)
        self._ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:5672/{self.name}"

    @staticmethod
    def _ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    def close(self) -> None:
        self._ctl("delete_vhost", self.name)


class Processes:
    """Celery processes for one config; each logs to its own file."""

    def __init__(self, config: Path, logdir: Path, cwd: Path | None = None, app: str = "qmover.tasks",
                 env: dict[str, str] | None = None, python: str = CELERY_PYTHON, prefix: Sequence[str] = ()):
        self.config = config
        self.python = python  # the interpreter of the environment whose Celery runs
        self.logdir = logdir
        self.cwd = cwd
        self.app = app
        self.env = dict(env or {})  # on top of the test's environment and QMOVER_CONFIG
        self.running: dict[str, subprocess.Popen] = {}
        self.prefix = list(prefix)  # runs each process (`ip netns exec NS`: on another host)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        process = start_celery(self.config, self.logdir / f"{name}.log", *args, app=self.app, env=self.env,
                               cwd=self.cwd, python=self.python, prefix=self.prefix)
        self.running[name] = process
        return process

    def worker(self, name: str = "worker", concurrency: int = 1, *extra: str) -> subprocess.Popen:
        return self.start(name, "worker", "-l", "info", "-c", str(concurrency), "-n", f"{name}@%h",
                          "--without-mingle", "--without-gossip", *extra)

    def beat(self) -> subprocess.Popen:
        return self.start("beat", "beat", "-l", "info", "-s", str(self.logdir / "beat-schedule"))

    def flower(self, port: int) -> subprocess.Popen:
        self.env["FLOWER_UNAUTHENTICATED_API"] = "true"
        return self.start("flower", "flower", f"--port={port}", "--address=127.0.0.1")

    def exited(self, name: str) -> bool:
        """Whether the process ended on its own (a supervisor would restart it)."""
        return self.running[name].poll() is not None

    def kill(self, name: str) -> None:
        """SIGKILL a process and its children (the worker's pool)."""
        process = self.running.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self, timeout: float = 30) -> None:
        stop_celery(self.running.values(), timeout)
        self.running.clear()

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        return "".join(path.read_text() for path in sorted(self.logdir.glob("*.log")))
