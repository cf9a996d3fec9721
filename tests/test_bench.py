"""The fan-in benchmark runs end to end (small: 3 routes), prints every figure and cleans up.

Its figures are not judged here: goals live in the benchmark's own output.
"""

from __future__ import annotations

import json
import subprocess
import sys

from celery_helpers import Redis


def test_fan_in_bench_prints_every_figure_and_drops_what_it_made(tmp_path):
    broker = Redis()
    out = tmp_path / "fanin.json"
    try:
        result = subprocess.run([sys.executable, "-m", "qmover", "bench", "--routes", "3", "--broker", broker.url,
                                 "--idle-seconds", "1", "--latency-seconds", "2", "--json", str(out)],
                                capture_output=True, text=True, timeout=300)
    finally:
        broker.close()
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("drain 3 x 1,000 events", "the same events through one route", "peak connections on the central",
                "peak connections on the server", "machine busy, nothing to move", "memory of beat and workers",
                "tick on a partition -> in central", "status of all 4 routes", "with qmover stopped",
                "server CPU of moving one 1,000-event batch", "the floor of any polling"):
        assert row in result.stdout, row
    found = json.loads(out.read_text())
    setups = {setup["setup"]: setup for setup in found["setups"]}
    assert set(setups) == {"one worker -c 2", "two workers -c 1"}
    for setup in setups.values():
        assert setup["drain_s"] > 0 and setup["one_route_drain_s"] > 0
        assert setup["worker_processes"] == 2
        assert setup["latency"]["events"] > 0 and setup["latency"]["not_arrived"] == 0
    assert all(moved > 0 for moved in setups["two workers -c 1"]["batches_moved_by_each_worker"])
    assert set(found["server_cpu_per_move"]) == {"fresh_source_ms", "kept_source_ms"}  # 3 moves: too few to compare
