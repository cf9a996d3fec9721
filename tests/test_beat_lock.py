"""Beat under a lock: celery-redbeat's scheduler, two beats, one of them active.

A shop that cannot lose its schedule runs a standby beat; RedBeatScheduler
lets only the beat holding its lock in Redis send (and so sweep), and a
standby takes the lock over when the holder stops extending it.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from beat_loop import BeatTicks
from celery_helpers import CELERY_PYTHON, Processes, error_lines, wait_until
from conftest import peaks

# What the README recommends: beat wakes at least every second, so the lock
# (5 x --max-interval) lapses 5 s after the active beat stopped extending it.
REDBEAT = ("-S", "redbeat.RedBeatScheduler", "--max-interval", "1")
LOCK_TIMEOUT = 5
ACQUIRED = "beat: Acquired lock"
SWEPT = re.compile(r"\[([\d-]+ [\d:,]+): INFO/MainProcess\] Task qmover.sweep\[\S+\] succeeded")


def sweeps(log: str) -> int:
    return len(SWEPT.findall(log))


def start_beats(procs: Processes, names: tuple[str, ...]) -> None:
    for name in names:
        procs.start(name, "beat", "-l", "info", *REDBEAT)


def active_beat(procs: Processes, names: tuple[str, ...]) -> str:
    wait_until(lambda: any(ACQUIRED in procs.log(name) for name in names), 30, "a beat to take the lock")
    [active] = [name for name in names if ACQUIRED in procs.log(name)]
    return active


class Producer(threading.Thread):
    """Events into every partition until stopped; beat's ticker closes the batches."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.produced, self.done = pipe, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.3):
            self.produced += self.pipe.produce(1, per_tick=5, tick=False)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.produced


@pytest.mark.celery_release
@pytest.mark.parametrize("app", ["qmover", "shop"])
def test_a_standby_beat_takes_over_sweeps_and_ticks_when_the_active_one_is_killed(pipeline, redis_db, app):
    """app: qmover's own app, or a shop's app that attach()es qmover's tasks and runs redbeat."""
    pipe = pipeline(4, extra="ticker = source")  # beat ticks the partitions too
    if app == "shop":
        pipe.procs = Processes(pipe.config, pipe.procs.logdir, cwd=Path(__file__).parent, app="shop_app",
                               env={"SHOP_BROKER_URL": redis_db.url, "SHOP_REDBEAT_URL": redis_db.url,
                                    "SHOP_QMOVER_CONFIG": str(pipe.config)})
    for part in pipe.parts:
        part.execute("select pgq.set_queue_config('events', 'ticker_max_lag', '0.2 seconds')")
    beats = ("beat_a", "beat_b")
    peak = peaks(pipe.central, pipe.parts)  # every beat's connections counted
    producer = Producer(pipe)
    try:
        pipe.procs.worker("worker", 2, *(["-Q", "celery,qmover"] if app == "shop" else []))
        start_beats(pipe.procs, beats)
        first = active_beat(pipe.procs, beats)
        [standby] = [name for name in beats if name != first]
        producer.start()
        wait_until(lambda: sweeps(pipe.procs.log(first)) >= 10, 30, "the active beat's sweeps")
        assert sweeps(pipe.procs.log(standby)) == 0  # the standby waits for the lock, sending nothing

        pipe.procs.kill(first)
        killed = time.monotonic()
        wait_until(lambda: ACQUIRED in pipe.procs.log(standby), LOCK_TIMEOUT + 10, "the standby to take the lock")
        took_over = time.monotonic() - killed
        wait_until(lambda: sweeps(pipe.procs.log(standby)) >= 10, 30, "the new active beat's sweeps")
        swept = time.monotonic() - killed
        produced = producer.stop()
        pipe.wait_for(produced)  # every event once, ticked and swept by both beats in turn
    finally:
        producer.done.set()
        peak.stop()
    logs = pipe.procs.logs()
    print(f"standby took the lock {took_over:.1f} s after the kill, 10 sweeps by {swept:.1f} s; "
          f"peak connections: central {peak.central}, busiest partition {peak.partition}")
    assert took_over <= LOCK_TIMEOUT + 2  # the lock lapses, then the standby's next try (every second)
    assert "qmover.tick_database" in pipe.procs.log(standby)
    assert peak.partition <= 1 + 2  # beat's sweep + two worker processes: the standby held none
    assert peak.central <= 2 + 2
    assert error_lines(logs) == []



def test_two_beats_without_a_lock_both_sweep_and_nothing_is_lost_or_doubled(pipeline):
    """Celery's own scheduler has no lock: a second beat is a second sweeper, not a standby.
    Moves stay exactly once (the route claim), at twice the sweeps' connections."""
    pipe = pipeline(4)
    beats = ("beat_a", "beat_b")
    peak = peaks(pipe.central, pipe.parts)
    try:
        pipe.procs.worker("worker", 2)
        for name in beats:
            pipe.procs.start(name, "beat", "-l", "info", "-s", str(pipe.procs.logdir / f"{name}-schedule"))
        produced = 0
        for _ in range(8):
            produced += pipe.produce(1)
            time.sleep(0.5)
        pipe.wait_for(produced)
    finally:
        peak.stop()
    print(f"sweeps: {[sweeps(pipe.procs.log(name)) for name in beats]}; busiest partition {peak.partition}")
    assert all(sweeps(pipe.procs.log(name)) > 0 for name in beats)
    assert peak.partition <= 2 + 2  # each beat's sweep, and the two worker processes
    assert error_lines(pipe.procs.logs()) == []


@pytest.mark.celery_release
@pytest.mark.parametrize("scheduler", ["steady", "redbeat"])
def test_beat_sleeps_until_an_entry_is_due_on_either_scheduler(redis_db, tmp_path, scheduler):
    """README: qmover's beat runs SteadyScheduler, and -S redbeat.RedBeatScheduler
    takes its place; neither spins before an entry is due (Celery's own does,
    tests/unit/test_schedule.py), counted in beat's loop under the Celery
    release being tested."""
    where = str(tmp_path / "steady.db") if scheduler == "steady" else redis_db.url
    script = Path(__file__).with_name("beat_loop.py")
    out = subprocess.run([CELERY_PYTHON, str(script), scheduler, where], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    counted = BeatTicks(**json.loads(out.splitlines()[-1]))
    print(f"{scheduler}: {counted}")
    assert counted.sleeps_until_due
