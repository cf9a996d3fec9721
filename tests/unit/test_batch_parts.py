"""Parts of the move protocol that need no server: the spool a small batch is
copied through, and what a lost position says."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from qmover.config import Route
from qmover.protocol.batch import MERGE_EVENTS, Batch, Spool, _same_count, lost_position, next_batch_params


def test_a_spool_keeps_rows_in_memory_up_to_its_limit():
    with Spool(10) as spool:
        spool.write(b"12345")
        spool.write(b"67890")
        assert spool.buffer is spool.memory
        spool.rewind()
        assert spool.read() == b"1234567890"


def test_a_spool_past_its_limit_goes_on_in_a_temporary_file_with_every_row():
    with Spool(10) as spool:
        spool.write(b"12345")
        spool.write(b"678901")
        spool.write(b"x" * 100)
        assert not isinstance(spool.buffer, io.BytesIO)
        spool.rewind()
        assert spool.read() == b"12345678901" + b"x" * 100


def test_a_copy_that_lost_rows_on_the_way_is_an_error():
    assert _same_count(3, 3) == 3
    with pytest.raises(RuntimeError, match="source sent 3 events, target took 2"):
        _same_count(3, 2)


def test_a_lost_position_names_both_ticks_and_both_ways_out():
    route = Route(name="r", consumer="c", src_dsn="dbname=a", dst_dsn="dbname=b", src_queue="q", dst_queue="q")
    message = str(lost_position(route, 40, Batch(7, 41, 42, "select", 10, 99, False)))
    assert message.startswith("route r: lost position: target holds tick 40 but the source batch 7 runs "
                              "from tick 41 to 42; nothing was moved.")
    assert "qmover rewind CONFIG --route r" in message and "qmover reset CONFIG --route r" in message


BATCH = Batch(id=7, prev_tick=41, cur_tick=42, select="select", estimate=10, last_event_seq=99, more=False)


@pytest.mark.parametrize(("position", "says"), [
    (None, "apply"),  # a new route: no position yet
    (41, "apply"),  # the batch's start: the one before was applied
    (42, "skip"),  # the batch's end: applied before a crash, not finished on the source
    (40, "lost"), (43, "lost"), (1, "lost"),  # a target restored from a backup, or wrong
])
def test_the_target_position_says_apply_skip_or_lost_as_serial_consumer_does(position, says):
    assert BATCH.position_says(position) == says


def test_a_route_behind_merges_its_waiting_ticks_unless_it_has_a_rule_of_its_own():
    route = Route(name="r", consumer="c", src_dsn="dbname=a", dst_dsn="dbname=b", src_queue="q", dst_queue="q")
    params = next_batch_params(route, finish=6)
    assert params == {"queue": "q", "consumer": "c", "keep_lag": None, "min_count": None, "min_interval": None,
                      "finish": 6, "merge": MERGE_EVENTS}
    for own in ({"min_count": 100}, {"min_interval": 30.0}, {"keep_lag": 5.0}, {"merge_ticks": False}):
        assert next_batch_params(replace(route, **own), finish=None)["merge"] is None, own
    assert next_batch_params(replace(route, min_count=100), None)["min_count"] == 100
