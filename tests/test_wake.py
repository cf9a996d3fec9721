"""The tick wake (wake_on_tick): a source's ticks wake beat's sweep of it.

Counted in sweeps, not seconds: with a long move_interval, batches of a
source with the wake arrive while beat runs hardly any scheduled sweep; a
source without it waits for them, as before.
"""

from __future__ import annotations

import select
import subprocess
import threading
import time
from contextlib import closing
from dataclasses import replace

import pytest
from psycopg2 import sql
from test_beat_lock import active_beat, start_beats, sweeps
from test_privileges import make_role  # noqa: F401 (a fixture)

from qmover.ops import admin
from qmover.protocol.readiness import Sweeper
from qmover_lab.connections import QMOVER
from qmover_lab.sandbox import Cluster

from celery_helpers import RabbitVhost, wait_until
from conftest import PgqDatabase, installed_processes, run_qmover

INTERVAL = 10  # seconds: a scheduled sweep of a slice every 5 s (two sources), rare next to a tick's move
WAKE = "wake_on_tick = 1"


def has_wake(database) -> bool:
    return bool(database.value("select count(*) from pg_trigger where tgname = 'qmover_wake'"))


def rounds_moved(pipe, part: int, rounds: int, beats: tuple[str, ...] = ("beat",)) -> int:
    """Produce and tick rounds on one partition, each waited for in central; the scheduled
    sweeps beat ran meanwhile."""
    before = sum(sweeps(pipe.procs.log(name)) for name in beats)
    for n in range(rounds):
        pipe.parts[part].produce_series("events", 5, tag=f"w{part}-{n}-{before}-")
        pipe.parts[part].tick("events")
        expected = sum(len(p.events("events")) for p in pipe.parts)
        wait_until(lambda expected=expected: len(pipe.central_events()) >= expected, 60, f"round {n} in central")
    return sum(sweeps(pipe.procs.log(name)) for name in beats) - before


@pytest.mark.celery_release
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_tick_moves_without_waiting_for_a_sweep_and_a_source_without_the_wake_keeps_polling(pipeline, broker):
    """broker: beat's waker sends from a thread of its own, beside beat's scheduler."""
    rabbit = RabbitVhost() if broker == "rabbitmq" else None
    try:
        pipe = pipeline(2, interval=INTERVAL, first_extra=WAKE, broker=rabbit.url if rabbit else None)
        try:
            woken_and_polled(pipe)
        finally:
            pipe.procs.stop()  # before its vhost goes
    finally:
        if rabbit is not None:
            rabbit.close()


def woken_and_polled(pipe) -> None:
    assert has_wake(pipe.parts[0]) and not has_wake(pipe.parts[1])
    pipe.procs.worker(concurrency=2)
    pipe.procs.beat()
    wait_until(lambda: sweeps(pipe.procs.log("beat")) >= 1, 30, "beat's first sweep")

    woken = rounds_moved(pipe, 0, 6)
    polled = rounds_moved(pipe, 1, 2)

    print(f"scheduled sweeps while 6 woken rounds moved: {woken}; while 2 polled rounds moved: {polled}")
    # Without the wake each round waits for a sweep of its slice, one in two sweeps.
    assert woken <= 2
    assert polled >= 2
    pipe.wait_for(0)


def test_routes_of_one_source_with_and_without_the_wake_both_move(make_db, tmp_path, redis_db):
    """The trigger is the database's: a route there that did not ask for it, on another
    move_interval, is woken too, and never left out of the sweeps."""
    src, central = make_db(), make_db()
    for queue in ("events", "other"):
        src.create_queue(queue)
        central.create_queue(f"central_{queue}")
    config = tmp_path / "mixed.ini"
    config.write_text(f"[qmover]\nbroker_url = {redis_db.url}\n" + "".join(
        f"\n[{queue}]\nsrc_db = {src.dsn}\ndst_db = {central.dsn}\npgq_queue_name = {queue}\n"
        f"dst_queue_name = central_{queue}\nmove_interval = {interval}\n{extra}\n"
        for queue, interval, extra in (("events", INTERVAL, WAKE), ("other", 2, ""))))
    procs = installed_processes(config, tmp_path)
    try:
        procs.worker(concurrency=1)
        procs.beat()
        wait_until(lambda: sweeps(procs.log("beat")) >= 2, 30, "beat's first sweeps")
        for n in range(3):
            for queue in ("events", "other"):
                src.produce_series(queue, 5, tag=f"{queue}{n}-")
                src.tick(queue)
            wait_until(lambda: all(len(central.events(f"central_{queue}")) == len(src.events(queue))
                                   for queue in ("events", "other")), 30, f"round {n} of both routes")
    finally:
        procs.stop()


