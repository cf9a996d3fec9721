"""Beat's loop over a scheduler, counted: whether it sleeps until an entry is due.

Imported by the unit tier (it needs only Celery), and run as a script by
tests/test_beat_lock.py under each Celery release the suite covers:

    python tests/beat_loop.py steady SCHEDULE_FILE
    python tests/beat_loop.py redbeat REDIS_URL

prints the counts as one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from celery import Celery

SCHEDULE = {"often": {"task": "ticks.noop", "schedule": 0.25}}


@dataclass
class BeatTicks:
    """What beat's loop did over a scheduler: ticks asked, entries sent, and
    spins, the ticks that neither sent an entry nor let beat sleep."""

    ticks: int = 0
    runs: int = 0
    spins: int = 0

    @property
    def sleeps_until_due(self) -> bool:
        """No spin, and a few ticks per entry sent (an entry sent, then a sleep)."""
        return self.runs >= 2 and self.spins == 0 and self.ticks <= 4 * self.runs


def beat_app(**settings: object) -> Celery:
    """An app whose one entry is due every 0.25 s, on an in-memory broker."""
    app = Celery("ticks", broker="memory://", set_as_current=False)
    app.conf.update(beat_schedule=SCHEDULE, **settings)
    return app


def beat_ticks(scheduler, seconds: float = 2.0) -> BeatTicks:
    """Run beat's loop (celery.beat.Service.start's) over scheduler for seconds."""
    counted = BeatTicks()
    send = scheduler.apply_async

    def sent(*args, **kwargs):
        counted.runs += 1
        return send(*args, **kwargs)

    scheduler.apply_async = sent
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runs = counted.runs
        counted.ticks += 1
        interval = scheduler.tick()
        if interval and interval > 0:
            time.sleep(interval)
        elif counted.runs == runs:
            counted.spins += 1
    scheduler.close()
    return counted


def steady(schedule_file: str) -> BeatTicks:
    """qmover's SteadyScheduler, as its app sets it."""
    from qmover.tasks.schedule import SteadyScheduler

    return beat_ticks(SteadyScheduler(app=beat_app(), schedule_filename=schedule_file))


def redbeat(redis_url: str) -> BeatTicks:
    """celery-redbeat's scheduler, its lock taken as its beat_init handler takes it."""
    from redbeat import RedBeatScheduler
    from redbeat.schedulers import acquire_distributed_beat_lock

    scheduler = RedBeatScheduler(app=beat_app(redbeat_redis_url=redis_url, beat_max_loop_interval=1))
    acquire_distributed_beat_lock(SimpleNamespace(scheduler=scheduler))
    if scheduler.lock is None:
        raise SystemExit("redbeat did not take its lock")
    return beat_ticks(scheduler)


if __name__ == "__main__":
    which, where = sys.argv[1:3]
    counted = {"steady": steady, "redbeat": redbeat}[which](where)
    print(json.dumps(asdict(counted)))
