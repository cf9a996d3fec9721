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

    result = split_route.qmover("run", "--once", check=True)

    assert data(split_route, "orders_q") == ["o1", "o2"]
    assert data(split_route, "pay_q") == ["p1"]
    assert data(split_route, "misc_q") == [] and data(split_route, "users") == []
    assert "events=3 filtered=2" in result.stderr
    status = json.loads(split_route.qmover("status", "--json", check=True).stdout)[0]
    assert status["target_last_tick"] == status["source_last_tick"] and status["events_filtered"] == 2
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
    again = split_route.qmover("run", "--once", check=True)

    assert "skipped: already applied" in again.stderr
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
