"""Metrics: counters kept in Redis, gauges read at scrape time, Prometheus text."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import urllib.request
from contextlib import closing

import pytest
import redis

from qmover.protocol.readiness import Sweeper

from celery_helpers import Redis, error_lines, events_per_route, free_port, move_results, wait_until
from conftest import claim_as_another_mover

SAMPLE = re.compile(r'^(qmover_[a-z_]+)\{route="([^"]+)"\} (\S+)$')


def samples(text: str) -> dict[tuple[str, str], float]:
    """(metric, route) -> value; every line must be a comment or a sample."""
    found = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE.match(line)
        assert match, f"not Prometheus text: {line!r}"
        found[(match[1], match[2])] = float(match[3])
    return found


@pytest.fixture
def metrics_redis():
    db = Redis()
    yield db
    db.close()


def with_metrics_url(route, url: str) -> None:
    route.config.write_text(route.config.read_text() + f"\n[qmover]\nmetrics_url = {url}\n")


def test_status_prometheus_counts_what_run_moved(route, metrics_redis):
    with_metrics_url(route, metrics_redis.url)
    for n in range(3):
        route.src.produce_series(route.src_queue, 10 + n, tag=f"b{n}-")
        route.src.tick(route.src_queue)
    route.qmover("run", "--once", check=True)

    text = route.qmover("status", "--prometheus", check=True).stdout

    found = samples(text)
    name = route.name
    assert found[("qmover_events_moved_total", name)] == 33
    assert found[("qmover_batches_moved_total", name)] == 1  # the three waiting ticks, as one batch
    assert found[("qmover_batches_skipped_total", name)] == 0
    assert found[("qmover_errors_total", name)] == 0
    assert found[("qmover_pending_events", name)] == 0
    assert found[("qmover_route_up", name)] == 1
    assert found[("qmover_source_lag_seconds", name)] >= 0
    assert found[("qmover_last_success_timestamp_seconds", name)] > 1.7e9
    assert "# TYPE qmover_events_moved_total counter" in text


def test_a_failing_route_counts_errors_and_is_down(route, metrics_redis):
    with_metrics_url(route, metrics_redis.url)
    route.dst.execute("select pgq.drop_queue('copy_of_eventlog')")
    route.src.produce_series(route.src_queue, 5)
    route.src.tick(route.src_queue)
    for _ in range(2):
        assert route.qmover("run", "--once").returncode == 1

    found = samples(route.qmover("status", "--prometheus", check=True).stdout)

    assert found[("qmover_errors_total", route.name)] == 2
    assert found[("qmover_route_up", route.name)] == 0
    assert ("qmover_last_success_timestamp_seconds", route.name) not in found


def test_counters_count_where_the_redis_refuses_scripts(route, metrics_redis):
    """A Redis user without scripting (an ACL): the counters go a command at a time."""
    admin = redis.Redis.from_url(metrics_redis.url)
    user = f"qmover_no_scripts_{os.getpid()}"
    admin.acl_setuser(user, enabled=True, nopass=True, keys=["*"], commands=["+@all", "-@scripting"])
    try:
        with_metrics_url(route, metrics_redis.url.replace("redis://", f"redis://{user}:any@"))
        for n in range(2):
            route.src.produce_series(route.src_queue, 10 + n, tag=f"b{n}-")
            route.src.tick(route.src_queue)
            result = route.qmover("run", "--once", check=True)
            assert result.stderr.count("counted without a Lua script") == 1  # once a process

        found = samples(route.qmover("status", "--prometheus", check=True).stdout)
        assert found[("qmover_events_moved_total", route.name)] == 21
        assert found[("qmover_batches_moved_total", route.name)] == 2
        assert found[("qmover_last_success_timestamp_seconds", route.name)] > 1.7e9
    finally:
        admin.acl_deluser(user)
        admin.close()


def test_moving_goes_on_when_redis_is_away(route):
    with_metrics_url(route, f"redis://127.0.0.1:{free_port()}/0")
    for n in range(2):
        route.src.produce_series(route.src_queue, 10, tag=f"b{n}-")
        route.src.tick(route.src_queue)

    result = route.qmover("run", "--once", check=True)

    assert result.stderr.count("metrics not recorded: the Redis of metrics_url failed") == 1
    assert len(route.target_events()) == 20


def test_a_failing_metrics_store_never_fails_a_move_task(pipeline):
    """metrics_url names a server that is no Redis (RabbitMQ's port): every
    write fails, yet every task succeeds, with one warning in the log."""
    pipe = pipeline(2)
    pipe.config.write_text(pipe.config.read_text() + "metrics_url = redis://127.0.0.1:5672/0\n")
    pipe.procs.worker(concurrency=1)
    pipe.procs.beat()
    produced = pipe.produce(3)
    pipe.wait_for(produced)

    log = pipe.procs.log("worker")
    assert log.count("metrics not recorded") == 1
    assert error_lines(log) == []  # a failed task is logged at ERROR
    assert events_per_route(move_results(log)).get("partition_1", 0) > 0


def test_worker_and_metrics_command_serve_the_same_numbers(pipeline):
    pipe = pipeline(2, password="metrics-secret-pw")
    port = free_port()
    pipe.procs.env["QMOVER_METRICS_PORT"] = str(port)
    pipe.procs.worker(concurrency=1)
    pipe.procs.beat()
    produced = pipe.produce(3)
    pipe.wait_for(produced)

    def scrape(at: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{at}/metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return response.read().decode()

    def served() -> bool:
        try:
            return sum(samples(scrape(port)).get(("qmover_events_moved_total", f"partition_{n}"), 0)
                       for n in range(2)) == produced
        except OSError:
            return False

    wait_until(served, 30, "the worker's /metrics to count every event")
    other = free_port()
    command = subprocess.Popen([sys.executable, "-m", "qmover", "metrics", str(pipe.config), "--port", str(other)],
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _answers(other), 30, "qmover metrics to listen")
        from_command = samples(scrape(other))
    finally:
        command.terminate()
        command.wait(10)

    for n in range(2):
        assert from_command[("qmover_events_moved_total", f"partition_{n}")] == produced / 2
        assert from_command[("qmover_route_up", f"partition_{n}")] == 1
    assert "metrics-secret-pw" not in scrape(port)
    asking = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                    headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(asking, timeout=10) as response:  # a scraper that speaks OpenMetrics gets it
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        body = response.read().decode()
    assert "# TYPE qmover_events_moved counter" in body and body.endswith("# EOF\n")


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).close()
        return True
    except OSError:
        return False


def test_a_route_held_too_long_shows_in_status_metrics_and_the_sweep_log(route, caplog):
    """Who holds it and for how long; past its move_budget + 30 s, a warning naming the holder."""
    route.src.produce_series(route.src_queue, 5)
    route.src.tick(route.src_queue)
    with closing(route.dst.connect()) as holder, holder.cursor() as cur:
        claim_as_another_mover(cur, route.name)
        cur.execute("update qmover.claim set since = now() - interval '100 seconds'")

        rows = json.loads(route.qmover("status", "--json", check=True).stdout)
        table = route.qmover("status", check=True).stdout
        found = samples(route.qmover("status", "--prometheus", check=True).stdout)
        with closing(Sweeper()) as sweeper, caplog.at_level(logging.WARNING, "qmover.protocol.readiness"):
            assert sweeper.ready([route.route()], 5) == []  # held: no task for it
            assert sweeper.ready([route.route()], 5) == []

    assert rows[0]["held_by"] == "another mover" and 100 <= rows[0]["held_seconds"] < 200
    said = ("route eventlog_to_target_mover: held by another mover for 10\\d s, beyond its move_budget \\(10 s\\) "
            "by more than 30 s: that mover is stuck or cut off; its claim ends 15 s after its last renewal, or "
            "with its session")
    assert re.fullmatch(said, rows[0]["held_too_long"])
    assert re.fullmatch("warning: " + said, table.splitlines()[-1])
    assert 100 <= found[("qmover_route_held_seconds", route.name)] < 200
    assert [re.fullmatch(said, record.getMessage()) is not None for record in caplog.records] == [True]  # once

    rows = json.loads(route.qmover("status", "--json", check=True).stdout)  # the holder's session ended
    assert (rows[0]["held_by"], rows[0]["held_seconds"], rows[0]["held_too_long"]) == (None, None, None)
