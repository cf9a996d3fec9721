"""Exactly once at every crash point, under SIGKILL, and with concurrent movers."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from qmover.errors import QmoverError, TransientError
from qmover.pg.connector import Connector, Loan
from qmover.pg.queries import NEXT_LOCK
from qmover.pg.session import Link
from qmover.protocol import batch as batch_module
from qmover.protocol.mover import Mover
from qmover_lab.connections import QMOVER

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


def open_batch_is_skipped_and_the_next_moved(route, batch: int) -> None:
    """The first of two batches, applied and left open: it comes back and is skipped, the second moves."""
    moves = route.move()
    assert (moves.skipped, moves.sizes) == ([batch], [10])
    assert route.target_events() == route.source_events()
    assert len(route.target_events()) == 20


def test_failure_before_target_commit_applies_nothing(route, copy_path):
    produce_batches(route, 2)

    def fail(_route, point: str) -> None:
        if point == "before_target_commit":
            raise Boom(point)

    with pytest.raises(Boom):
        route.move(checkpoint=fail)
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

    moves = route.move()
    assert (moves.applied[0].batch_id, moves.sizes, moves.skipped) == (batch, [10, 10], [])  # the same batch again
    assert route.target_events() == route.source_events()


def test_crash_after_target_commit_skips_redelivery(route):
    produce_batches(route, 2)
    route.crash_at("after_target_commit")

    assert len(route.target_events()) == 10  # applied and recorded ...
    batch = active_batch(route)
    assert batch is not None  # ... but not finished on the source

    open_batch_is_skipped_and_the_next_moved(route, batch)


def test_crash_with_the_finish_pending_moves_each_batch_once(route):
    """A mover finishes batch N in the transaction that takes batch N+1; dying
    just after it leaves N finished and N+1 open, not applied."""
    produce_batches(route, 3)
    route.crash_at("next_batch@2")

    assert len(route.target_events()) == 10  # batch 1 only
    open_batch = active_batch(route)
    assert open_batch is not None  # batch 2, taken with batch 1's finish

    moves = route.move()
    assert moves.applied[0].batch_id == open_batch  # batch 2 moved, not skipped
    assert moves.skipped == []  # batch 1 was finished before the crash
    assert route.target_events() == route.source_events()
    assert len(route.target_events()) == 30


def test_source_lost_with_the_finish_pending_moves_each_batch_once(route):
    """The source connection dies after batch 1's target commit, before the
    transaction that would finish it: batch 1 comes back and is skipped."""
    produce_batches(route, 2)
    batches = []

    def kill_source(_route, point: str) -> None:
        if point == "after_target_commit":
            batches.append(active_batch(route))
            route.src.value(f"select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and {QMOVER}",
                            (route.src.name,))

    with pytest.raises(TransientError):
        route.move(checkpoint=kill_source)  # finish + next batch, on a dead connection
    assert active_batch(route) == batches[0]  # applied on the target, still open on the source
    open_batch_is_skipped_and_the_next_moved(route, batches[0])


def test_taking_the_next_batch_failing_leaves_the_batch_before_open(route):
    """Batch N's finish and the taking of batch N+1 are one source transaction:
    when the taking fails, N is not finished either; it comes back and is skipped."""
    produce_batches(route, 2)
    holder = route.src.connect()
    holder.autocommit = False
    batches, cancellers = [], []

    def cancel_when_waiting() -> None:
        waiting = f"select pid from pg_stat_activity where datname = %s and {QMOVER} and wait_event_type = 'Lock'"
        wait_until(lambda: route.src.value(waiting, (route.src.name,)), timeout=10,
                   what="the mover to queue on the lock", every=0.02)
        route.src.value("select pg_cancel_backend(pid) from pg_stat_activity where pid = (%s)",
                        (route.src.value(waiting, (route.src.name,)),))

    def hold_the_next_batch(_route, point: str) -> None:
        if point == "after_target_commit" and not batches:
            batches.append(active_batch(route))
            with holder.cursor() as cur:  # the lock the next-batch statement queues on, after the finish ran
                cur.execute(f"select pg_advisory_xact_lock({NEXT_LOCK.key('%s')})", (route.name,))
            cancellers.append(threading.Thread(target=cancel_when_waiting))
            cancellers[0].start()

    with pytest.raises(QmoverError, match="canceling statement"):
        route.move(checkpoint=hold_the_next_batch)
    cancellers[0].join()
    holder.rollback()
    holder.close()
    assert active_batch(route) == batches[0]  # applied on the target, still open on the source
    open_batch_is_skipped_and_the_next_moved(route, batches[0])


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
    """Four movers of their own (as four processes have: connections, claims,
    checks) move one route while it produces: each batch is applied once, in
    order, whoever holds the route when."""
    stop, produced = threading.Event(), threading.Event()
    applied: list[list[int]] = [[] for _ in range(4)]
    skipped = []

    def producer() -> None:
        n = 0
        while not stop.is_set():
            route.src.produce_series(route.src_queue, 7, size=30, tag=f"p{n}-")
            route.src.tick(route.src_queue)
            n += 1

    def mover(n: int) -> None:
        def note(_route, batch) -> None:
            (skipped if batch.skipped else applied[n]).append(batch.batch_id)
        own = Mover()
        while not produced.is_set() or pending(route):  # until the producer's last tick is moved too
            if not own.move([route.route()], budget=0.2, moved=note)[0].moved:
                time.sleep(0.02)  # as qmover run's loop_delay
        own.close()

    producing = threading.Thread(target=producer)
    movers = [threading.Thread(target=mover, args=(n,)) for n in range(4)]
    for thread in (producing, *movers):
        thread.start()
    try:  # tied to progress: produce until two movers have each applied batches and 100 batches are out
        wait_until(lambda: sum(1 for batches in applied if batches) >= 2 and sum(map(len, applied)) >= 100, 120,
                   "two movers to apply batches of the route")
    finally:
        stop.set()
    producing.join()
    produced.set()
    for thread in movers:
        thread.join(timeout=60)

    source, target = route.source_events(), route.target_events()
    assert len(source) > 100
    assert target == source
    assert sum(1 for batches in applied if batches) >= 2, "more than one mover must have applied batches"
    applied_ids = [batch for batches in applied for batch in batches]
    assert len(applied_ids) == len(set(applied_ids)), "a batch was applied twice"
    print(f"{len(source)} events, {len(applied_ids)} batches applied, {len(skipped)} redundant deliveries skipped")


def test_concurrent_moves_without_a_claim_apply_each_batch_once(route):
    """The last line of defence: four threads take and move the route's batches
    through the protocol itself, with no claim between them; the per-consumer
    lock and the target's position still apply each batch once."""
    produce_batches(route, 100, per_batch=7)
    applied: list[int] = []
    skipped: list[int] = []

    def move_all() -> None:
        with Loan(Connector()) as loan:
            src, dst = loan.link(route.route(), "source"), loan.link(route.route(), "target")
            unfinished = None
            while (done := batch_module.move_batch(route.route(), src, dst, finish=unfinished)) is not None:
                (skipped if done.skipped else applied).append(done.batch_id)
                unfinished = done.batch_id
            if unfinished is not None:
                batch_module.finish_batch(route.route(), src, unfinished)

    threads = [threading.Thread(target=move_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert route.target_events() == route.source_events()
    assert len(applied) == len(set(applied)) == 100
    print(f"100 batches applied once each, {len(skipped)} found applied by another thread and skipped")


def test_target_failing_mid_copy_applies_nothing(route, copy_path):
    """A row the target refuses half-way through the COPY: the whole batch stays out."""
    route.src.produce(route.src_queue, [("ok", str(n), None, None, None, None) for n in range(500)]
                      + [("poison", "x", None, None, None, None)]
                      + [("ok", str(n), None, None, None, None) for n in range(500, 1000)])
    route.src.tick(route.src_queue)
    route.dst.execute("alter table pgq.event_1 add constraint no_poison check (ev_type <> 'poison')")
    mover = Mover()

    with pytest.raises(QmoverError, match="no_poison"):
        route.move(mover)
    assert route.target_events() == []
    assert route.dst.last_tick(route.name) is None
    assert active_batch(route) is not None

    route.dst.execute("alter table pgq.event_1 drop constraint no_poison")
    assert route.move(mover).sizes == [1001]
    assert route.target_events() == route.source_events()


def test_source_lost_mid_copy_applies_nothing(route, monkeypatch):
    """The source backend dies while streaming a big batch: the target rolls back."""
    monkeypatch.setattr(batch_module, "SMALL_BATCH", -1)
    route.src.produce_series(route.src_queue, 200_000, size=200)
    route.src.tick(route.src_queue)
    mover = Mover()

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
        route.move(mover)
    killer.join()
    assert route.target_events() == []
    assert route.dst.last_tick(route.name) is None

    assert route.move(mover).sizes == [200_000]  # reconnects, same batch
    assert multiset(route.target_events()) == multiset(route.source_events())


POINTS = ["next_batch", "position", "before_target_commit", "after_target_commit"]
FILTERS = "type_filter = type_*\n"  # keeps every event, and copies in a round trip of its own


@pytest.mark.parametrize(("filters", "point"), [("", point) for point in POINTS]
                         + [(FILTERS, point) for point in [*POINTS[:2], "copy", *POINTS[2:]]])
def test_a_merged_batch_crashed_at_each_point_comes_back_whole(route, filters, point):
    """Three waiting ticks taken as one batch: its assignment is committed before
    anything moves, so after a crash the same three ticks come back as one batch.
    A plain route sends its COPY with the commit; a filtering one copies first
    (a point between: copy), then commits."""
    with route.config.open("a") as config:
        config.write(filters)
    produce_batches(route, 3)
    route.crash_at(point)
    batch = active_batch(route)
    assert batch is not None

    moves = route.move()
    applied = point == "after_target_commit"
    assert (moves.skipped, moves.sizes) == (([batch], []) if applied else ([], [30]))
    assert moves.batches[0][1].batch_id == batch
    assert multiset(route.target_events()) == multiset(route.source_events())
    assert len(route.target_events()) == 30


@pytest.mark.parametrize("point", ["copy", "before_target_commit", "after_target_commit"])
def test_an_empty_batch_crashed_at_each_point_moves_on_once(route, point, monkeypatch):
    """An idle queue's tick is an empty batch: only its position goes to the target (no
    COPY in). Crashed at each step, it comes back or is skipped, and the batch after it
    moves once."""
    empty_tick = route.src.tick(route.src_queue)
    route.crash_at(point)
    applied = point == "after_target_commit"
    assert route.dst.last_tick(route.name) == (empty_tick if applied else None)
    batch = active_batch(route)
    assert batch is not None
    produce_batches(route, 1)

    copies_in = []
    copy_in = Link.copy_in
    monkeypatch.setattr(Link, "copy_in", lambda link, *args, **params: copies_in.append(link.side)
                        or copy_in(link, *args, **params))
    moves = route.move()
    assert (moves.skipped, moves.sizes) == (([batch], [10]) if applied else ([], [0, 10]))
    assert copies_in == ["target"]  # the batch of 10 only
    assert route.target_events() == route.source_events() and len(route.target_events()) == 10


def test_a_small_batch_takes_two_round_trips_on_the_target(route, monkeypatch):
    """Its position, then its COPY with its end tick and the commit."""
    produce_batches(route, 1)
    trips: list[str] = []
    for name in ("_send_once", "_copy"):
        sent = getattr(Link, name)
        monkeypatch.setattr(Link, name, lambda link, *args, _sent=sent, **params:
                            (link.side == "target" and trips.append(link.side), _sent(link, *args, **params))[1])
    steps: dict[str, int] = {}
    route.move(checkpoint=lambda _route, step: steps.setdefault(step, len(trips)))
    assert steps["after_target_commit"] - steps["next_batch"] == 2
    assert "copy" not in steps
    assert route.target_events() == route.source_events() and len(route.target_events()) == 10


def test_the_target_cut_off_during_the_copy_that_commits_applies_nothing(route, monkeypatch):
    """The target's session ends once its COPY has begun, before the rows, the end tick and the
    commit that go with it: nothing is applied, the batch comes back and moves once."""
    route.src.produce_series(route.src_queue, 2000, size=200)  # several reads of the spool
    route.src.tick(route.src_queue)
    rewind = batch_module.Spool.rewind

    def cut_on_first_read(spool) -> None:
        rewind(spool)
        read = spool.read

        def first_read(size: int = -1) -> bytes:
            copying = f"from pg_stat_activity where {QMOVER} and query ilike 'copy %%'"
            route.dst.execute(f"select pg_terminate_backend(pid) {copying}")
            wait_until(lambda: route.dst.value(f"select count(*) {copying}") == 0, 10, "the COPY's session to end")
            spool.read = read
            return read(size)
        spool.read = first_read

    monkeypatch.setattr(batch_module.Spool, "rewind", cut_on_first_read)
    with pytest.raises(TransientError, match="target database"):
        route.move()
    assert route.target_events() == []
    assert route.dst.last_tick(route.name) is None
    assert active_batch(route) is not None

    monkeypatch.undo()
    assert route.move().sizes == [2000]
    assert multiset(route.target_events()) == multiset(route.source_events())
