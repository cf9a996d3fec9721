"""The Celery pipeline with real workers, beat, Flower and Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from celery_helpers import (
    CELERY_PYTHON,
    CELERY_RELEASE,
    EXITS_ON_REDIS_LOSS,
    Processes,
    Redis,
    celery_under_test,
    earlier_celery_releases,
    error_lines,
    events_per_route,
    move_results,
    moves_in,
    wait_until,
)
from conftest import run_qmover
from servers import RedisServer


@pytest.mark.celery_release
def test_the_celery_under_test_is_the_release_asked_for_with_the_kombu_of_its_minor():
    """QMOVER_CELERY=5.4 runs Celery 5.4 with kombu 5.4; without it, the newest, newer than every earlier one."""
    celery, kombu = celery_under_test()
    minor = celery.rsplit(".", 1)[0]
    print(f"celery {celery}, kombu {kombu}")
    assert kombu.rsplit(".", 1)[0] == minor
    if CELERY_RELEASE:
        assert minor == CELERY_RELEASE
    else:
        assert all(tuple(map(int, minor.split("."))) > tuple(map(int, earlier.split(".")))
                   for earlier in earlier_celery_releases())


@pytest.mark.celery_release
def test_worker_and_beat_move_two_routes_exactly_once(pipeline):
    pipe = pipeline(2, first_extra="ticker = source")  # partition_0 is ticked by beat, not by the test
    pipe.parts[0].execute("select pgq.set_queue_config('events', 'ticker_max_lag', '0.2 seconds')")
    pipe.procs.worker(concurrency=2)
    pipe.procs.beat()
    produced = 0
    for _ in range(6):
        produced += pipe.produce(3, skip_tick=(0,))
        time.sleep(0.5)

    pipe.wait_for(produced)

    logs = pipe.procs.logs()
    assert error_lines(logs) == []
    assert "qmover.tick_database" in logs
    assert events_per_route(move_results(pipe.procs.log("worker"))) == {"partition_0": produced // 2,
                                                                       "partition_1": produced // 2}


@pytest.mark.celery_release
def test_three_workers_share_four_routes(pipeline):
    pipe = pipeline(4)
    for n in range(3):
        pipe.procs.worker(f"worker{n}", concurrency=1)
    pipe.procs.beat()
    produced = 0
    for _ in range(5):
        produced += pipe.produce(4)
        time.sleep(0.5)

    pipe.wait_for(produced)

    moved_by = {n: {route for route, events in events_per_route(move_results(pipe.procs.log(f"worker{n}"))).items()
                    if events} for n in range(3)}
    assert sum(1 for routes in moved_by.values() if routes) >= 2, moved_by
    assert set().union(*moved_by.values()) == {f"partition_{n}" for n in range(4)}
    assert error_lines(pipe.procs.logs()) == []


@pytest.mark.celery_release
def test_sweeps_send_no_second_task_for_a_route_being_moved(pipeline):
    """While a task moves a 300,000-event batch, sweeps every 0.2 s find the
    route claimed and send nothing more for it."""
    pipe = pipeline(1, interval=0.2)
    pipe.parts[0].produce_series("events", 300_000, size=60, tag="big")
    pipe.parts[0].tick("events")
    produced = 300_000 + pipe.produce(3)
    pipe.procs.worker(concurrency=3)
    pipe.procs.beat()

    pipe.wait_for(produced, timeout=120)

    log, beat = pipe.procs.log("worker"), pipe.procs.log("beat")
    big = re.search(r"\[([\d-]+ [\d:,]+): INFO/\S+\] Task qmover.move_next_batch\[(\S+)\] succeeded in \S+: "
                    r"\{'moved': \{'partition_0': 3000\d\d", log)
    received = re.search(rf"\[([\d-]+ [\d:,]+): INFO/MainProcess\] Task qmover.move_next_batch\[{big[2]}\] received",
                         log)
    sweeps = re.findall(r"\[([\d-]+ [\d:,]+): INFO/MainProcess\] Task qmover.sweep\[\S+\] succeeded in \S+: "
                        r"(\{.*\})", beat)
    # The first sweep in the window may have looked before the task took its claim.
    during = [sent for at, sent in sweeps if received[1] < at < big[1]][1:]  # timestamps sort as text
    assert during, "no sweep ended while the big batch moved"
    assert all("partition_0" not in sent for sent in during), during  # each found the route claimed
    results = moves_in(log)
    assert sum(result["batches"] for result in results) == 2  # the big one, then the three ticks that waited, merged
    assert sum(result["skipped"] for result in results) == 0
    assert error_lines(pipe.procs.logs()) == []


@pytest.mark.celery_release
def test_worker_sigkilled_mid_task_is_resumed(pipeline):
    pipe = pipeline(1)
    pipe.parts[0].produce_series("events", 300_000, size=60, tag="big")
    pipe.parts[0].tick("events")
    produced = 300_000 + pipe.produce(3)
    pipe.procs.worker("first", concurrency=1)
    pipe.procs.beat()
    wait_until(pipe.central.copy_running, 60, "the first worker to start copying", every=0.02)

    pipe.procs.kill("first")
    assert len(pipe.central_events()) == 0  # the batch in hand was not committed
    pipe.procs.worker("second", concurrency=1)

    pipe.wait_for(produced, timeout=120)
    assert events_per_route(move_results(pipe.procs.log("second")))["partition_0"] >= 300_000  # the batch again


def test_broker_down_at_start_then_restarted(pipeline, tmp_path):
    broker = RedisServer(start=False)
    pipe = pipeline(2)
    text = pipe.config.read_text()
    pipe.config.write_text(re.sub(r"broker_url = .*", f"broker_url = {broker.url}", text))
    pipe.procs.worker(concurrency=1)
    pipe.procs.beat()
    produced = pipe.produce(2)
    time.sleep(3)
    assert len(pipe.central_events()) == 0

    try:
        broker.start()
        pipe.wait_for(produced)
        broker.stop()
        produced += pipe.produce(2)
        time.sleep(2)
        broker.start()
        pipe.wait_for(produced)
    finally:
        broker.close()


@pytest.mark.celery_release
def test_a_redis_restart_while_the_worker_holds_tasks(pipeline):
    """Redis crashes while a worker copies a batch (its task unacknowledged).  The
    worker reconnects; on the releases of EXITS_ON_REDIS_LOSS it may exit
    instead, and started again, as its supervisor would, it moves on.  Every
    event arrives once either way."""
    broker = RedisServer()
    try:
        pipe = pipeline(1, broker=broker.url)
        pipe.parts[0].produce_series("events", 300_000, size=60, tag="big")
        pipe.parts[0].tick("events")
        produced = 300_000 + pipe.produce(2)
        pipe.procs.worker(concurrency=1)
        pipe.procs.beat()
        wait_until(pipe.central.copy_running, 60, "the worker to start copying", every=0.02)

        broker.restart(down=1)
        produced += pipe.produce(2)
        # Progress, not a pause: the worker connects to the new Redis, or exits.
        wait_until(lambda: pipe.procs.exited("worker") or pipe.procs.log("worker").count("Connected to redis") >= 2,
                   60, "the worker to reconnect or exit")
        if pipe.procs.exited("worker"):
            assert celery_under_test()[0] in EXITS_ON_REDIS_LOSS, pipe.procs.log("worker")[-3000:]
            assert "Unrecoverable error: AttributeError" in pipe.procs.log("worker")
            pipe.procs.worker(concurrency=1)
        pipe.wait_for(produced, timeout=120)
        assert not pipe.procs.exited("worker")
    finally:
        broker.close()


@pytest.mark.celery_release
def test_a_broken_route_fails_alone_and_the_worker_goes_on(pipeline):
    pipe = pipeline(2)
    pipe.parts[0].execute("select pgq.drop_queue('events', true)")
    pipe.procs.worker(concurrency=1)
    pipe.procs.beat()
    pipe.parts[1].produce_series("events", 50, tag="ok")
    pipe.parts[1].tick("events")

    wait_until(lambda: len(pipe.central_events()) == 50, 60, "partition_1's events in the central queue")

    logs = pipe.procs.log("worker")
    failures = error_lines(logs)
    assert failures and "Traceback" not in logs
    assert all("route partition_0: source database" in line and "queue 'events' does not exist" in line
               for line in failures), failures
    assert "retry" not in logs.lower()  # a missing queue needs an operator, not retries
    assert pipe.procs.running["worker"].poll() is None


@pytest.mark.celery_release
def test_flower_shows_each_route_succeeding(pipeline):
    pipe = pipeline(2)
    port, produced = pipe.run_with_flower(rounds=3)

    def moved_per_route() -> dict[str, int]:
        url = f"http://127.0.0.1:{port}/api/tasks?taskname=qmover.move_next_batch&state=SUCCESS"
        with urllib.request.urlopen(url, timeout=5) as response:
            tasks = json.load(response)
        return events_per_route(task["result"] for task in tasks.values())

    wait_until(lambda: moved_per_route() == {"partition_0": produced // 2, "partition_1": produced // 2},
               30, "Flower to list the successful moves of both routes", every=1)


@pytest.mark.celery_release
def test_an_existing_celery_app_takes_qmover_tasks(pipeline, redis_db):
    pipe = pipeline(2)
    shop = Processes(pipe.config, pipe.procs.logdir, cwd=Path(__file__).parent, app="shop_app",
                     env={"SHOP_BROKER_URL": redis_db.url, "SHOP_RESULT_BACKEND": redis_db.url,
                          "SHOP_QMOVER_CONFIG": str(pipe.config)})
    try:
        shop.worker("shop", 2, "-B", "-Q", "celery,qmover", "-s", str(pipe.procs.logdir / "shop-beat"))
        produced = pipe.produce(3)
        pipe.wait_for(produced)
        result = subprocess.run(
            [CELERY_PYTHON, "-c", "import shop_app; print(shop_app.add.delay(2, 3).get(timeout=30))"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=60,
            env={**shop.env, "QMOVER_CONFIG": ""})
        assert result.stdout.strip() == "5", result.stderr
    finally:
        shop.stop()


SHOP_APP = """
import os
from celery import Celery
import qmover.tasks

