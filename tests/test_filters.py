"""type_filter and table_filter: only matching events move, the rest are counted."""

from __future__ import annotations

import json

EVENTS = [  # (ev_type, ev_data, ev_extra1)
    ("order.created", "o1", "public.orders"),
    ("order.paid", "o2", "orders"),
    ("payment.done", "p1", "billing.orders"),
    ("audit_x", "a1", "public.users"),
    ("auditYx", "a2", "users"),
    ("x'; drop table pgq.queue; --", "q1", "public.orders"),
]


def with_filters(route, **filters: str) -> None:
    route.config.write_text(route.config.read_text()
                            + "".join(f"{key} = {value}\n" for key, value in filters.items()))


def produce(route) -> None:
    route.src.produce(route.src_queue, [(kind, data, table, None, None, None) for kind, data, table in EVENTS])
    route.src.tick(route.src_queue)


def moved_data(route) -> list[str]:
    return sorted(row[0] for row in route.dst.events(route.dst_queue, "ev_data"))


def status(route) -> dict:
    return json.loads(route.qmover("status", "--json", check=True).stdout)[0]


def test_type_filter_with_wildcards(route):
    with_filters(route, type_filter="order.*, audit_x, x'; drop table pgq.queue; --")
    produce(route)

    route.qmover("run", "--once", check=True)

    assert moved_data(route) == ["a1", "o1", "o2", "q1"]  # audit_x is literal: auditYx stays
    assert (status(route)["events_moved"], status(route)["events_filtered"]) == (4, 2)
    assert route.src.value("select count(*) from pgq.queue") == 1  # the quote did not escape


def test_table_filter_qualifies_names_like_skytools(route):
    with_filters(route, table_filter="orders, billing.orders")
    produce(route)

    route.qmover("run", "--once", check=True)

    assert moved_data(route) == ["o1", "o2", "p1", "q1"]
    assert status(route)["events_filtered"] == 2


def test_both_filters_must_match(route):
    with_filters(route, type_filter="order.*", table_filter="public.orders")
    produce(route)

    route.qmover("run", "--once", check=True)

    assert moved_data(route) == ["o1", "o2"]


def test_a_batch_filtered_out_entirely_still_advances(route):
    with_filters(route, type_filter="nothing.matches")
    produce(route)

    route.qmover("run", "--once", check=True)

    assert moved_data(route) == []
    info = status(route)
    assert info["target_last_tick"] == info["source_last_tick"] and info["current_batch"] is None
    assert info["events_filtered"] == len(EVENTS)


def test_filtered_route_crash_after_target_commit_is_exactly_once(route):
    with_filters(route, type_filter="order.*")
    produce(route)

    route.crash_at("after_target_commit")
    route.qmover("run", "--once", check=True)

    assert route.counters()["skipped"] == 1  # already applied
    assert moved_data(route) == ["o1", "o2"]


def test_an_empty_filter_entry_is_a_config_error(route):
    with_filters(route, type_filter="order.*,")

    result = route.qmover("run", "--once")

    assert result.returncode == 2
    assert "type_filter: 'order.*,' has an empty entry" in result.stderr
