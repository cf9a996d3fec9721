"""Parts of the move protocol that need no server: the spool a small batch is
copied through, and what a lost position says."""

from __future__ import annotations

import io

import pytest

from qmover.config import Route
from qmover.protocol.batch import Batch, Spool, _same_count, lost_position


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
