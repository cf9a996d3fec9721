"""The readiness sweep's decisions, without a server: which routes are ready,
which already have a task out, how sources are sliced and tasks filled."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qmover.config import Route
from qmover.protocol.claim import Taken
from qmover.protocol.readiness import Outstanding, candidates, chunks, resend_after, sliced, slices, waiting

RESEND = 5.0


def route(name: str = "r", source: str = "shop", **settings) -> Route:
    return Route(name=name, consumer=name, src_dsn=f"host=127.0.0.1 dbname={source}",
                 dst_dsn="host=127.0.0.1 dbname=central", src_queue="events", dst_queue="central", **settings)


def row(batch_age: float | None = None, waited: float | None = 1.5, events_ahead: int = 10,
        seconds_ahead: float = 2.0) -> tuple:
    """The columns of Source.SWEEP_STATE after queue and consumer."""
    return (batch_age, waited, events_ahead, seconds_ahead)


def taken(now: float, last: float | None = None) -> Taken:
    """The target's claims of route r, read at now (its clock): none live, last taken at last."""
    return Taken(now, {}, {} if last is None else {"r": last})


def test_a_route_with_a_tick_past_its_position_waited_as_long_as_that_tick():
    assert waiting(route(), row(waited=1.5), RESEND) == 1.5


def test_a_route_with_no_tick_past_its_position_has_nothing_to_move():
    assert waiting(route(), row(waited=None), RESEND) == -1


def test_a_consumer_the_sweep_did_not_find_is_ready_so_that_its_mover_says_why():
    assert waiting(route(), None, RESEND) == 0.0


def test_an_open_batch_is_left_to_its_mover_until_it_is_older_than_resend():
    assert waiting(route(), row(batch_age=1.0), RESEND) is None
    assert waiting(route(), row(batch_age=RESEND + 1), RESEND) == RESEND + 1  # its mover is gone


def test_keep_lag_holds_a_tick_back_until_it_is_that_old():
    lagging = route(keep_lag=3.0)
    assert waiting(lagging, row(waited=2.0), RESEND) == -1
    assert waiting(lagging, row(waited=3.5), RESEND) == 3.5


@pytest.mark.parametrize(("settings", "ahead", "ready"), [
    ({"min_count": 100}, {"events_ahead": 99}, False),
    ({"min_count": 100}, {"events_ahead": 100}, True),
    ({"min_interval": 60.0}, {"seconds_ahead": 59.0}, False),
    ({"min_interval": 60.0}, {"seconds_ahead": 61.0}, True),
    ({"min_count": 100, "min_interval": 60.0}, {"events_ahead": 5, "seconds_ahead": 61.0}, True),
])
def test_batch_collection_waits_for_what_next_batch_custom_would_ask(settings, ahead, ready):
    assert (waiting(route(**settings), row(**ahead), RESEND) == 1.5) is ready


def test_candidates_are_the_routes_with_a_batch_to_move_and_those_with_none_are_told_apart():
    ready, idle, busy = route("ready"), route("idle"), route("busy")
    state = {("events", "ready"): row(), ("events", "idle"): row(waited=None), ("events", "busy"): row(batch_age=1)}
    assert candidates([ready, idle, busy], state, RESEND) == ([(1.5, ready)], [idle])


def test_a_route_sent_a_task_is_not_sent_another_until_a_mover_takes_it_after_the_send():
    outstanding, r = Outstanding(), route()
    assert not outstanding.out(r, taken(now=100.0), RESEND, now=0.0)
    outstanding.sent([r], now=0.0)
    assert outstanding.out(r, taken(now=101.0), RESEND, now=1.0)
    assert outstanding.out(r, taken(now=101.0, last=99.0), RESEND, now=1.0)  # taken before: not by that task
    assert not outstanding.out(r, taken(now=101.0, last=100.5), RESEND, now=1.0)  # taken after: it ran


