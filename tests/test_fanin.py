"""Fan-in at scale (30 partitions into one central queue): bounded connections,
no tasks for idle routes, and a dead partition that holds up nobody."""

from __future__ import annotations

import re
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmover.pg.db import QUICK_CONNECT_TIMEOUT

from celery_helpers import Processes, error_lines, wait_until
from conftest import PgqDatabase, installed_processes, partitions_and_central, peaks

PARTITIONS = 30
INTERVAL = 0.5
TEMPLATE = """
[part]
partitions = {names}
src_db = host=127.0.0.1 dbname=%(partition)s
dst_db = host=127.0.0.1 dbname={central}
pgq_queue_name = events
dst_queue_name = central_events
move_interval = {interval}

[qmover]
broker_url = {broker}
"""


@dataclass
class FanIn:
    parts: list[PgqDatabase]
    central: PgqDatabase
    config: Path
    procs: Processes

    def produce_everywhere(self, per_part: int, tag: str) -> int:
        for part in self.parts:
            part.produce_series("events", per_part, size=40, tag=tag)
            part.tick("events")
        return per_part * len(self.parts)

    def central_count(self) -> int:
        return self.central.value("select count(*) from pgq.event_1")

    def exactly_once(self) -> None:
        source = Counter(event for part in self.parts for event in part.events("events"))
        assert Counter(self.central.events("central_events")) == source

    def sweeps(self) -> list[tuple[float, int, str]]:
        """Each sweep beat ran, in order: (seconds it took, slices in an interval, what it sent)."""
        return [(float(seconds), int(slices), sent) for seconds, sent, slices in re.findall(
            r"Task qmover.sweep\[\S+\] succeeded in ([\d.]+)s: (\{'slice': '\d+/(\d+)'.*\})",
            self.procs.log("beat"))]

    def intervals_swept(self) -> float:
        """How many move_intervals beat has swept: every slice once is one."""
        return sum(1 / slices for _, slices, _ in self.sweeps())

    def tick_moves_within_two_intervals(self, part: PgqDatabase, tag: str) -> None:
        """Events ticked on part reach central, sent by a sweep of the first or
        second interval that begins after the tick (counted in sweeps, not seconds)."""
        swept, before = len(self.sweeps()), self.central_count()
        part.produce_series("events", 5, size=20, tag=tag)
        part.tick("events")
        wait_until(lambda: self.central_count() == before + 5, 30, "the ticked partition's events", every=0.02)
        after = self.sweeps()[swept:]
        sent_by = [n for n, (_, _, sent) in enumerate(after) if f"'part_{part.name}'" in sent]
        assert sent_by and sent_by[0] < 2 * after[0][1], (sent_by, after[0][1])

    def move_tasks_received(self) -> int:
        return len(re.findall(r"Task qmover.move_next_batch\[\S+\] received", self.procs.logs()))


@pytest.fixture
def fan_in(make_db, tmp_path, redis_db):
    made: list[FanIn] = []

    def build(partitions: int = PARTITIONS) -> FanIn:
        parts, central = partitions_and_central(make_db, partitions)
        config = tmp_path / "fan-in.ini"
        config.write_text(TEMPLATE.format(names=", ".join(part.name for part in parts), central=central.name,
                                          interval=INTERVAL, broker=redis_db.url))
        made.append(FanIn(parts, central, config, installed_processes(config, tmp_path)))
        return made[-1]

    yield build
    for built in made:
        built.procs.stop()


