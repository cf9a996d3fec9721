"""split_field: one source batch into several target queues, in one target transaction."""

from __future__ import annotations

import json
import re

import pytest

from qmover.config import load_config

from conftest import RouteSetup, run_qmover

EVENTS = [  # (ev_type, ev_data, ev_extra1)
    ("insert", "o1", "orders"),
    ("update", "o2", "orders"),
    ("insert", "p1", "payments"),
    ("insert", "u1", "users"),
    ("insert", "n1", None),
]


@pytest.fixture
def split_route(make_db, tmp_path) -> RouteSetup:
    """A source queue and a target with queues orders_q, pay_q and misc_q; config written by the test."""
    src, dst = make_db(), make_db()
    src.create_queue("eventlog")
    for queue in ("orders_q", "pay_q", "misc_q", "users"):
        dst.create_queue(queue)
    return RouteSetup(src, dst, tmp_path / "split.ini", name="splitter", dst_queue="")


def configure(route: RouteSetup, install: bool = True, **keys: str) -> None:
    route.config.write_text(f"[splitter]\nsrc_db = {route.src.dsn}\ndst_db = {route.dst.dsn}\n"
                            "pgq_queue_name = eventlog\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    if install:
        route.qmover("install", check=True)


def produce(route: RouteSetup) -> None:
    route.src.produce(route.src_queue, [(kind, data, table, None, None, None) for kind, data, table in EVENTS])
    route.src.tick(route.src_queue)


def data(route: RouteSetup, queue: str) -> list[str]:
    return sorted(row[0] for row in route.dst.events(queue, "ev_data"))


def test_split_through_a_map_skipping_unknown_values(split_route):
    configure(split_route, split_field="ev_extra1", split_map="orders:orders_q, payments:pay_q",
              split_unknown="skip")
    produce(split_route)

    split_route.qmover("run", "--once", check=True)

    assert data(split_route, "orders_q") == ["o1", "o2"]
    assert data(split_route, "pay_q") == ["p1"]
    assert data(split_route, "misc_q") == [] and data(split_route, "users") == []
    status = json.loads(split_route.qmover("status", "--json", check=True).stdout)[0]
    assert (status["events_moved"], status["events_filtered"]) == (3, 2)
    assert status["target_last_tick"] == status["source_last_tick"]
    assert status["target_queue"] is None  # each event names its own
    route = load_config(split_route.config).routes["splitter"]
    assert (route.kind, route.dst_queue, route.target_queues) == ("split", None, ("orders_q", "pay_q"))


def test_values_name_queues_and_the_rest_go_to_a_catch_all(split_route):
    configure(split_route, split_field="ev_extra1", split_unknown="misc_q")
    produce(split_route)

    split_route.qmover("run", "--once", check=True)

    assert data(split_route, "users") == ["u1"]  # the value is the queue's name
    assert data(split_route, "misc_q") == ["n1", "o1", "o2", "p1"]  # no queue 'orders', 'payments'; NULL


def test_an_unknown_value_stops_the_route_and_moves_nothing(split_route):
    configure(split_route, split_field="ev_extra1", split_map="orders:orders_q")
    produce(split_route)

    result = split_route.qmover("run", "--once")

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr
    assert re.search(r"batch \d+: ev_extra1 ('payments'|'users'|None) names no target queue", errors[0]), errors
    assert "split_unknown = skip" in errors[0]
    assert data(split_route, "orders_q") == []
    assert split_route.src.value("select current_batch from pgq.get_consumer_info()") is not None


def test_split_crash_after_target_commit_is_exactly_once(split_route):
    configure(split_route, split_field="ev_type", split_map="insert:orders_q, update:pay_q")
    produce(split_route)

    split_route.crash_at("after_target_commit")
    split_route.qmover("run", "--once", check=True)

    assert split_route.counters()["skipped"] == 1  # already applied
    assert data(split_route, "orders_q") == ["n1", "o1", "p1", "u1"]
    assert data(split_route, "pay_q") == ["o2"]


def test_an_empty_batch_moves_the_split_routes_position_and_the_next_one_splits(split_route):
    """An idle tick sends no COPY in (qmover.protocol.batch.copy_spooled): the split still
    records the batch, and finds nothing left over in its temporary table after it."""
    configure(split_route, split_field="ev_type", split_map="insert:orders_q, update:pay_q")
    split_route.src.tick(split_route.src_queue)
    split_route.qmover("run", "--once", check=True)
    status = json.loads(split_route.qmover("status", "--json", check=True).stdout)[0]
    assert status["target_last_tick"] == status["source_last_tick"] is not None
    assert data(split_route, "orders_q") == [] and data(split_route, "pay_q") == []

    produce(split_route)
    split_route.qmover("run", "--once", check=True)
    assert data(split_route, "orders_q") == ["n1", "o1", "p1", "u1"]
    assert data(split_route, "pay_q") == ["o2"]


def test_a_map_naming_a_missing_queue_is_reported_by_install(split_route):
    configure(split_route, install=False, split_field="ev_extra1", split_map="orders:no_such_q")

    result = split_route.qmover("install")

    assert result.returncode == 1
    assert "queue 'no_such_q' does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("keys, message", [
    ({"split_field": "ev_extra9"}, "split_field: 'ev_extra9' is not one of ev_type, ev_extra1"),
    ({"split_field": "ev_type", "split_map": "insert"}, "split_map: 'insert' is not value:queue"),
    ({"split_map": "a:b"}, "split_map: only means something with split_field"),
    ({"split_field": "ev_type", "dst_queue_name": "x"}, "dst_queue_name: not with split_field"),
    ({"split_field": "ev_type", "keep_event_id": "1"}, "keep_event_id: not with split_field"),
])
def test_split_config_errors(split_route, keys, message):
    configure(split_route, install=False, **keys)

    result = run_qmover("run", "--once", str(split_route.config))

    assert result.returncode == 2 and message in result.stderr, result.stderr