def test_a_task_that_ran_and_found_nothing_does_not_hold_back_the_next_tick():
    """Woken sweeps do not ask the source: a task that moved nothing still counts as run."""
    outstanding, r = Outstanding(), route()
    for tick, now in ((100.0, 0.0), (101.0, 1.0), (102.0, 2.0)):
        assert not outstanding.out(r, taken(now=tick, last=tick - 0.5), RESEND, now=now)
        outstanding.sent([r], now=now)


def test_a_task_that_never_ran_is_replaced_after_resend_seconds():
    outstanding, r = Outstanding(), route()
    outstanding.out(r, taken(now=100.0), RESEND, now=0.0)
    outstanding.sent([r], now=0.0)
    assert outstanding.out(r, taken(now=104.9), RESEND, now=RESEND - 0.1)
    assert not outstanding.out(r, taken(now=105.0), RESEND, now=RESEND)


def test_a_task_replaced_and_still_not_run_is_replaced_after_twice_then_four_times_as_long():
    outstanding, r = Outstanding(), route()
    sent_at = []
    now = 0.0
    while now < 20 * RESEND:
        if not outstanding.out(r, taken(now=100.0 + now), RESEND, now=now):
            outstanding.sent([r], now=now)
            sent_at.append(now)
        now = round(now + 0.5, 1)
    gaps = [later - earlier for earlier, later in zip(sent_at, sent_at[1:], strict=False)]
    assert gaps[:4] == [RESEND, 2 * RESEND, 4 * RESEND, 4 * RESEND]
    # a mover took it at last: the next task is due at resend again
    assert not outstanding.out(r, taken(now=100.0 + now, last=100.0 + now - 0.1), RESEND, now=now)
    outstanding.sent([r], now=now)
    assert not outstanding.out(r, taken(now=100.0 + now + RESEND), RESEND, now=now + RESEND)


def test_nothing_to_move_or_a_mover_holding_it_forgets_the_task_out():
    outstanding, r = Outstanding(), route()
    outstanding.out(r, taken(now=100.0), RESEND, now=0.0)
    outstanding.sent([r], now=0.0)
    outstanding.forget([r])
    assert not outstanding.out(r, taken(now=101.0), RESEND, now=1.0)


def test_resend_is_five_intervals_and_at_least_five_seconds():
    assert (resend_after(0.2), resend_after(1.0), resend_after(4.0)) == (5.0, 5.0, 20.0)


def test_sources_are_dealt_into_at_most_four_slices_of_whole_databases():
    routes = [route(f"r{n}", source=f"part{n // 2}") for n in range(10)]  # two routes per source database
    assert slices(routes, 1.0) == 4
    assert slices(routes[:4], 1.0) == 2  # two databases
    assert slices(routes, 0.1) == 2  # a sweep every 0.05 s at most
    dealt = sliced(routes, 1.0)
    assert [[r.name for r in part] for part in dealt] == [
        ["r0", "r1", "r8", "r9"], ["r2", "r3"], ["r4", "r5"], ["r6", "r7"]]
    woken = [replace(r, wake_on_tick=True) for r in routes]
    assert slices(woken, 1.0) == 1  # their ticks wake the sweep: one scheduled sweep an interval
    assert slices([*woken[:9], routes[9]], 1.0) == 4  # one route polled: sliced as before


def test_one_database_reached_by_two_logins_is_in_one_slice():
    alice = route("a")
    bob = replace(route("b"), src_dsn="dbname=shop user=bob host=127.0.0.1")
    assert slices([alice, bob], 1.0) == 1


def test_ready_routes_go_to_tasks_in_order_several_to_a_task():
    routes = [route(f"r{n}") for n in range(5)]
    assert [[r.name for r in chunk] for chunk in chunks(routes, 2)] == [["r0", "r1"], ["r2", "r3"], ["r4"]]
    assert chunks([], 50) == []
