"""The in-process half of a route claim, without a server: threads and
greenlets of one process never hold one route at once."""

from __future__ import annotations

import threading
from dataclasses import replace

from qmover.config import Route
from qmover.protocol.claim import HELD_TOO_LONG, Claims, Held, holder_key, source_name


def route(name: str, consumer: str | None = None, target: str = "central") -> Route:
    return Route(name=name, consumer=consumer or name, src_dsn=f"host=127.0.0.1 dbname={name}",
                 dst_dsn=f"host=127.0.0.1 dbname={target}", src_queue="events", dst_queue="central")


def test_a_route_held_in_the_process_is_not_held_again_until_let_go():
    claims, a, b = Claims(), route("a"), route("b")
    assert claims.hold([a]) == [a]
    assert claims.hold([a, b]) == [b]
    claims.let_go([a])
    assert claims.hold([a, b]) == [a]


def test_a_claim_covers_a_consumer_on_a_target_database_whoever_logs_in():
    same = replace(route("a"), dst_dsn="dbname=central host=127.0.0.1 user=other")
    assert holder_key(same) == holder_key(route("a"))
    assert holder_key(route("a", target="elsewhere")) != holder_key(route("a"))
    claims = Claims()
    assert claims.hold([route("a")]) and claims.hold([same]) == []
    assert claims.hold([route("a", target="elsewhere")])  # another target's pgq_ext position: another claim


def test_of_many_threads_holding_one_route_at_once_exactly_one_gets_it():
    claims, a = Claims(), route("a")
    start = threading.Barrier(16)
    got: list[list[Route]] = []

    def hold() -> None:
        start.wait()
        got.append(claims.hold([a]))

    threads = [threading.Thread(target=hold) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(len, got)) == [0] * 15 + [1]


def test_places_are_named_by_the_source_database_not_the_login():
    assert source_name(route("a")) == " 127.0.0.1   a"
    assert source_name(replace(route("a"), src_dsn="dbname=a host=127.0.0.1 user=x password=y")) == " 127.0.0.1   a"


def test_a_claim_is_overdue_past_its_routes_move_budget_by_more_than_the_bound():
    slow = replace(route("a"), move_budget=60.0)
    assert not Held("h pid 1", 10 + HELD_TOO_LONG).overdue(route("a"))  # budget 10 s by default
    assert Held("h pid 1", 10.5 + HELD_TOO_LONG).overdue(route("a"))
    assert not Held("h pid 1", 80.0).overdue(slow)
    assert Held("h pid 1", 95.4).said(slow) == (
        "route a: held by h pid 1 for 95 s, beyond its move_budget (60 s) by more than 30 s: that mover is stuck "
        "or cut off; its claim ends 15 s after its last renewal, or with its session")
