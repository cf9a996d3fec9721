"""Every Celery pool moves exactly once: prefork, threads, solo, gevent; eventlet is refused."""

from __future__ import annotations

import os
import subprocess
import threading
from collections import Counter

import pytest
from celery import Celery

from qmover.protocol import batch

from celery_helpers import CELERY_PYTHON, error_lines, moves_in
from conftest import peaks, run_qmover

POOLS = {
    "prefork": ("-P", "prefork"),
    "threads": ("-P", "threads"),
    "solo": ("-P", "solo"),
    "gevent": ("-P", "gevent"),
}
CONCURRENCY = {"prefork": 2, "threads": 8, "solo": 1, "gevent": 8}


@pytest.mark.celery_release
@pytest.mark.parametrize("pool", POOLS)
def test_each_pool_moves_overlapping_tasks_exactly_once(pipeline, redis_db, pool):
    """Sweeps every 0.05 s, tasks of at most 0.05 s, and beside them move
    tasks sent directly, two at once for each route every 0.02 s (the sweeps
    alone skip a claimed route): tasks for one route overlap, within a
    process on threads and gevent, across processes on prefork."""
    pipe = pipeline(2, interval=0.05, extra="move_budget = 0.05\nmerge_ticks = 0")  # 2,000 batches to race on
    big = 2 * batch.SMALL_BATCH  # first one batch past the small-batch path (on gevent: spooled, not streamed)
    pipe.parts[0].produce_series("events", big, size=40, tag="big")
    pipe.parts[0].tick("events")
    peak = peaks(pipe.central, pipe.parts)
    worker = pipe.procs.worker("worker", CONCURRENCY[pool], *POOLS[pool])
    pipe.procs.beat()

    client = Celery(broker=redis_db.url)
    done = threading.Event()

    def send_directly() -> None:
        while not done.wait(0.02):
            for route in ("partition_0", "partition_1"):
                for _ in range(2):  # two at once for one route, so they overlap however fast the moves are
                    client.send_task("qmover.move_next_batch", (route,), queue="qmover", expires=1)

    sender = threading.Thread(target=send_directly)
    sender.start()
    try:
        produced = big + pipe.produce_ticks(1000, per_tick=10)  # 2,000 batches while the worker moves
        pipe.wait_for(produced, timeout=180)
    finally:
        done.set()
        sender.join()
        client.close()
        peak.stop()

    results = moves_in(pipe.procs.log("worker"))
    applied = sum(result["batches"] for result in results)  # wait_for saw each event once
    assert applied >= 2001
    assert any(result["moved"].get("partition_0", 0) >= big for result in results)
    assert error_lines(pipe.procs.logs()) == []
    assert worker.poll() is None, "the worker died"
    busy = sum(1 for result in results if result["busy"])
    if pool in ("prefork", "threads"):
        assert busy > 0  # tasks for one route did overlap, and one stood back
    print(f"{pool}: {applied} batches applied once each, {busy} tasks found their route busy; "
          f"peak connections: central {peak.central}, busiest partition {peak.partition}")
    slots = CONCURRENCY[pool]  # the README's bounds count a pool's threads and greenlets as processes
    assert peak.central <= slots + 2 and peak.partition <= 1 + slots
    if pool == "threads":
        # Its threads share the process's kept connections, and a route moves in one task
        # at a time: a source sees about one of them (2 in runs of this test, beat's
        # included), well under one per thread.
        assert peak.partition <= 1 + 3


def test_two_threads_run_the_task_for_one_route_at_once(route, monkeypatch):
    """The task itself, twice at the same moment in one process: one moves, the other is busy."""
    monkeypatch.setenv("QMOVER_CONFIG", str(route.config))
    with route.config.open("a") as config:
        config.write("merge_ticks = 0\n")  # a batch per tick: 300 batches to race on
    from qmover.tasks import move_next_batch

    rounds, per_round = 15, 20
    results: list[dict] = []
    failures: list[BaseException] = []
    for r in range(rounds):
        for b in range(per_round):
            route.src.produce_series(route.src_queue, 5, size=20, tag=f"r{r}b{b}-")
            route.src.tick(route.src_queue)
        start = threading.Barrier(2)

        def run(start: threading.Barrier = start) -> None:
            start.wait()
            try:
                results.append(move_next_batch(route.name))
            except BaseException as exc:  # reported below, in the test's thread
                failures.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []

    source, target = route.source_events(), route.target_events()
    assert len(source) == rounds * per_round * 5
    assert Counter(target) == Counter(source)
    assert sum(result["batches"] for result in results) == rounds * per_round
    assert sum(result["skipped"] for result in results) == 0
    assert any(result["busy"] for result in results)


def test_connections_are_lent_to_one_borrower_at_a_time(route):
    from qmover.config import load_config
    from qmover.pg.connector import Connector

    [config_route] = load_config(route.config).select()
    connector = Connector(max_idle=3)
    start = threading.Barrier(8)
    lent = []

    def borrow() -> None:
        start.wait()
        lent.append(connector.borrow(config_route, "target"))

    threads = [threading.Thread(target=borrow) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len({id(session.conn) for session in lent}) == 8  # never one connection twice
        for session in lent:
            connector.give_back(session)
        assert connector.idle_count() == 3  # the least recently used beyond max_idle are closed
        assert sum(session.conn.closed != 0 for session in lent) == 5
        again = connector.borrow(config_route, "target")
        assert again is lent[-1] and again.reused  # the most recently used comes back first
        connector.give_back(again)
    finally:
        connector.close()
    assert all(session.conn.closed for session in lent)


def test_a_forked_child_never_uses_its_parents_connections(route):
    """A prefork pool's child gets a process state of its own (qmover.tasks.process):
    its own connections, while the parent's kept ones stay usable."""
    from qmover.config import load_config
    from qmover.tasks import process

    [config_route] = load_config(route.config).select()
    connector = process.current().mover.connector
    connector.give_back(connector.borrow(config_route, "target"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a prefork pool process
        session = process.current().mover.connector.borrow(config_route, "target")
        os.write(write, b"fresh" if not session.reused else b"inherited")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 20) == b"fresh"
    parents = connector.borrow(config_route, "target")
    assert parents.reused
    with parents.conn.cursor() as cur:  # the child left the parent's session alone
        cur.execute("select 1")
    connector.give_back(parents)
    connector.close()


@pytest.mark.celery_release
def test_eventlet_pool_is_refused_at_start_with_one_line(route):
    result = subprocess.run([CELERY_PYTHON, "-m", "qmover", "worker", str(route.config), "-P", "eventlet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    [line] = [line for line in result.stderr.splitlines() if "qmover" in line and "error" in line]
    assert "cannot run on the eventlet pool" in line and "threads" in line
    assert "Traceback" not in result.stderr
    assert run_qmover("status", str(route.config)).returncode == 0  # nothing was harmed