def test_the_wake_survives_a_source_restart(make_db, tmp_path, redis_db):
    cluster = Cluster()
    try:
        cluster.execute("postgres", "create database wake_src")
        src = PgqDatabase("wake_src", server=f"host=127.0.0.1 port={cluster.port} user=postgres")
        src.execute("create extension pgq")
        src.create_queue("events")
        central = make_db()
        central.create_queue("central_events")
        config = tmp_path / "wake.ini"
        config.write_text(f"[qmover]\nbroker_url = {redis_db.url}\n\n[part]\nsrc_db = {src.dsn}\n"
                          f"dst_db = {central.dsn}\npgq_queue_name = events\ndst_queue_name = central_events\n"
                          f"move_interval = {INTERVAL}\n{WAKE}\n")
        procs = installed_processes(config, tmp_path)
        try:
            procs.worker(concurrency=1)
            procs.beat()
            wait_until(lambda: sweeps(procs.log("beat")) >= 1, 30, "beat's first sweep")

            def moved(rounds: int, tag: str) -> int:
                before = sweeps(procs.log("beat"))
                for n in range(rounds):
                    src.produce_series("events", 5, tag=f"{tag}{n}-")
                    src.tick("events")
                    count = len(src.events("events"))
                    wait_until(lambda count=count: len(central.events("central_events")) >= count, 60,
                               f"{tag} round {n}")
                return sweeps(procs.log("beat")) - before

            assert moved(3, "before") <= 1
            cluster.restart()
            moved(1, "back")  # may wait for the scheduled sweep that listens on a new connection
            after = moved(4, "after")
            print(f"scheduled sweeps while 4 rounds moved after the restart: {after}")
            assert after <= 1
            assert sorted(central.events("central_events")) == sorted(src.events("events"))
        finally:
            procs.stop()
    finally:
        cluster.close()


def test_a_standby_beat_takes_over_the_wake(pipeline):
    pipe = pipeline(2, interval=INTERVAL, extra=WAKE)
    beats = ("beat_a", "beat_b")
    pipe.procs.worker(concurrency=2)
    start_beats(pipe.procs, beats)
    first = active_beat(pipe.procs, beats)
    [standby] = [name for name in beats if name != first]
    wait_until(lambda: sweeps(pipe.procs.log(first)) >= 1, 30, "the active beat's first sweep")
    assert rounds_moved(pipe, 0, 3, beats) <= 1

    pipe.procs.kill(first)
    wait_until(lambda: sweeps(pipe.procs.log(standby)) >= 1, 60, "the standby's first sweep")
    taken_over = rounds_moved(pipe, 1, 4, beats)

    print(f"scheduled sweeps while 4 rounds moved after the failover: {taken_over}")
    assert taken_over <= 2
    pipe.wait_for(0)


def test_a_missing_trigger_falls_back_to_polling_and_says_so_and_upgrades_keep_it(pipeline):
    pipe = pipeline(1, interval=5, extra=WAKE)
    part = pipe.parts[0]
    # PgQ's update script (run as from 3.4) keeps the trigger
    part.execute("update pg_extension set extversion = '3.4' where extname = 'pgq'")
    part.execute("alter extension pgq update")
    assert has_wake(part)
    # pg_dump leaves it out: pgq.tick is the extension's table
    dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", part.name], capture_output=True,
                          text=True, check=True).stdout
    assert "notify_tick" in dump and "qmover_wake" not in dump
    part.execute("drop trigger qmover_wake on pgq.tick")  # as after a restore
    status = run_qmover("status", str(pipe.config), "--json", check=True).stdout
    assert '"tick_wake": false' in status and "has no tick wake (run qmover install" in status
    assert "warning: route partition_0: wake_on_tick = 1, but the source database" in run_qmover(
        "status", str(pipe.config), check=True).stdout

    pipe.procs.worker(concurrency=1)
    pipe.procs.beat()
    wait_until(lambda: "has no tick wake" in pipe.procs.log("beat"), 30, "beat to say the wake is missing")
    pipe.wait_for(pipe.produce(2))  # polled: moving all the same

    assert "tick wake installed" in run_qmover("install", str(pipe.config), check=True).stdout
    assert '"tick_wake": true' in run_qmover("status", str(pipe.config), "--json", check=True).stdout
    wait_until(lambda: "the tick wake is back" in pipe.procs.log("beat"), 60, "beat to listen again")
    assert pipe.procs.log("beat").count("has no tick wake") == 1  # said once
    assert rounds_moved(pipe, 0, 4) <= 1  # sweeps every 5 s: woken rounds take less


