"""What the move loop's callers decide from its outcomes, without a server:
`qmover run`'s stops and retries, a task's result, and the routes that loop."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from qmover.config import Route
from qmover.errors import LostPosition, QmoverError, TransientError
from qmover.protocol.cycles import Hop, require_no_loops
from qmover.protocol.mover import Outcome
from qmover.runner import MAX_RETRY_DELAY, Backoff, Stop, _after, stop_on_signals
from qmover.tasks.jobs import result


def route(name: str = "r", src: str = "a", dst: str = "b", src_queue: str = "events", dst_queue: str = "central",
          **settings) -> Route:
    return Route(name=name, consumer=name, src_dsn=f"dbname={src}", dst_dsn=f"dbname={dst}", src_queue=src_queue,
                 dst_queue=dst_queue, **settings)


def test_connection_errors_back_off_doubling_up_to_a_minute():
    backoff = Backoff()
    delays = [backoff.failed(1.0, now=100.0) for _ in range(8)]
    assert delays == [2, 4, 8, 16, 32, MAX_RETRY_DELAY, MAX_RETRY_DELAY, MAX_RETRY_DELAY]
    assert not backoff.due(100.0 + MAX_RETRY_DELAY - 1) and backoff.due(100.0 + MAX_RETRY_DELAY)


def test_a_round_without_an_error_resets_the_backoff():
    backoff = Backoff()
    backoff.failed(1.0, now=0.0)
    _after(Outcome(route()), backoff, once=False)
    assert backoff.retries == 0 and backoff.failed(1.0, now=0.0) == 2


@pytest.mark.parametrize(("error", "once", "stopped"), [
    (TransientError("route r: target database (…): cannot connect", "target"), False, False),
    (TransientError("route r: target database (…): cannot connect", "target"), True, True),  # --once reports it
    (QmoverError("route r: source database (…): queue 'events' does not exist"), False, True),
    (LostPosition("route r: lost position"), False, True),
])
def test_a_route_stops_on_what_needs_an_operator_and_retries_the_rest(error, once, stopped, caplog):
    backoff = Backoff()
    with caplog.at_level(logging.ERROR, logger="qmover.runner"):
        _after(Outcome(route(), error=error), backoff, once)
    assert backoff.stopped is stopped
    assert backoff.retries == (0 if stopped else 1)
    [line] = caplog.messages
    assert line.startswith(str(error)) and line.endswith("route stopped" if stopped else "s")


def test_a_stop_request_wakes_a_sleeping_loop():
    stop = Stop()
    stop.requested = True
    stop.sleep(60)  # returns at once


def test_the_position_moved_when_a_batch_was_applied_or_found_applied():
    assert not Outcome(route()).moved
    assert Outcome(route(), batches=1).moved and Outcome(route(), skipped=1).moved
    assert not Outcome(route(), busy=True).moved


def test_a_task_result_names_only_what_moved_and_adds_up_the_rest():
    outcomes = [Outcome(route("a"), batches=2, events=30, filtered=5), Outcome(route("b"), busy=True),
                Outcome(route("c"), skipped=1), Outcome(route("d"))]
    assert result(outcomes, 1.23456) == {"moved": {"a": 30}, "busy": ["b"], "batches": 2, "events": 30,
                                          "filtered": 5, "skipped": 1, "seconds": 1.235}


SERVER_A, SERVER_B = ("7001", "a"), ("7002", "b")


def test_a_route_into_its_own_source_queue_is_a_loop():
    with pytest.raises(QmoverError, match="route r: its target is its own source, queue 'events'"):
        require_no_loops([Hop(route(dst_queue="events"), SERVER_A, SERVER_A)])


def test_another_queue_of_the_same_server_and_database_is_no_loop():
    require_no_loops([Hop(route(), SERVER_A, SERVER_A)])


def test_routes_that_feed_each_other_form_a_cycle_named_hop_by_hop():
    there = Hop(route("there", src_queue="events", dst_queue="central"), SERVER_A, SERVER_B)
    back = Hop(route("back", src_queue="central", dst_queue="events"), SERVER_B, SERVER_A)
    with pytest.raises(QmoverError, match=r"routes there, back form a cycle \(there moves a/events into "
                                          r"b/central, back moves b/central into a/events\)"):
        require_no_loops([there, back])


def test_a_chain_and_a_fan_in_are_no_cycle():
    first = Hop(route("first", src_queue="events", dst_queue="central"), SERVER_A, SERVER_B)
    second = Hop(route("second", src_queue="central", dst_queue="archive"), SERVER_B, SERVER_A)
    other = Hop(route("other", src_queue="events", dst_queue="central"), ("7003", "c"), SERVER_B)
    require_no_loops([first, second, other])


def test_a_first_signal_asks_to_stop_after_the_batch_in_hand_and_a_second_aborts_it():
    stop = Stop()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert (stop.requested, stop.abort) == (True, False)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.abort
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers before it are back
