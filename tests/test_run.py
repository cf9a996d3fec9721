"""`qmover run`: several routes, --route, and stopping on signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import PgqDatabase, claim_as_another_mover, let_go_as_another_mover, run_qmover

TWO_PARTITIONS = """\
[partition_1]
src_db = {p1}
dst_db = {central}
pgq_queue_name = events
dst_queue_name = central_events

[partition_2]
src_db = {p2}
dst_db = {central}
pgq_queue_name = events
dst_queue_name = central_events
"""


def test_two_partitions_into_one_central_queue(make_db, tmp_path):
    p1, p2, central = make_db(), make_db(), make_db()
    for part in (p1, p2):
        part.create_queue("events")
    central.create_queue("central_events")
    config = tmp_path / "partitions.ini"
    config.write_text(TWO_PARTITIONS.format(p1=p1.dsn, p2=p2.dsn, central=central.dsn))
    run_qmover("install", str(config), check=True)
    for n, part in enumerate((p1, p2)):
        part.produce_series("events", 40, tag=f"p{n}-")
        part.tick("events")

    run_qmover("run", "--once", "--route", "partition_1", str(config), check=True)
    assert sorted(central.events("central_events")) == sorted(p1.events("events"))
    assert central.value("select pgq_ext.get_last_tick('partition_2')") is None
    run_qmover("run", "--once", str(config), check=True)

    assert sorted(central.events("central_events")) == sorted(p1.events("events") + p2.events("events"))
    assert central.value("select count(*) from pgq_ext.completed_tick") == 2


def start_big_batch_move(route) -> subprocess.Popen:
    """A batch big enough to take seconds, then a small one behind it."""
    route.src.produce_series(route.src_queue, 300_000, size=100, tag="big")
    route.src.tick(route.src_queue)
    route.src.produce_series(route.src_queue, 10, tag="small")
    route.src.tick(route.src_queue)
    mover = subprocess.Popen([sys.executable, "-m", "qmover", "run", str(route.config)],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not route.dst.copy_running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert route.dst.copy_running(), "the mover never started copying"
    return mover


def test_sigterm_finishes_the_batch_in_hand_then_stops(route):
    mover = start_big_batch_move(route)
    mover.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, log = mover.communicate(timeout=60)

    assert mover.returncode == 0, log
    assert "got SIGTERM: stopping after the batch in hand" in log
    assert len(route.target_events()) == 300_000  # finished it, did not start the next
    counted = route.counters()
    assert (counted["events"], counted["batches"]) == (300_000, 1)
    assert route.src.value("select current_batch from pgq.get_consumer_info()") is None
    print(f"stopped {time.monotonic() - started:.1f}s after SIGTERM")


def test_second_signal_rolls_the_batch_back(route):
    mover = start_big_batch_move(route)
    mover.send_signal(signal.SIGINT)
    time.sleep(0.1)
    mover.send_signal(signal.SIGINT)
    _, log = mover.communicate(timeout=60)

    assert mover.returncode == 130, log
    assert "interrupted twice: the batch in hand was rolled back" in log
    assert "Traceback" not in log
    assert route.target_events() == []
    assert route.dst.last_tick(route.name) is None
    assert route.src.value("select current_batch from pgq.get_consumer_info()") is not None

    run_qmover("run", "--once", str(route.config), check=True)
    assert len(route.target_events()) == 300_010


def test_loop_retries_a_target_that_comes_up_later(make_db, tmp_path):
    from conftest import MANUAL_CONFIG

    src = make_db()
    src.create_queue("eventlog")
    late = make_db()  # made now so the fixture drops it; taken away until "the server comes up"
    late_name = late.name
    config = tmp_path / "mover.ini"
    config.write_text(MANUAL_CONFIG.format(src=src.dsn, dst=late.dsn) + "loop_delay = 0.1\n")
    late.create_queue("copy_of_eventlog")
    run_qmover("install", str(config), check=True)
    rename = PgqDatabase("postgres").execute
    rename(f'alter database "{late_name}" rename to "{late_name}_away"')
    src.produce_series("eventlog", 20)
    src.tick("eventlog")

    try:
        mover = subprocess.Popen([sys.executable, "-m", "qmover", "run", str(config)],
                                 stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
    finally:
        rename(f'alter database "{late_name}_away" rename to "{late_name}"')
    deadline = time.monotonic() + 30
    while len(late.events("copy_of_eventlog")) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    mover.send_signal(signal.SIGTERM)
    _, log = mover.communicate(timeout=30)

    assert mover.returncode == 0
    assert "cannot connect" in log and "retrying in" in log
    assert sorted(late.events("copy_of_eventlog")) == sorted(src.events("eventlog"))


BREAKAGES = {
    "consumer unregistered": ("select pgq.unregister_consumer('events', 'partition_1')",
                              ["is not registered", "qmover install"]),
    "queue dropped": ("select pgq.drop_queue('events', true)",
                      ["queue 'events' does not exist", "pgq.create_queue"]),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_route_broken_while_running_stops_alone(make_db, tmp_path, breakage):
    p1, p2, central = make_db(), make_db(), make_db()
    for part in (p1, p2):
        part.create_queue("events")
    central.create_queue("central_events")
    config = tmp_path / "partitions.ini"
    config.write_text(TWO_PARTITIONS.format(p1=p1.dsn, p2=p2.dsn, central=central.dsn).replace(
        "dst_queue_name = central_events\n", "dst_queue_name = central_events\nloop_delay = 0.1\n"))
    run_qmover("install", str(config), check=True)
    mover = subprocess.Popen([sys.executable, "-m", "qmover", "run", str(config)],
                             stderr=subprocess.PIPE, text=True)
    try:
        p1.produce_series("events", 10, tag="before")
        p1.tick("events")
        deadline = time.monotonic() + 30
        while len(central.events("central_events")) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        statement, words = BREAKAGES[breakage]
        p1.execute(statement)
        p2.produce_series("events", 15, tag="other")
        p2.tick("events")
        while len(central.events("central_events")) < 25 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        mover.send_signal(signal.SIGTERM)
        _, log = mover.communicate(timeout=30)

    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1, log
    assert "route partition_1" in errors[0] and all(word in errors[0] for word in words)
    assert len(central.events("central_events")) == 25  # partition_2 went on
    assert mover.returncode == 1  # a route stopped


def test_target_queue_dropped_while_running_stops_the_route(route):
    mover = subprocess.Popen([sys.executable, "-m", "qmover", "run", str(route.config)],
                             stderr=subprocess.PIPE, text=True)
    try:
        route.src.produce_series(route.src_queue, 10, tag="before")
        route.src.tick(route.src_queue)
        deadline = time.monotonic() + 30
        while len(route.target_events()) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        route.dst.execute("select pgq.drop_queue(%s)", (route.dst_queue,))
        route.src.produce_series(route.src_queue, 10, tag="after")
        route.src.tick(route.src_queue)
        _, log = mover.communicate(timeout=30)  # the only route stopped: run exits by itself
    finally:
        if mover.poll() is None:
            mover.kill()

    assert mover.returncode == 1
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1, log
    assert "target database" in errors[0] and f"queue '{route.dst_queue}' does not exist" in errors[0]
    assert "Traceback" not in log
    assert route.src.value("select current_batch from pgq.get_consumer_info()") is not None  # not finished


FAN_OUT = """\
[to_billing]
src_db = {src}
dst_db = {billing}
pgq_queue_name = events