@pytest.mark.alone
def test_thirty_partitions_bounded_connections_no_idle_tasks_and_prompt_moves(fan_in):
    fan = fan_in()
    peak = peaks(fan.central, fan.parts)
    try:
        fan.procs.worker("worker", 2)  # 2 pool processes
        fan.procs.beat()
        produced = fan.produce_everywhere(1000, "drain")
        wait_until(lambda: fan.central_count() >= produced, 120, "every partition drained into central")
        drained = fan.intervals_swept()
        wait_until(lambda: fan.intervals_swept() >= drained + 2, 30, "two intervals swept after the drain")

        # Idle: four intervals go by, and no move task.
        received, swept = fan.move_tasks_received(), fan.intervals_swept()
        wait_until(lambda: fan.intervals_swept() >= swept + 4, 30, "four idle intervals")
        assert fan.move_tasks_received() == received

        # One ticked partition: its events are sent within the next two intervals' sweeps.
        for part in (fan.parts[7], fan.parts[-1]):
            fan.tick_moves_within_two_intervals(part, "late")
    finally:
        peak.stop()

    fan.exactly_once()
    assert error_lines(fan.procs.logs()) == []
    print(f"peak qmover connections: central {peak.central}, busiest partition {peak.partition}, "
          f"server {peak.total} ({PARTITIONS} partitions)")
    assert peak.central <= 2 + 2  # worker processes + 2
    assert peak.partition <= 1 + 2  # beat's sweep + worker processes


HUNG = """
[hung]
job_name = part_{name}
src_db = host=127.0.0.1 port={port} dbname={name}
dst_db = host=127.0.0.1 dbname={central}
pgq_queue_name = events
dst_queue_name = central_events
move_interval = {interval}
"""


class Blackhole:
    """A TCP port that accepts connections and never says a word: a hung host."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def test_a_partition_that_hangs_holds_up_only_its_own_route(fan_in):
    fan = fan_in(6)
    hung, others = fan.parts[0], fan.parts[1:]
    hole = Blackhole()
    try:
        # The hung partition's route, as installed (same consumer), now reached through the blackhole.
        fan.config.write_text(HUNG.format(name=hung.name, port=hole.port, central=fan.central.name,
                                          interval=INTERVAL)
                              + fan.config.read_text().replace(f"{hung.name}, ", "", 1))
        fan.procs.worker("worker", 2)
        fan.procs.beat()
        hung.produce_series("events", 10, tag="stuck")
        hung.tick("events")
        others[0].produce_series("events", 5, size=20, tag="warm-up")
        others[0].tick("events")
        wait_until(lambda: fan.central_count() == 5, 60, "the worker and beat to be up")
        for round_no in range(4):
            fan.tick_moves_within_two_intervals(others[1 + round_no % (len(others) - 1)], f"r{round_no}")
        # Not held up: at most the sweep that found it hung waited for the connect timeout (2 s).
        assert sum(seconds >= QUICK_CONNECT_TIMEOUT for seconds, _, _ in fan.sweeps()) <= 1
        beat = fan.procs.log("beat")
        assert "sweep: route part_" in beat and "its 1 route(s) wait until it answers" in beat
        assert beat.count("wait until it answers") == 1  # said once, not every sweep
    finally:
        hole.close()
    assert fan.central_count() == 25  # nothing of the hung partition


def test_kill_9_of_beat_and_worker_while_sweeping_loses_and_doubles_nothing(fan_in):
    fan = fan_in(10)
    fan.procs.worker("worker", 2)
    fan.procs.beat()
    produced = 0
    for round_no in range(6):
        moved = fan.central_count()
        produced += fan.produce_everywhere(200, f"k{round_no}-")
        # SIGKILL once this round's events have begun to arrive: sweeps and moves are under way
        wait_until(lambda moved=moved: fan.central_count() > moved, 60, "this round's events to begin arriving",
                   every=0.01)
        fan.procs.kill("beat" if round_no % 2 else "worker")
        if round_no % 2:
            fan.procs.beat()
        else:
            fan.procs.worker("worker", 2)
    wait_until(lambda: fan.central_count() >= produced, 90, "every event after the kills")
    swept = fan.intervals_swept()
    wait_until(lambda: fan.intervals_swept() >= swept + 3, 30, "three more intervals, in which a duplicate would show")
    fan.exactly_once()