def test_install_and_removal_are_idempotent_and_need_only_the_rights_named(make_role, route):  # noqa: F811
    """Installing the wake takes TRIGGER on pgq.tick and CREATE on the database; removing it
    (with the database's last consumer) takes pgq.tick's owner.  Short of them: one line, nothing changed."""
    role = make_role("pgq_reader")
    admin_config = route.config.read_text() + f"{WAKE}\n"
    route.config.write_text(admin_config.replace(f"dbname={route.src.name}", f"dbname={route.src.name} user={role}"))

    refused = route.qmover("install")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "may not install the tick wake" in refused.stderr and "grant trigger on pgq.tick" in refused.stderr
    assert not has_wake(route.src)

    route.src.execute(sql.SQL("grant trigger on pgq.tick to {}").format(sql.Identifier(role)))
    route.src.execute(sql.SQL("grant create on database {} to {}").format(sql.Identifier(route.src.name),
                                                                         sql.Identifier(role)))
    assert "tick wake installed" in route.qmover("install", check=True).stdout
    assert "tick wake present" in route.qmover("install", check=True).stdout
    assert has_wake(route.src)
    # a statement on pgq.tick by another role (pgqd's) fires it
    listener = route.src.connect()
    try:
        listener.cursor().execute("listen qmover_tick")
        route.src.produce_series("eventlog", 1)
        route.src.tick("eventlog")
        assert select.select([listener], [], [], 10)[0]
        listener.poll()
        assert listener.notifies
    finally:
        listener.close()

    kept = route.qmover("unregister")
    assert kept.returncode == 1 and "Traceback" not in kept.stderr
    assert "only pgq.tick's owner may" in kept.stderr
    assert has_wake(route.src) and route.src.value("select count(*) from pgq.subscription") == 1

    route.config.write_text(admin_config)
    assert "tick wake removed" in route.qmover("unregister", check=True).stdout
    assert not has_wake(route.src)
    assert route.src.value("select to_regprocedure('qmover.notify_tick()')") is None
    again = route.qmover("unregister", check=True).stdout
    assert "was not registered" in again and "tick wake" not in again


def test_a_listening_connection_replaced_in_place_is_waited_on_again(route):
    """A sweep's statement that finds its kept connection dead replaces it in the
    same session (qmover.pg.session), which then listens no more.  The next sweep
    listens on the new connection, and the waker waits on that one from then on:
    a tick there wakes it, with no scheduled sweep between.  The route collects batches
    (min_count), so that its woken sweeps, as this test's, read its source's state."""
    woken = replace(route.route(), wake_on_tick=True, min_count=1)
    admin.install(woken)
    ticked = threading.Event()
    with closing(Sweeper()) as sweeper:
        assert sweeper.ready([woken], 5, woken=True) == []  # listens
        sweeper.wakes.keep_alive(100, lambda routes, interval: ticked.set())  # the waker starts
        with sweeper._using:  # the waker stands by while the connection dies and is replaced
            mine = f"from pg_stat_activity where datname = current_database() and {QMOVER}"
            route.src.execute(f"select pg_terminate_backend(pid) {mine}")
            wait_until(lambda: route.src.value(f"select count(*) {mine}") == 0, 10, "the listening session to end")
            sweeper.ready([woken], 5, woken=True)  # replaced in place: its first statement failed
        sweeper.ready([woken], 5, woken=True)  # as the next scheduled sweep: listens on the new connection
        time.sleep(0.5)
        assert not ticked.is_set()
        route.src.tick(route.src_queue)
        assert ticked.wait(10), "the waker did not wake on the replaced connection"


def test_a_woken_sweep_of_a_listening_source_asks_only_its_target(route):
    """The tick is the source's answer: with the source's consumer table locked, so
    that a read of the source's state would wait, a woken sweep still finds the route
    ready at once; a route that collects batches (min_count) waits for that read."""
    woken = replace(route.route(), wake_on_tick=True)
    collects = replace(woken, min_count=1)
    admin.install(woken)
    with closing(Sweeper()) as sweeper:
        assert sweeper.ready([woken], 5) == []  # a scheduled sweep: its connection listens
        route.src.produce_series(route.src_queue, 3)
        route.src.tick(route.src_queue)
        with closing(route.src.connect()) as locker:
            locker.autocommit = False
            locker.cursor().execute("lock table pgq.subscription in access exclusive mode")
            found: list = []
            sweeping = threading.Thread(target=lambda: found.append(sweeper.ready([woken], 5, woken=True)))
            sweeping.start()
            sweeping.join(10)
            assert found == [[woken]], "the woken sweep waited for the source"
            sweeping = threading.Thread(target=lambda: found.append(sweeper.ready([collects], 5, woken=True)))
            sweeping.start()
            waits = f"select count(*) from pg_stat_activity where {QMOVER} and wait_event_type = 'Lock'"
            wait_until(lambda: route.src.value(waits) == 1, 10, "the sweep to read the state of a collecting route")
            locker.rollback()
        sweeping.join(10)
        assert found == [[woken], [collects]]