app = Celery("shop")
app.config_from_object("celeryconfig")
qmover.tasks.attach(app, os.environ["SHOP_QMOVER_CONFIG"])
"""


@pytest.mark.celery_release
def test_qmover_app_and_a_shop_app_in_one_folder_each_move_on_their_own_settings(pipeline, tmp_path):
    """A shop's folder, with its celeryconfig.py (its own broker, no beat entries,
    early acks) and its app: started there, qmover's worker (`qmover worker`) and
    beat (`celery -A qmover.tasks beat`) move on qmover's settings; then the
    shop's worker and beat, with qmover's tasks attached, move on the shop's."""
    pipe = pipeline(2)
    shop_broker = Redis()
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "celeryconfig.py").write_text(f"broker_url = {shop_broker.url!r}\ntask_acks_late = False\n"
                                            f"beat_schedule = {{}}\n")
    (folder / "shop.py").write_text(SHOP_APP)
    try:
        ours = [Processes(pipe.config, pipe.procs.logdir, cwd=folder, app=app) for app in ("qmover", "qmover.tasks")]
        ours[0].worker("ours", 1)
        ours[1].beat()
        try:
            pipe.wait_for(pipe.produce(3))
        finally:
            for processes in ours:
                processes.stop()
        assert shop_broker.client.dbsize() == 0  # nothing of qmover's app went through the shop's broker

        shop = Processes(pipe.config, pipe.procs.logdir, cwd=folder, app="shop",
                         env={"SHOP_QMOVER_CONFIG": str(pipe.config)})
        shop.worker("shop", 1, "-Q", "qmover")
        shop.beat()
        try:
            pipe.wait_for(pipe.produce(3))
        finally:
            shop.stop()
        assert shop_broker.client.exists("_kombu.binding.qmover")  # the shop's broker carried qmover's tasks
        assert error_lines(pipe.procs.logs()) == []
    finally:
        shop_broker.close()


