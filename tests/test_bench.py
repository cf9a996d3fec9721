"""The benchmarks run end to end (small: 3 routes; one workload), print every figure and clean up.

Its figures are not judged here: goals live in the benchmark's own output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import closing

import psycopg2
import psycopg2.extras

from qmover_lab.connections import ConnectionPeaks
from qmover_lab.live import unreaped
from qmover_lab.sandbox import Cluster

from celery_helpers import Redis, wait_until


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


def test_throughput_bench_times_each_step_and_process(tmp_path):
    """One small workload, floor and qmover: the run checks the copies itself
    (it fails when a target differs from the source) and prints each figure."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "qmover", "bench", "--no-sweep", "--no-celery",
                             "--latency-seconds", "0", "--only", "10 batches", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "qmover steps, ms a batch: next_batch" in result.stdout
    assert "qmover CPU, ms a batch: source" in result.stdout
    modes = {row["mode"]: row for row in json.loads(out.read_text())["workloads"]}
    assert set(modes) == {"floor", "qmover"}
    assert modes["floor"]["events"] == modes["qmover"]["events"] == 200_000
    assert set(modes["floor"]["cpu_ms"]) == {"server"}
    assert set(modes["qmover"]["cpu_ms"]) == {"source", "target", "client"}
    assert modes["qmover"]["cpu_ms"]["source"] > 0 and modes["qmover"]["cpu_ms"]["target"] > 0
    assert set(modes["qmover"]["step_ms"]) >= {"next_batch", "position", "before_target_commit", "after_target_commit"}


def test_live_bench_over_two_servers_with_an_outage_and_an_idle_phase(tmp_path):
    """Both tools, partitions on two throwaway clusters, ticks as pgqd ticks, the load alone
    first, central down 2 s: every figure printed, every event exactly once (the load-alone
    events moved by no tool), the clusters gone after."""
    broker = Redis()
    out = tmp_path / "live.json"
    try:
        result = subprocess.run([sys.executable, "-m", "qmover", "bench", "--routes", "4", "--rate", "5",
                                 "--seconds", "3", "--warmup", "3", "--servers", "2", "--ticks", "pgqd",
                                 "--outage", "2", "--idle", "1", "--idle-settle", "0", "--load-alone", "1",
                                 "--route-setting", "wake_on_tick = 1", "--pool", "threads",
                                 "--broker", broker.url, "--json", str(out)],
                                capture_output=True, text=True, timeout=600)
    finally:
        broker.close()
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("central down: backlog when it came back", "from the tick that closed its batch",
                "peak memory of the mover's processes", "busiest server", "idle (only ticks)",
                "the load alone, no mover (1 s before the tools)"):
        assert row in result.stdout, row
    found = json.loads(out.read_text())
    assert found["servers"] == 2 and found["ticks"] == "pgqd" and found["pool"] == "threads"
    assert found["load_alone"]["seconds"] == 1 and found["load_alone"]["machine_busy_pct"] > 0
    assert [run["tool"] for run in found["results"]] == ["qmover", "skytools"]
    for run in found["results"]:
        assert run["exactly_once"] and run["outage_backlog"] > 0 and run["outage_catch_up_s"] is not None
        assert run["probes"] > 0 and run["probes_not_arrived"] == 0 and run["peak_memory_mb"] > 0
        assert run["idle_busy_pct"] is not None and run["idle_stopped_busy_pct"] is not None
        assert set(run["idle_cpu_s"]) == {"mover", "postgres", "kernel", "postgres_stopped", "kernel_stopped"}


def test_connection_peaks_count_what_clients_hold_open_not_backends_left_behind(make_db):
    """A client that closed its connection is not counted, though its backend is
    still in pg_stat_activity (here: busy in a statement, as a backend is for a
    moment while it exits on a busy machine); one held open over TCP or a Unix
    socket is."""
    database, other = make_db(pgq=False), make_db(pgq=False)
    dsn = f"{database.dsn} application_name='qmover test'"
    left = psycopg2.connect(dsn, async_=1)
    psycopg2.extras.wait_select(left)
    left.cursor().execute("select pg_sleep(30)")
    left.close()  # the backend sleeps on, its client gone
    sockets = database.value("select split_part(current_setting('unix_socket_directories'), ',', 1)")
    held = [psycopg2.connect(dsn), psycopg2.connect(f"{dsn} host={sockets}")]
    try:
        mine = f"from pg_stat_activity where datname = '{database.name}' and application_name = 'qmover test'"
        assert database.execute(f"select count(*) {mine}") == [(3,)]
        peaks = ConnectionPeaks(other.connect(), database.name, [other.name], every=0.02)
        wait_until(lambda: peaks.samples >= 5, 10, "five samples")
        assert peaks.stop() == (2, 0, 2)
    finally:
        for conn in held:
            conn.close()


def test_a_backend_its_postmaster_has_not_reaped_is_waited_for():
    """The idle minute with the tools stopped starts once their backends are reaped
    (their CPU then in the postmaster's cutime): a backend that ended while its
    postmaster cannot reap it (stopped here) is counted until it is reaped."""
    cluster = Cluster()
    try:
        postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        ending = cluster.connect()
        with closing(cluster.connect()) as conn, conn.cursor() as cur:
            assert unreaped(cur, postmaster) == 0
            os.kill(postmaster, signal.SIGSTOP)
            try:
                ending.close()  # its backend exits, and stays a zombie while the postmaster is stopped
                wait_until(lambda: unreaped(cur, postmaster) == 1, 10, "the ended backend to be counted")
            finally:
                os.kill(postmaster, signal.SIGCONT)
            wait_until(lambda: unreaped(cur, postmaster) == 0, 10, "the postmaster to reap it")
    finally:
        cluster.close()
