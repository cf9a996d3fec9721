"""Celery worker, beat and Flower as child processes, for the demo, the
benchmark and the tests.  Each runs in a process group of its own, so that
stopping it stops its pool too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path


def start_celery(config: Path, log: Path, *args: str, app: str = "qmover.tasks", mode: str = "a",
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 python: str = sys.executable) -> subprocess.Popen:
    """`celery -A app ARGS` with QMOVER_CONFIG set, its output into log (opened with mode).

    python: the interpreter of another virtual environment (another Celery release, say).
    """
    output = log.open(mode)
    return subprocess.Popen([python, "-m", "celery", "-A", app, *args],
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
