"""`qmover flower`: loopback unless told otherwise, and never a wider address without a login."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from qmover_lab.sandbox import free_port

from celery_helpers import Redis, wait_until

CONFIG = """
[qmover]
broker_url = {broker}

[route]
src_db = host=127.0.0.1 dbname=nowhere_src
dst_db = host=127.0.0.1 dbname=nowhere_dst
pgq_queue_name = events
dst_queue_name = events
"""


@pytest.fixture
def config(tmp_path):
    broker = Redis()
    path = tmp_path / "flower.ini"
    path.write_text(CONFIG.format(broker=broker.url))
    yield path
    broker.close()


def flower(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qmover", "flower", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def stop(process: subprocess.Popen) -> str:
    """Stop Flower; what it printed."""
    os.killpg(process.pid, signal.SIGTERM)
    return process.communicate(timeout=30)[0]


def status(url: str, credentials: str | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # not listening yet


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a TCP socket on this machine listens on at port (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_with_basic_auth_any_address_asks_for_credentials(config):
    port = free_port()
    process = flower(config, f"--port={port}", "--address=0.0.0.0", env={"FLOWER_BASIC_AUTH": "ops:s3cret"})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: status(url) != 0, timeout=60, what="Flower to listen")
        assert status(url) == 401
        assert status(url, "ops:wrong") == 401
        assert status(url, "ops:s3cret") == 200
    finally:
        printed = stop(process)
    assert "Visit me at" in printed and "s3cret" not in printed


def test_no_address_means_loopback_only(config):
    port = free_port()
    process = flower(config, f"--port={port}")
    try:
        wait_until(lambda: listening_addresses(port), timeout=60, what="Flower to listen")
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        stop(process)