MARKER = "Pw-marker-7f3a9c"


ENV_MARKER, PGPASS_MARKER = "Env-pw-marker-51b2", "Pgpass-marker-c0d4"


@pytest.mark.celery_release
def test_no_password_in_args_results_logs_flower_or_status(pipeline, redis_db, tmp_path):
    pipe = pipeline(2, password=MARKER)  # trust auth on 127.0.0.1 ignores it; qmover must hide it
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"*:*:*:*:{PGPASS_MARKER}\n")
    pgpass.chmod(0o600)
    secret_env = {"PGPASSWORD": ENV_MARKER, "PGPASSFILE": str(pgpass)}
    pipe.procs.env.update(secret_env)
    broken = pipe.config.read_text().replace(f"{pipe.parts[1].dsn} password", f"{pipe.parts[1].dsn} port=1 password", 1)
    port, _ = pipe.run_with_flower(rounds=2)
    outputs = [pipe.procs.logs(), redis_db.everything().decode("utf-8", "replace")]
    for path in ("/api/tasks", "/tasks", "/api/workers"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            outputs.append(response.read().decode())
    env = {**os.environ, **secret_env}
    for command in (("status",), ("status", "--json"), ("run", "--once"), ("install",)):
        result = run_qmover(*command, str(pipe.config), check=True, env=env)
        outputs += [result.stdout, result.stderr]
    pipe.config.write_text(broken)  # errors name the database, never the password
    for command in (("status",), ("run", "--once"), ("rewind",)):
        result = run_qmover(*command, str(pipe.config), env=env)
        assert result.returncode == 1
        outputs += [result.stdout, result.stderr]

    assert any("port=1" in text for text in outputs)
    assert all(text for text in outputs[:2])
    for marker in (MARKER, ENV_MARKER, PGPASS_MARKER):
        leaks = [text[max(0, text.find(marker) - 200):text.find(marker) + 50] for text in outputs if marker in text]
        assert leaks == [], marker


def test_worker_sigterm_mid_batch_finishes_it_then_stops(pipeline):
    pipe = pipeline(1)
    pipe.parts[0].produce_series("events", 300_000, size=60, tag="big")
    pipe.parts[0].tick("events")
    produced = 300_000 + pipe.produce(2)
    worker = pipe.procs.worker("first", concurrency=1)
    pipe.procs.beat()
    wait_until(pipe.central.copy_running, 60, "the worker to start copying", every=0.02)

    worker.send_signal(signal.SIGTERM)  # Celery's warm shutdown: the task in hand runs to its end
    started = time.monotonic()
    worker.wait(timeout=60)
    stopped_after = time.monotonic() - started

    assert len(pipe.central_events()) in (300_000, produced)  # the batch in hand whole, never a part
    pipe.procs.worker("second", concurrency=1)
    pipe.wait_for(produced)
    print(f"worker stopped {stopped_after:.1f}s after SIGTERM")
