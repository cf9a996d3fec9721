"""Exactly once at every crash point, under SIGKILL, and with concurrent movers."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from qmover.config import load_config
from qmover.errors import QmoverError, TransientError
from qmover.protocol import batch as batch_module
from qmover.protocol.mover import RouteMover

from celery_helpers import wait_until
from conftest import multiset


class Boom(Exception):
    pass


def active_batch(route):
    return route.src.value("select current_batch from pgq.get_consumer_info(%s, %s)",
                           (route.src_queue, route.name))


@pytest.fixture(autouse=True)
def one_batch_per_tick(request) -> None:
    """These crash points are set batch by batch: the route's waiting ticks are not merged
    (merged batches have tests of their own below)."""
    if "route" in request.fixturenames and "merged" not in request.node.name:
        route = request.getfixturevalue("route")
        with route.config.open("a") as config:
            config.write("merge_ticks = 0\n")


def produce_batches(route, batches: int, per_batch: int = 10) -> None:
    for n in range(batches):
        route.src.produce_series(route.src_queue, per_batch, size=40, tag=f"b{n}-")
        route.src.tick(route.src_queue)


def test_failure_before_target_commit_applies_nothing(route, copy_path):
    produce_batches(route, 2)

    def fail(point: str) -> None:
        if point == "before_target_commit":
            raise Boom(point)

    mover = RouteMover(load_config(route.config).select()[0], fail)
    with pytest.raises(Boom):
        mover.move_one()
    assert route.target_events() == []
    assert route.dst.last_tick(route.name) is None
    assert active_batch(route) is not None  # not finished: will be redelivered

    route.qmover("run", "--once", check=True)
    assert route.target_events() == route.source_events()


def test_crash_before_target_commit_applies_nothing(route):
    produce_batches(route, 2)
    route.crash_at("before_target_commit")

    assert route.target_events() == []
    assert route.dst.last_tick(route.name) is None
    batch = active_batch(route)
    assert batch is not None

    result = route.qmover("run", "--once", check=True)
    assert f"batch={batch} events=10" in result.stderr  # the same batch, redelivered
    assert route.target_events() == route.source_events()


def test_crash_after_target_commit_skips_redelivery(route):
    produce_batches(route, 2)
    route.crash_at("after_target_commit")

    assert len(route.target_events()) == 10  # applied and recorded ...
    batch = active_batch(route)
    assert batch is not None  # ... but not finished on the source

    result = route.qmover("run", "--once", check=True)
    assert f"batch={batch} skipped: already applied" in result.stderr
    assert route.target_events() == route.source_events()
    assert len(route.target_events()) == 20


def test_crash_with_the_finish_pending_moves_each_batch_once(route):
    """A mover finishes batch N in the transaction that takes batch N+1; dying
    just after it leaves N finished and N+1 open, not applied."""
    produce_batches(route, 3)
    route.crash_at("next_batch@2")

    assert len(route.target_events()) == 10  # batch 1 only
    open_batch = active_batch(route)
    assert open_batch is not None  # batch 2, taken with batch 1's finish

    result = route.qmover("run", "--once", check=True)
    assert f"batch={open_batch} events=10" in result.stderr  # batch 2 moved, not skipped
    assert "skipped" not in result.stderr  # batch 1 was finished before the crash
    assert route.target_events() == route.source_events()
    assert len(route.target_events()) == 30


def test_source_lost_with_the_finish_pending_moves_each_batch_once(route):
    """The source connection dies after batch 1's target commit, before the
    transaction that would finish it: batch 1 comes back and is skipped."""
    produce_batches(route, 2)
    with RouteMover(load_config(route.config).select()[0]) as mover:

        def kill_source(point: str) -> None:
            if point == "after_target_commit":
                source = mover.loan.session(mover.route, "source").conn
                route.src.value("select pg_terminate_backend(%s)", (source.get_backend_pid(),))

        mover.checkpoint = kill_source
        assert mover.move_one().events == 10
        batch = active_batch(route)
        with pytest.raises(TransientError):
            mover.move_one()  # finish + next batch, on a dead connection
    assert active_batch(route) == batch  # applied on the target, still open on the source

    result = route.qmover("run", "--once", check=True)
    assert f"batch={batch} skipped: already applied" in result.stderr
    assert route.target_events() == route.source_events()
    assert len(route.target_events()) == 20


def test_taking_the_next_batch_failing_leaves_the_batch_before_open(route):
    """Batch N's finish and the taking of batch N+1 are one source transaction:
    when the taking fails, N is not finished either; it comes back and is skipped."""
    produce_batches(route, 2)
    holder = route.src.connect()
    with RouteMover(load_config(route.config).select()[0]) as mover:
        assert mover.move_one().events == 10
        batch = active_batch(route)
        pid = mover.loan.session(mover.route, "source").conn.get_backend_pid()
        holder.autocommit = False
        with holder.cursor() as cur:  # the lock the next-batch statement queues on, after the finish ran
            cur.execute("select pg_advisory_xact_lock(hashtextextended('qmover-next:' || %s, 0))", (route.name,))

        def cancel_when_waiting() -> None:
            wait_until(lambda: route.src.value("select wait_event_type from pg_stat_activity where pid = %s",
                                               (pid,)) == "Lock",
                       timeout=10, what="the mover to queue on the lock", every=0.02)
            route.src.value("select pg_cancel_backend(%s)", (pid,))

        canceller = threading.Thread(target=cancel_when_waiting)
        canceller.start()
        with pytest.raises(QmoverError):
            mover.move_one()
        canceller.join()
        holder.rollback()
    holder.close()
    assert active_batch(route) == batch  # applied on the target, still open on the source

    result = route.qmover("run", "--once", check=True)
    assert f"batch={batch} skipped: already applied" in result.stderr
    assert route.target_events() == route.source_events()
    assert len(route.target_events()) == 20


def test_sigkill_during_run_loses_and_doubles_nothing(route):
    """Each mover is killed once the target holds a few more batches, plus a
    random moment: tied to progress, not to the clock, so the kills land
    mid-run on a fast machine and a slow one alike."""
    produce_batches(route, 600, per_batch=5)
    kills_mid_run = 0
    rng = random.Random(20261127)
    target = route.dst.connect()

    def moved() -> int:
        with target.cursor() as cur:
            cur.execute("select count(*) from pgq.event_1")
            return cur.fetchone()[0]

    for _ in range(25):
        if active_batch(route) is None and pending(route) == 0:
            break
        wanted = moved() + 5 * rng.randint(3, 15)
        mover = subprocess.Popen([sys.executable, "-m", "qmover", "run", str(route.config)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda wanted=wanted: moved() >= wanted or pending(route) == 0, 60,
                   "the mover to move a few batches", every=0.005)
        time.sleep(rng.uniform(0, 0.02))
        mover.send_signal(signal.SIGKILL)
        mover.wait()
        kills_mid_run += pending(route) > 0
    target.close()

    route.qmover("run", "--once", check=True)

    assert kills_mid_run >= 5
    source, target = route.source_events(), route.target_events()
    assert len(source) == 3000
    assert multiset(target) == multiset(source)
    assert target == source  # batches land in source order


def pending(route) -> int:
    """Ticks the consumer has not consumed yet."""
    return route.src.value(
        "select count(*) from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue"
        " where q.queue_name = %s and t.tick_id > (select last_tick from pgq.get_consumer_info(%s, %s))",
        (route.src_queue, route.src_queue, route.name))


def test_four_concurrent_movers_on_one_route(route):
    with route.config.open("a") as config:
        config.write("loop_delay = 0.02\n")
    stop = threading.Event()

    def producer() -> None:
        n = 0
        while not stop.is_set():
            route.src.produce_series(route.src_queue, 7, size=30, tag=f"p{n}-")
            route.src.tick(route.src_queue)
            n += 1

    thread = threading.Thread(target=producer)
    thread.start()
    movers = [subprocess.Popen([sys.executable, "-m", "qmover", "run", str(route.config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    time.sleep(8)
    stop.set()
    thread.join()
    deadline = time.monotonic() + 60
    while pending(route) and time.monotonic() < deadline:
        time.sleep(0.2)
    for mover in movers:
        mover.send_signal(signal.SIGTERM)
    logs = [mover.communicate(timeout=30)[1] for mover in movers]

    assert all(mover.returncode == 0 for mover in movers), logs
    source, target = route.source_events(), route.target_events()
    assert len(source) > 100
    assert target == source
    batches = [set(re.findall(r"batch=(\d+) events", log)) for log in logs]
    assert sum(1 for b in batches if b) >= 2, "more than one mover must have applied batches"
    skipped = sum(log.count("skipped: already applied") for log in logs)
    applied_ids = [b for s in batches for b in s]
    assert len(applied_ids) == len(set(applied_ids)), "a batch was applied twice"
    print(f"{len(source)} events, {len(applied_ids)} batches applied, {skipped} redundant deliveries skipped")


def test_target_failing_mid_copy_applies_nothing(route, copy_path):
    """A row the target refuses half-way through the COPY: the whole batch stays out."""
    route.src.produce(route.src_queue, [("ok", str(n), None, None, None, None) for n in range(500)]
                      + [("poison", "x", None, None, None, None)]
                      + [("ok", str(n), None, None, None, None) for n in range(500, 1000)])
    route.src.tick(route.src_queue)
    route.dst.execute("alter table pgq.event_1 add constraint no_poison check (ev_type <> 'poison')")
    mover = RouteMover(load_config(route.config).select()[0])

    with pytest.raises(QmoverError, match="no_poison"):
        mover.move_one()
    assert route.target_events() == []
    assert route.dst.last_tick(route.name) is None
    assert active_batch(route) is not None

    route.dst.execute("alter table pgq.event_1 drop constraint no_poison")
    assert mover.move_one().events == 1001
    assert route.target_events() == route.source_events()


def test_source_lost_mid_copy_applies_nothing(route, monkeypatch):
    """The source backend dies while streaming a big batch: the target rolls back."""
    monkeypatch.setattr(batch_module, "SMALL_BATCH", -1)
    route.src.produce_series(route.src_queue, 200_000, size=200)
    route.src.tick(route.src_queue)
    mover = RouteMover(load_config(route.config).select()[0])

    def kill_source_while_copying() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            killed = route.src.value(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity"
                " where datname = %s and query ilike 'copy %%' and pid <> pg_backend_pid()", (route.src.name,))
            if killed:
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_source_while_copying)
    killer.start()
    with pytest.raises(TransientError, match="source database"):
        mover.move_one()
    killer.join()
    assert route.target_events() == []
    assert route.dst.last_tick(route.name) is None

    assert mover.move_one().events == 200_000  # reconnects, same batch
    assert multiset(route.target_events()) == multiset(route.source_events())


@pytest.mark.parametrize("point", ["next_batch", "position", "copy", "before_target_commit", "after_target_commit"])
def test_a_merged_batch_crashed_at_each_point_comes_back_whole(route, point):
    """Three waiting ticks taken as one batch: its assignment is committed before
    anything moves, so after a crash the same three ticks come back as one batch."""
    produce_batches(route, 3)
    route.crash_at(point)
    batch = active_batch(route)
    assert batch is not None

    result = route.qmover("run", "--once", check=True)
    applied = point == "after_target_commit"
    assert (f"batch={batch} skipped: already applied" if applied else f"batch={batch} events=30") in result.stderr
    assert multiset(route.target_events()) == multiset(route.source_events())
    assert len(route.target_events()) == 30
