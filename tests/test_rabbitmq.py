"""RabbitMQ as the broker, with qmover's defaults: no result backend, counters off."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from celery_helpers import (
    CELERY_PYTHON,
    Processes,
    RabbitVhost,
    error_lines,
    events_per_route,
    move_results,
    wait_until,
)
from conftest import run_qmover


@pytest.fixture
def rabbit():
    vhost = RabbitVhost()
    yield vhost
    vhost.close()


@pytest.mark.celery_release
def test_worker_beat_and_flower_on_rabbitmq_move_two_partitions_exactly_once(pipeline, rabbit):
    pipe = pipeline(2, broker=rabbit.url)  # [qmover] broker_url = amqp://... and nothing else
    port, produced = pipe.run_with_flower(rounds=4)

    def tasks() -> dict:
        url = f"http://127.0.0.1:{port}/api/tasks?taskname=qmover.move_next_batch"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def moved_per_route() -> dict[str, int]:
        return events_per_route(task["result"] for task in tasks().values() if task["state"] == "SUCCESS")

    wait_until(lambda: moved_per_route() == {"partition_0": produced // 2, "partition_1": produced // 2},
               30, "Flower to list every move, from task events alone", every=1)
    assert {task["state"] for task in tasks().values()} == {"SUCCESS"}  # no task failed
    logs = pipe.procs.logs()
    assert error_lines(logs) == []
    assert pipe.procs.log("worker").count("metrics counters are off") == 1  # said once, at start
    assert "Unknown result backend" not in logs

    status = run_qmover("status", str(pipe.config), check=True)
    assert re.search(r"^partition_0\s", status.stdout, re.MULTILINE)
    assert re.search(r"^partition_1\s", status.stdout, re.MULTILINE)


@pytest.mark.celery_release
def test_a_shop_app_on_rabbitmq_without_result_backend_runs_qmover_tasks(pipeline, rabbit):
    pipe = pipeline(2, broker=rabbit.url)
    tests = Path(__file__).parent
    shop = Processes(pipe.config, pipe.procs.logdir, cwd=tests, app="shop_app",
                     env={"SHOP_BROKER_URL": rabbit.url, "SHOP_QMOVER_CONFIG": str(pipe.config)})
    try:
        shop.worker("shop", 2, "-B", "-Q", "celery,qmover", "-s", str(pipe.procs.logdir / "shop-beat"))
        produced = pipe.produce(3)
        pipe.wait_for(produced)
        subprocess.run([CELERY_PYTHON, "-c", "import shop_app; shop_app.add.delay(2, 3)"],
                       cwd=tests, check=True, timeout=60, env={**shop.env, "QMOVER_CONFIG": ""})
        wait_until(lambda: re.search(r"Task shop_app.add\[\S+\] succeeded in \S+: 5", shop.log("shop")), 30,
                   "the shop's own task to run beside qmover's")
    finally:
        shop.stop()
    log = shop.log("shop")
    assert "partition_0" in events_per_route(move_results(log))
    assert error_lines(log) == []
