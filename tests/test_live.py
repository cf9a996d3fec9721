"""A live fan-in: partitions that produce all the time, moved by a worker and beat.

Each second every partition commits a round of events (the first a probe)
and ticks, at its own moment of the second (qmover_lab.live.Load), while a
worker and beat move them into central.  What is checked is tied to progress
(sweeps, rounds, events), not to this machine's speed.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from celery import Celery

from qmover_lab.connections import ConnectionPeaks
from qmover_lab.live import Arrivals, Load, watch_probes

from celery_helpers import Processes, celery_under_test, error_lines, wait_until
from conftest import HOST_DSN, PgqDatabase, installed_processes, partitions_and_central, peaks

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = """
[part]
partitions = {names}
src_db = {host} dbname=%(partition)s
dst_db = {host} dbname={central}
pgq_queue_name = events
dst_queue_name = central_events
move_interval = {interval}
{extra}

[qmover]
broker_url = {broker}
"""
SWEEP_LINE = re.compile(r"\[([\d-]+ [\d:,]+): INFO/MainProcess\] Task qmover.sweep\[\S+\] succeeded in \S+: "
                        r"\{'slice': '\d+/(\d+)'")


@dataclass
class Live:
    parts: list[PgqDatabase]
    central: PgqDatabase
    config: Path
    procs: Processes
    load: Load
    arrivals: Arrivals

    def start_load(self, tag: str) -> None:
        self.load.start(tag)

    def run_rounds(self, rounds: int) -> None:
        """Until every partition has produced this many more rounds."""
        target = self.load.snapshot()[1] + rounds * len(self.parts)
        wait_until(lambda: self.load.snapshot()[1] >= target, 60 + rounds * 2, f"{rounds} rounds of load")

    def stop_and_drain(self) -> int:
        self.load.stop()
        produced = self.load.produced
        wait_until(lambda: self.central_count() >= produced, 120, "every event in central", every=0.1)
        time.sleep(1)  # a late duplicate would show now
        return produced

    def central_count(self) -> int:
        return self.central.value("select count(*) from pgq.event_1")

    def exactly_once(self, produced: int) -> None:
        """Every event carries data of its own (its round's marker and its number)."""
        count, distinct = self.central.execute("select count(*), count(distinct ev_data) from pgq.event_1")[0]
        assert count == distinct == produced, (count, distinct, produced)

    def sweep_times(self) -> tuple[list[float], int]:
        """When each sweep beat ran ended (monotonic clock), and the slices of an interval."""
        offset = time.time() - time.monotonic()
        found = SWEEP_LINE.findall(self.procs.log("beat"))
        times = [datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - offset for stamp, _ in found]
        return times, int(found[-1][1]) if found else 1


@pytest.fixture
def live(make_db, tmp_path, redis_db) -> Iterator:
    made: list[Live] = []

    def build(partitions: int, rate: int, interval: float = 0.5, extra: str = "") -> Live:
        parts, central = partitions_and_central(make_db, partitions)
        for part in parts:
            part.execute("select pgq.set_queue_config('events', 'ticker_max_count', '1')")  # each round ticks
        watch_probes(HOST_DSN, central.name, "central_events")
        config = tmp_path / "live.ini"
        config.write_text(TEMPLATE.format(names=", ".join(part.name for part in parts), host=HOST_DSN,
                                          central=central.name, interval=interval, extra=extra, broker=redis_db.url))
        procs = installed_processes(config, tmp_path)
        arrivals = Arrivals(HOST_DSN, central.name)
        arrivals.start()
        load = Load([HOST_DSN] * len(parts), [part.name for part in parts], rate)
        made.append(Live(parts, central, config, procs, load, arrivals))
        return made[-1]

    yield build
    for built in made:
        built.load.stop()
        built.procs.stop()
        built.arrivals.stop()


def wait_for_first_sweep(live: Live) -> None:
    wait_until(lambda: live.sweep_times()[0] and " ready." in live.procs.log("worker"), 60, "worker and beat")


def moved_under_load(fan: Live, tag: str, rounds: int) -> ConnectionPeaks:
    """A worker -c 2 and beat move the steady load's rounds, every event once; qmover's
    connection peaks meanwhile."""
    peak = peaks(fan.central, fan.parts)
    try:
        fan.procs.worker("worker", 2)
        fan.procs.beat()
        wait_for_first_sweep(fan)
        fan.start_load(tag)
        fan.run_rounds(rounds)
        produced = fan.stop_and_drain()
    finally:
        peak.stop()
    fan.exactly_once(produced)
    return peak


@pytest.mark.alone
def test_under_a_steady_load_every_route_moves_within_two_intervals_on_bounded_connections(live):
    fan = live(30, rate=5)
    peak = moved_under_load(fan, "steady", 12)
    assert error_lines(fan.procs.logs()) == []

    # Each probe reached central before two whole intervals of sweeps had ended after its commit.
    ended, slices = fan.sweep_times()
    waits = {}
    for marker, committed in fan.load.commits.items():
        arrived = fan.arrivals.seen[marker]
        waits[marker] = sum(1 for at in ended if committed < at < arrived)
    worst = max(waits.values())
    print(f"{len(waits)} probes; sweeps between a probe's commit and its arrival: at most {worst} "
          f"({slices} sweeps an interval); peak connections: central {peak.central}, "
          f"busiest partition {peak.partition}")
    assert worst <= 2 * slices, sorted(waits.items(), key=lambda item: -item[1])[:5]
    assert peak.central <= 2 + 2  # worker processes + 2
    assert peak.partition <= 1 + 2  # beat's sweep + worker processes


def test_kill_9_of_the_worker_under_a_steady_load_loses_and_doubles_nothing(live):
    fan = live(10, rate=20)
    fan.procs.worker("worker", 2)
    fan.procs.beat()
    wait_for_first_sweep(fan)
    fan.start_load("kills")
    for _ in range(4):
        moved = fan.central_count()
        wait_until(lambda moved=moved: fan.central_count() >= moved + 200, 60, "moves under way", every=0.01)
        fan.procs.kill("worker")  # SIGKILL to the worker and its pool, mid-stream
        fan.procs.worker("worker", 2)
    fan.run_rounds(3)
    produced = fan.stop_and_drain()
    fan.exactly_once(produced)


def test_max_source_connections_caps_the_connections_to_a_source(make_db, tmp_path, redis_db):
    """Four routes out of one source database, four worker processes, tasks for
    every route sent at once again and again: the source sees beat's sweep and
    at most max_source_connections movers."""
    source, central = make_db(), make_db()
    central.create_queue("central_events")
    sections = []
    for n in range(4):
        source.create_queue(f"q{n}")
        sections.append(f"[r{n}]\nsrc_db = {source.dsn}\ndst_db = {central.dsn}\npgq_queue_name = q{n}\n"
                        f"dst_queue_name = central_events\nmove_interval = 0.2\nmax_source_connections = 1\n")
    config = tmp_path / "capped.ini"
    config.write_text("\n".join(sections) + f"\n[qmover]\nbroker_url = {redis_db.url}\n")
    procs = installed_processes(config, tmp_path)
    peak = peaks(central, [source])
    client = Celery(broker=redis_db.url)
    done = threading.Event()

    def send_each_route_at_once() -> None:
        while not done.wait(0.02):
            for n in range(4):
                client.send_task("qmover.move_next_batch", (f"r{n}",), queue="qmover", expires=1)

    sender = threading.Thread(target=send_each_route_at_once)
    try:
        procs.worker("worker", 4)
        procs.beat()
        sender.start()
        for tick in range(40):
            for n in range(4):
                source.produce_series(f"q{n}", 50, size=40, tag=f"t{tick}q{n}-")
                source.tick(f"q{n}")
        wait_until(lambda: central.value("select count(*) from pgq.event_1") >= 40 * 4 * 50, 120,
                   "every event in central")
    finally:
        done.set()
        if sender.is_alive():
            sender.join()
        client.close()
        peak.stop()
        log = procs.logs()  # before stopping: a stop while tasks run logs their pool processes' end
        procs.stop()
    assert central.value("select count(distinct ev_data) from pgq.event_1") == 40 * 4 * 50
    assert central.value("select count(*) from pgq.event_1") == 40 * 4 * 50
    assert error_lines(log) == []
    assert log.count("'busy': ['") > 0  # tasks did wait for the source's one place
    print(f"peak connections on the source: {peak.partition} (beat's sweep + 1 mover)")
    assert peak.partition <= 1 + 1


@pytest.mark.celery_release
def test_sweeps_run_in_beat_not_on_workers(live):
    """On every Celery release (scripts/test.sh runs this on each): beat's process is
    known by the beat_init signal, not by a header only 5.7 sends."""
    fan = live(6, rate=10)
    peak = moved_under_load(fan, "sweeps", 5)
    worker, beat = fan.procs.log("worker"), fan.procs.log("beat")
    version = re.search(r" \S+@\S+ v(\d+\.\d+\.\d+) ", worker)[1]
    print(f"celery {version}: {len(fan.sweep_times()[0])} sweeps in beat, none on the worker")
    assert version == celery_under_test()[0]
    assert "Task qmover.sweep[" not in worker  # none received, none run
    assert len(fan.sweep_times()[0]) >= 10
    assert peak.partition <= 1 + 2
    assert error_lines(worker + beat) == []