[to_archive]
src_db = {src}
dst_db = {archive}
pgq_queue_name = events
dst_queue_name = archived_events
"""


def test_fan_out_one_source_queue_to_two_targets(make_db, tmp_path):
    src, billing, archive = make_db(), make_db(), make_db()
    src.create_queue("events")
    billing.create_queue("events")
    archive.create_queue("archived_events")
    config = tmp_path / "fan-out.ini"
    config.write_text(FAN_OUT.format(src=src.dsn, billing=billing.dsn, archive=archive.dsn))
    run_qmover("install", str(config), check=True)
    for n in range(3):
        src.produce_series("events", 20, tag=f"b{n}-")
        src.tick("events")

    run_qmover("run", "--once", "--route", "to_billing", str(config), check=True)
    src.produce_series("events", 5, tag="late")
    src.tick("events")
    run_qmover("run", "--once", str(config), check=True)

    assert billing.events("events") == src.events("events")
    assert archive.events("archived_events") == src.events("events")
    consumers = src.execute("select consumer_name, pending_events from pgq.get_consumer_info('events') order by 1")
    assert consumers == [("to_archive", 0), ("to_billing", 0)]


def test_loggers_are_per_module_and_each_can_be_turned_up_or_down(route):
    route.src.produce_series(route.src_queue, 10)
    route.src.tick(route.src_queue)
    quiet = run_qmover("--log", "qmover.protocol.mover=WARNING", "--log", "qmover.pg.connector=DEBUG",
                       "run", "--once", str(route.config), check=True)
    lines = quiet.stderr.splitlines()
    assert not [line for line in lines if " INFO qmover.protocol.mover " in line]  # no line per batch
    assert [line for line in lines if " DEBUG qmover.pg.connector " in line and "a new connection" in line]
    assert not [line for line in lines if " DEBUG " in line and " qmover.pg.connector " not in line]
    assert len(route.target_events()) == 10


def test_run_once_leaves_a_route_another_mover_holds_to_it_and_says_so(route):
    route.src.produce_series(route.src_queue, 10)
    route.src.tick(route.src_queue)
    holder = route.dst.connect()
    with holder.cursor() as cur:  # a worker's claim on the route
        claim_as_another_mover(cur, route.name)
        held = run_qmover("run", "--once", str(route.config), check=True)
        let_go_as_another_mover(cur)
    holder.close()
    assert "route eventlog_to_target_mover: another mover holds it" in held.stderr
    assert route.target_events() == []
    run_qmover("run", "--once", str(route.config), check=True)
    assert len(route.target_events()) == 10
