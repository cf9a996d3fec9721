"""Celery worker, beat and Flower as child processes, for the demo, the
benchmarks and the tests (each in a process group of its own, so that
stopping it stops its pool too), and what the benchmarks read of processes
and of the machine in /proc."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def start_celery(config: Path, log: Path, *args: str, app: str = "qmover.tasks", mode: str = "a",
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 python: str = sys.executable, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """`celery -A app ARGS` with QMOVER_CONFIG set, its output into log (opened with mode);
    app "qmover": `qmover ARGS[0] CONFIG ARGS[1:]`, the command line's way to the same.

    python: the interpreter of another virtual environment (another Celery release, say).
    prefix: a command that runs it (`ip netns exec NS`: on another host).
    """
    output = log.open(mode)
    argv = ["-m", "qmover", args[0], str(config), *args[1:]] if app == "qmover" else ["-m", "celery", "-A", app, *args]
    return subprocess.Popen([*prefix, python, *argv],
                            stdout=output, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                            env={**os.environ, "QMOVER_CONFIG": str(config), "PYTHONUNBUFFERED": "1", **(env or {})})


def stop(processes: Iterable[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM (Celery's warm shutdown) to every group, then SIGKILL what is left after timeout."""
    running = list(processes)
    for process in running:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name, from the state on
    (proc(5) numbers them from 3); None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of the processes and of their children that ended (PostgreSQL's
    backends and autovacuum workers, say)."""
    ticks = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")



def pool_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []



def wait_for_celery(logs: list[Path], workers: int, timeout: float = 60) -> None:
    """Until the workers say ready and beat has swept once (idle routes get no task to wait for)."""
    deadline = time.monotonic() + timeout
    while True:
        text = "".join(log.read_text() for log in logs if log.exists())
        if text.count(" ready.") >= workers and re.search(r"Task qmover.sweep\[\S+\] succeeded", text):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"Celery did not start; see {', '.join(map(str, logs))}")
        time.sleep(0.1)



def move_results(log: str) -> list[str]:
    """The results of every move_next_batch task a worker log says succeeded (Celery's own line)."""
    return re.findall(r"Task qmover.move_next_batch\[\S+\] succeeded in \S+: (\{.*\})", log)


def moves_in(log: str) -> list[dict[str, Any]]:
    """The results of the move tasks a worker log says succeeded, as dicts."""
    return [ast.literal_eval(result) for result in move_results(log)]


def pids_named(name: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith(name):
                found.append(int(pid))
        except OSError:
            pass
    return found



def machine_busy() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)
