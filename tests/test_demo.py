"""The README's main command: the demo runs end to end and says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import psycopg2
from psycopg2 import sql

from celery_helpers import Redis, free_port
from conftest import ADMIN_DSN

MARKER = "Demo-pw-marker-93e1"


def test_demo_moves_everything_and_prints_the_table(tmp_path):
    prefix = f"qmt_demo_{uuid.uuid4().hex[:8]}"
    broker = Redis()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "qmover_lab.demo", "--seconds", "3", "--prefix", prefix,
             "--flower-port", str(free_port()), "--workdir", str(tmp_path),
             "--server", f"host=127.0.0.1 password={MARKER}"],  # trust auth ignores it; qmover hides it
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "QMOVER_BROKER_URL": broker.url})
    finally:
        broker.close()
        admin = psycopg2.connect(ADMIN_DSN)
        admin.autocommit = True
        with admin.cursor() as cur:
            for name in (f"{prefix}_part1", f"{prefix}_part2", f"{prefix}_central"):
                cur.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        admin.close()

    assert result.returncode == 0, result.stdout + result.stderr
    produced = int(re.search(r"central queue: (\d+) events, produced: \1, every event exactly once",
                             result.stdout).group(1))
    rows = re.findall(rf"^({prefix}_part\d)\s+(\d+)\s+(\d+)\s+[\d.]+$", result.stdout, re.M)
    assert len(rows) == 2
    assert sum(int(events) for _, events, _ in rows) == produced > 0
    assert "stopped worker, beat and Flower" in result.stdout
    logs = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    assert MARKER not in result.stdout + result.stderr + logs
