"""End-to-end moves through `qmover run`: the manual's example and event fidelity."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from qmover.config import load_config
from qmover.protocol import batch as batch_module
from qmover.protocol.mover import Mover

from conftest import run_qmover


def test_manual_example_moves_events_end_to_end(route):
    route.src.produce(route.src_queue, [("order", f"id={i}", "public.orders", None, None, None)
                                        for i in range(50)])
    route.src.tick(route.src_queue)
    route.src.produce(route.src_queue, [("payment", f"p={i}", None, None, None, None) for i in range(20)])
    route.src.tick(route.src_queue)

    route.qmover("run", "--once", check=True)

    assert route.target_events() == route.source_events()
    assert len(route.target_events()) == 70
    counted = route.counters()
    assert (counted["events"], counted["batches"]) == (70, 1)  # the two waiting ticks, as one batch
    tick = route.src.value("select last_tick from pgq.get_consumer_info(%s, %s)",
                           (route.src_queue, route.name))
    assert route.dst.last_tick(route.name) == tick


def test_merge_ticks_0_moves_each_waiting_tick_as_a_batch_of_its_own(route):
    with route.config.open("a") as config:
        config.write("merge_ticks = 0\n")
    for count in (50, 20, 5):
        route.src.produce_series(route.src_queue, count)
        route.src.tick(route.src_queue)
    assert route.move().sizes == [50, 20, 5]
    assert route.target_events() == route.source_events()


def test_a_route_behind_takes_its_waiting_ticks_as_batches_of_about_merge_events(route, monkeypatch):
    """Merged up to about MERGE_EVENTS a batch (PgQ's batch collection): here 100."""
    monkeypatch.setattr(batch_module, "MERGE_EVENTS", 100)
    for _ in range(12):
        route.src.produce_series(route.src_queue, 30)
        route.src.tick(route.src_queue, force=False)  # force_tick would count extra events into each tick
    sizes = route.move().sizes
    assert sizes == [120, 120, 120], sizes  # the first tick that reaches 100 events ends each batch
    assert route.target_events() == route.source_events()


def test_run_once_twice_moves_nothing_more(route):
    route.src.produce_series(route.src_queue, 30)
    route.src.tick(route.src_queue)
    route.qmover("run", "--once", check=True)
    route.qmover("run", "--once", check=True)
    assert len(route.target_events()) == 30


FIDELITY_EVENTS = [
    (None, None, None, None, None, None),
    ("t", "", "", "", "", ""),
    ("ünïcødé ✓", "日本語 текст 🎉", "ä", "ö", "ü", "ß"),
    ("tab\there", "new\nline\r\ncrlf", "back\\slash", "\\.", "\\N", "end\\"),
    ("copy-end", "\\.\n\\.", "a\tb\nc\\d", None, "NULL", "\\\\"),
    ("x", "null\x01ctrl\x1f", None, "", None, " "),
]


def test_every_visible_column_survives(route, copy_path):
    route.src.produce(route.src_queue, FIDELITY_EVENTS)
    route.src.execute("select pgq.insert_event_raw('eventlog', null, '2026-01-02 03:04:05.123456+00',"
                      " null, null, 'micro', 'x', null, null, null, null)")
    route.src.tick(route.src_queue)

    assert len(route.move().batches) == 1

    source, target = route.source_events(), route.target_events()
    assert target == source
    assert [row[:6] for row in target[:-1]] == FIDELITY_EVENTS
    # ev_time equal to the microsecond, as timestamps and as text
    src_times = route.src.execute("select ev_time::text from pgq.event_1 order by ev_id")
    dst_times = route.dst.execute("select ev_time::text from pgq.event_1 order by ev_id")
    assert src_times == dst_times
    assert route.dst.value("select (max(ev_time) filter (where ev_type = 'micro') at time zone 'UTC')::text"
                           " from pgq.event_1") == "2026-01-02 03:04:05.123456"


def test_ten_megabyte_event(route, copy_path):
    big = "0123456789abcdef" * (10 * 1024 * 1024 // 16)
    route.src.produce(route.src_queue, [("big", big, "x" * 1000, None, None, None),
                                        ("small", "s", None, None, None, None)])
    route.src.tick(route.src_queue)

    assert len(route.move().batches) == 1

    assert route.dst.value("select length(ev_data) from pgq.event_1 where ev_type = 'big'") == len(big)
    assert route.target_events() == route.source_events()


def test_empty_batches_advance_the_position(route):
    ticks = [route.src.tick(route.src_queue) for _ in range(3)]

    route.qmover("run", "--once", check=True)

    assert route.target_events() == []
    assert route.counters()["batches"] == 1  # three waiting ticks, one batch
    assert route.dst.last_tick(route.name) == ticks[-1]


def test_batch_collect_settings_merge_ticks(route):
    with route.config.open("a") as config:
        config.write("pgq_batch_collect_events = 100\n")

    def produce_ticks(count: int) -> None:
        for _ in range(count):
            route.src.produce_series(route.src_queue, 30)
            route.src.tick(route.src_queue, force=False)

    produce_ticks(5)
    route.qmover("run", "--once", check=True)
    first = route.counters()
    produce_ticks(2)
    route.qmover("run", "--once", check=True)

    assert (first["events"], first["batches"]) == (150, 1)  # 5 ticks, one batch
    second = route.counters()
    assert (second["events"], second["batches"]) == (150, 1)  # 60 < 100: held back
    assert len(route.target_events()) == 150


def test_memory_does_not_grow_with_batch_size(route, tmp_path):
    """Peak RSS of a mover moving 1k events vs 200k events (~50 MB) in one batch."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(r"""
        import re, sys
        from qmover.config import load_config
        from qmover.protocol.mover import Mover
        [moved] = Mover().move(load_config(sys.argv[1]).select(), budget=60)
        # VmHWM, unlike ru_maxrss, starts afresh at exec: this process only.
        status = open("/proc/self/status").read()
        print(moved.events, re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    """))

    def peak_rss_kb(count: int) -> int:
        route.src.produce_series(route.src_queue, count, size=200)
        route.src.tick(route.src_queue)
        out = subprocess.run([sys.executable, str(probe), str(route.config)], check=True,
                             capture_output=True, text=True).stdout.split()
        assert int(out[0]) == count
        return int(out[1])

    small, large = peak_rss_kb(1_000), peak_rss_kb(200_000)
    print(f"peak RSS: 1k events {small} kB, 200k events {large} kB")
    assert large - small < 4 * 1024, f"peak RSS grew from {small} kB to {large} kB"
    assert len(route.target_events()) == 201_000


def read_as_consumer(db, queue: str, consumer: str) -> list[tuple]:
    """Every event a PgQ consumer of the queue is handed, batch by batch."""
    events = []
    with db.connect() as conn, conn.cursor() as cur:
        while True:
            cur.execute("select pgq.next_batch(%s, %s)", (queue, consumer))
            batch = cur.fetchone()[0]
            if batch is None:
                return events
            cur.execute("select ev_type, ev_data from pgq.get_batch_events(%s)", (batch,))
            events += cur.fetchall()
            cur.execute("select pgq.finish_batch(%s)", (batch,))


def test_a_table_rotation_during_a_batch_hides_no_event_from_target_consumers(route):
    """PgQ's readers stop reading a queue's previous event table once a rotation
    is done with it; a batch written there after that would never be read.  Here
    the rotation runs between the mover's choice of table and its COPY."""
    route.dst.tick(route.dst_queue)
    route.dst.execute("select pgq.register_consumer(%s, 'reader')", (route.dst_queue,))
    route.dst.execute("select pgq.set_queue_config(%s, 'rotation_period', '0')", (route.dst_queue,))
    route.src.produce_series(route.src_queue, 10)
    route.src.tick(route.src_queue)
    rotated = []

    def rotate(_route, point: str) -> None:
        if point == "position":
            before = route.dst.value("select queue_cur_table from pgq.queue where queue_name = %s",
                                     (route.dst_queue,))
            route.dst.execute("select pgq.maint_rotate_tables_step1(%s)", (route.dst_queue,))
            route.dst.execute("select pgq.maint_rotate_tables_step2()")
            route.dst.tick(route.dst_queue)
            rotated.append(before != route.dst.value(
                "select queue_cur_table from pgq.queue where queue_name = %s", (route.dst_queue,)))

    assert route.move(checkpoint=rotate).sizes == [10]
    route.dst.tick(route.dst_queue)

    assert rotated == [True]
    assert sorted(read_as_consumer(route.dst, route.dst_queue, "reader")) == sorted(
        route.src.events(route.src_queue, "ev_type, ev_data"))


def test_routes_sharing_a_source_connection_take_batches_in_turn(make_db, tmp_path):
    """Routes of one source database borrow one connection in turn, with what
    was prepared on it: each moves every event of its own consumer."""
    src, left, right = make_db(), make_db(), make_db()
    src.create_queue("eventlog")
    sections = []
    for name, dst in (("left", left), ("right", right)):
        dst.create_queue("copy_of_eventlog")
        sections.append(f"[{name}]\nsrc_db = {src.dsn}\ndst_db = {dst.dsn}\n"
                        "pgq_queue_name = eventlog\ndst_queue_name = copy_of_eventlog\nmerge_ticks = 0\n")
    config = tmp_path / "two.ini"
    config.write_text("\n".join(sections))
    run_qmover("install", str(config), check=True)
    for _ in range(3):
        src.produce_series("eventlog", 20)
        src.tick("eventlog")

    mover = Mover()
    try:
        outcomes = mover.move(load_config(str(config)).select(), budget=60)
        assert [(outcome.route.name, outcome.batches) for outcome in outcomes] == [("left", 3), ("right", 3)]
        assert mover.connector.idle_count() == 3  # one source connection, one per target
    finally:
        mover.close()

    for dst in (left, right):
        assert len(dst.events("copy_of_eventlog")) == 60