# skytools' queue_splitter3 manual: its example config and its USECASE, as written
# (the DSNs are this test's databases).
SPLITTER_CONFIG = """
[queue_splitter3]
job_name        = queue_spliter_sourcedb_sourceq_targetdb

src_db          = {src}
dst_db          = {dst}

pgq_queue_name  = sourceq

logfile         = ~/log/%(job_name)s.log
pidfile         = ~/pid/%(job_name)s.pid
"""
USECASE = """
create table queue.{table} (id int4, name text, primary key (id));
create trigger redirect_queue1_trg before insert on queue.{table}
for each row execute procedure pgq.logutriga('sourceq', 'SKIP');
"""


@pytest.fixture
def manual_splitter(make_db, tmp_path) -> RouteSetup:
    """The manual's example config over its USECASE: tables queue.event1, queue.event2 into queues of their names."""
    src, dst = make_db(), make_db()
    src.create_queue("sourceq")
    src.execute("create schema queue")
    for table in ("event1", "event2", "event3"):
        src.execute(USECASE.format(table=table))
    for queue in ("queue.event1", "queue.event2"):
        dst.create_queue(queue)
    config = tmp_path / "queue_splitter.ini"
    config.write_text(SPLITTER_CONFIG.format(src=src.dsn, dst=dst.dsn))
    setup = RouteSetup(src, dst, config, name="queue_spliter_sourcedb_sourceq_targetdb", src_queue="sourceq",
                       dst_queue="")
    installed = setup.qmover("install", check=True)
    assert "target queues named by ev_extra1; pgq_ext created" in installed.stdout, installed.stdout
    return setup


def test_the_queue_splitter_manuals_config_sends_each_event_to_the_queue_extra1_names(manual_splitter):
    src, dst = manual_splitter.src, manual_splitter.dst
    src.execute("insert into queue.event1 (id, name) values (1, 'user'), (2, 'admin')")
    src.execute("insert into queue.event2 (id, name) values (1, 'order')")
    assert src.value("select count(*) from queue.event1") == 0  # SKIP: only the queue holds them
    src.tick("sourceq")

    manual_splitter.qmover("run", "--once", check=True)

    assert dst.events("queue.event1", "ev_type, ev_data, ev_extra1") == [
        ("I:id", "id=1&name=user", "queue.event1"), ("I:id", "id=2&name=admin", "queue.event1")]
    assert dst.events("queue.event2", "ev_data") == [("id=1&name=order",)]
    route = load_config(manual_splitter.config).routes[manual_splitter.name]
    assert (route.kind, route.split.field, route.consumer) == ("split", "ev_extra1", manual_splitter.name)


def test_an_event_whose_queue_does_not_exist_stops_the_splitter_and_moves_nothing(manual_splitter):
    src, dst = manual_splitter.src, manual_splitter.dst
    src.execute("insert into queue.event1 (id, name) values (1, 'user')")
    src.execute("insert into queue.event3 (id, name) values (1, 'lost')")  # no queue.event3 on the target
    src.tick("sourceq")

    result = manual_splitter.qmover("run", "--once")

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "ev_extra1 'queue.event3' names no target queue" in errors[0], result.stderr
    assert dst.events("queue.event1") == []
    assert src.value("select current_batch from pgq.get_consumer_info()") is not None


@pytest.mark.parametrize("field, column", [("type", "ev_type"), ("extra2", "ev_extra2"), ("ev_extra3", "ev_extra3")])
def test_queue_field_names_the_event_field(tmp_path, field, column):
    config = tmp_path / "splitter.ini"
    config.write_text(SPLITTER_CONFIG.format(src="dbname=a", dst="dbname=b") + f"queue_field = {field}\n")

    route = load_config(config).routes["queue_spliter_sourcedb_sourceq_targetdb"]

    assert route.split.field == column and route.dst_queue is None


@pytest.mark.parametrize("section, keys, message", [
    ("queue_splitter3", {"queue_field": "data"}, "queue_field: 'data' is not one of type, extra1"),
    ("queue_splitter3", {"split_field": "ev_type"}, "split_field: not in a [queue_splitter3] section"),
    ("mover", {"queue_field": "extra1"}, "queue_field: only a [queue_splitter3] section reads it"),
])
def test_queue_field_errors(tmp_path, section, keys, message):
    config = tmp_path / "splitter.ini"
    config.write_text(f"[{section}]\nsrc_db = dbname=a\ndst_db = dbname=b\npgq_queue_name = q\n"
                      + "".join(f"{k} = {v}\n" for k, v in keys.items()))

    result = run_qmover("run", "--once", str(config))

    assert result.returncode == 2 and message in result.stderr, result.stderr
