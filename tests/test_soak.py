"""The soak: producers, Celery workers and beat under a schedule of faults.

Two source queues (two databases of one throwaway cluster) feed one target
queue in another throwaway cluster, through Redis of its own.  While the
producers insert, the test kills workers, crashes and restarts both clusters
and Redis, and lets four movers work one route at once.  When all is
drained, the target must hold exactly the source's events and every route's
two positions must agree.

Size: --soak-events (default 40,000, about two minutes); the README's full
run is --soak-events 500000.  -s shows nothing more: the figures are always
printed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from qmover_lab.connections import QMOVER

from celery_helpers import EXITS_ON_REDIS_LOSS, Processes, celery_under_test, moves_in, wait_until
from conftest import run_qmover
from servers import Cluster, RedisServer

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3 * 3600)]

ROUTES = ("part0", "part1")
SRC_QUEUE, DST_QUEUE, TARGET_DB = "events", "central", "central"
MIN_WORKER_KILLS = 10
MIN_WINDOW, RATE = 60.0, 1500.0  # seconds of production and faults at least; events/s from all producers
STEP = 0.1  # a producer commits a chunk of events, then sleeps STEP seconds

ROUTE = """
[{name}]
src_db = {src}
dst_db = {dst}
pgq_queue_name = events
dst_queue_name = central
move_interval = 0.5
ticker = source
ticker_interval = 0.5
loop_delay = 0.1
"""

# Every event is unique (producer, chunk, row), and some carry what COPY must escape.
INSERT_CHUNK = """
select count(pgq.insert_event('events', 'type_' || (i %% 5),
    %(tag)s || ':' || %(chunk)s || ':' || i || case when i %% 7 = 0 then E'\\t\\n\\\\ é ''"' else '' end
        || repeat('x', 80),
    'public.t' || (i %% 3), null, %(chunk)s::text, case when i %% 2 = 0 then 'even' end))
from generate_series(1, %(rows)s) i
"""
HASHED = sql.SQL("select md5(row(ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time)::text)"
                 " from {}")


class Producer(threading.Thread):
    """Inserts its quota over the window in small transactions, as an
    application would, reconnecting through source restarts and catching up
    after them, so that production ends with the window."""

    def __init__(self, cluster: Cluster, dbname: str, quota: int, window: float):
        super().__init__(daemon=True)
        self.dsn = cluster.dsn(dbname)
        self.tag = dbname
        self.quota = quota
        self.window = window
        self.committed = 0
        self.reconnects = 0
        self.crashed: Exception | None = None

    def run(self) -> None:
        try:
            self._produce()
        except Exception as exc:  # reported by the test, which would otherwise wait for a drain
            self.crashed = exc

    def _produce(self) -> None:
        conn = None
        chunk = 0
        started = time.monotonic()
        while self.committed < self.quota:
            chunk += 1
            due = self.quota * min(1.0, (time.monotonic() - started + STEP) / self.window)
            rows = max(1, min(int(due) - self.committed, self.quota - self.committed))
            try:
                conn = conn or psycopg2.connect(self.dsn, connect_timeout=5)
                with conn.cursor() as cur:
                    cur.execute(INSERT_CHUNK, {"tag": self.tag, "chunk": chunk, "rows": rows})
                conn.commit()
                self.committed += rows  # a commit lost with its connection undercounts: the tables are the truth
            except psycopg2.Error:
                self.reconnects += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.3)
            time.sleep(STEP)
        if conn is not None:
            conn.close()


@dataclass
class Soak:
    source: Cluster
    target: Cluster
    redis: RedisServer
    config: Path
    procs: Processes
    logdir: Path
    faults: Counter = field(default_factory=Counter)
    kills_in_transaction: int = 0  # kills sent right after a mover's target transaction was seen open
    movers: list[subprocess.Popen] = field(default_factory=list)
    worker_exits: int = 0  # times the worker exited on its own and was started again

    # --- faults -------------------------------------------------------------

    def supervise(self) -> None:
        """Start the worker again if it exited on its own, as systemd or compose's
        `restart: unless-stopped` would (see EXITS_ON_REDIS_LOSS)."""
        if self.procs.exited("worker"):
            self.worker_exits += 1
            self.procs.worker(concurrency=2)

    def sleep_until(self, moment: float) -> None:
        while True:
            self.supervise()
            if time.monotonic() >= moment:
                return
            time.sleep(min(0.5, moment - time.monotonic()))

    def kill_worker(self) -> None:
        self.procs.kill("worker")
        self.procs.worker(concurrency=2)
        self.faults["worker SIGKILL"] += 1

    def kill_worker_mid_batch(self) -> None:
        """Wait (up to 10 s) for a mover's target transaction to be open, then kill.

        A batch is a few milliseconds of a mostly idle worker's time: kills
        at random moments alone would seldom cut one.
        """
        conn = self.target.connect(TARGET_DB)
        deadline = time.monotonic() + 10
        try:
            with conn.cursor() as cur:
                while time.monotonic() < deadline:
                    cur.execute("select count(*) from pg_stat_activity"
                                f" where {QMOVER} and xact_start is not null")
                    if cur.fetchone()[0]:
                        self.kills_in_transaction += 1
                        break
        finally:
            conn.close()
        self.kill_worker()

    def restart_target(self, mode: str) -> None:
        self.target.restart(mode, down=random.uniform(0.5, 3))
        self.faults[f"target cluster restart ({mode})"] += 1

    def restart_source(self) -> None:
        self.source.restart("fast", down=random.uniform(0.5, 3))
        self.faults["source cluster restart (fast)"] += 1

    def restart_redis(self) -> None:
        self.redis.restart(down=random.uniform(0.5, 3))
        self.faults["redis restart (SIGKILL)"] += 1

    def start_movers(self) -> None:
        """Three `qmover run` loops on part0 beside the Celery worker: four movers."""
        for n in range(3):
            log = (self.logdir / f"runner{n}.log").open("a")
            self.movers.append(subprocess.Popen(
                [sys.executable, "-m", "qmover", "run", "--route", ROUTES[0], str(self.config)],
                stdout=log, stderr=subprocess.STDOUT))
        self.faults["4 concurrent movers on part0"] += 1

    def stop_movers(self) -> None:
        for mover in self.movers:
            mover.send_signal(signal.SIGTERM)
        for mover in self.movers:
            mover.wait(60)
        self.movers.clear()

    # --- what the queues hold -----------------------------------------------

    @staticmethod
    def _rows(cluster: Cluster, dbname: str, queue: str, query: sql.Composable) -> list[tuple]:
        """query with {} as the queue's event table (PgQ's own name, from pgq.queue)."""
        conn = cluster.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute("set timezone = 'UTC'")
                cur.execute("select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))
                table = sql.Identifier(*cur.fetchone()[0].split("."))
                cur.execute(query.format(table))
                return cur.fetchall()
        finally:
            conn.close()

    def _hashes(self, cluster: Cluster, dbname: str, queue: str) -> list[str]:
        return [row[0] for row in self._rows(cluster, dbname, queue, HASHED)]

    def source_hashes(self) -> Counter:
        return Counter(h for name in ROUTES for h in self._hashes(self.source, name, SRC_QUEUE))

    def target_hashes(self) -> Counter:
        return Counter(self._hashes(self.target, TARGET_DB, DST_QUEUE))

    def counts(self) -> tuple[int, int]:
        """(events in the source queues, events in the target queue); (-1, -1) while a server is down."""
        count = sql.SQL("select count(*) from {}")
        try:
            source = sum(self._rows(self.source, name, SRC_QUEUE, count)[0][0] for name in ROUTES)
            target = self._rows(self.target, TARGET_DB, DST_QUEUE, count)[0][0]
        except psycopg2.Error:
            return -1, -1
        return source, target

    def drained(self) -> bool:
        source, target = self.counts()
        return source == target > 0

    def stuck_report(self) -> str:
        """What a drain that never ends leaves to read: counts, positions, the
        movers' sessions on the target, and the last warnings of beat and worker."""
        lines = [f"events (source, target): {self.counts()}"]
        try:
            lines.append(f"positions (source tick, target tick): {self.positions()}")
            for name in ROUTES:
                lines.append(f"{name} consumer: " + repr(self.source.execute(
                    name, "select last_tick, current_batch, lag, pending_events"
                    " from pgq.get_consumer_info(%s, %s)", (SRC_QUEUE, name))))
            lines.append("target sessions: " + repr(self.target.execute(
                TARGET_DB, "select application_name, state, xact_start is not null, wait_event"
                " from pg_stat_activity where application_name like 'qmover%'")))
        except psycopg2.Error as exc:
            lines.append(f"(a server did not answer: {exc})")
        for name in ("beat", "worker"):
            logged = self.procs.log(name).splitlines()
            noted = [line for line in logged if "WARNING" in line or "ERROR" in line or "Traceback" in line]
            lines += [f"{name} log, last warnings:"] + [line[:300] for line in noted[-15:]]
            lines += [f"{name} log, last lines:"] + [line[:300] for line in logged[-8:]]
        return "\n".join(lines)

    def positions(self) -> dict[str, tuple[int, int]]:
        """route: (tick the source finished, tick pgq_ext holds on the target)."""
        found = {}
        for name in ROUTES:
            source = self.source.execute(name, "select last_tick from pgq.get_consumer_info(%s, %s)",
                                         (SRC_QUEUE, name))[0][0]
            target = self.target.execute(TARGET_DB, "select pgq_ext.get_last_tick(%s)", (name,))[0][0]
            found[name] = (source, target)
        return found


@pytest.fixture
def soak(tmp_path):
    source, target, broker = Cluster(), Cluster(), RedisServer()
    config, logdir = tmp_path / "soak.ini", tmp_path / "logs"
    made = Soak(source, target, broker, config, Processes(config, logdir), logdir)
    try:
        for name in ROUTES:
            source.execute("postgres", f"create database {name}")
            source.execute(name, "create extension pgq")
            source.execute(name, "select pgq.create_queue(%s)", (SRC_QUEUE,))
            # smaller batches than PgQ's default 500 events: more batches for the faults to cut
            source.execute(name, "select pgq.set_queue_config(%s, 'ticker_max_count', '200')", (SRC_QUEUE,))
        target.execute("postgres", f"create database {TARGET_DB}")
        target.execute(TARGET_DB, "create extension pgq")
        target.execute(TARGET_DB, "select pgq.create_queue(%s)", (DST_QUEUE,))
        made.config.write_text("".join(ROUTE.format(name=name, src=source.dsn(name), dst=target.dsn(TARGET_DB))
                                       for name in ROUTES) + f"\n[qmover]\nbroker_url = {broker.url}\n")
        run_qmover("install", str(made.config), check=True)
        logdir.mkdir()
        yield made
    finally:
        made.procs.stop()
        made.stop_movers()
        if logdir.exists():
            shutil.copy(source.logfile, logdir / "source-postgres.log")
            shutil.copy(target.logfile, logdir / "target-postgres.log")
        broker.close()
        target.close()
        source.close()


def schedule(soak: Soak, window: float) -> list[tuple[float, str, Callable[[], None]]]:
    """The faults at random moments of the window, the concurrent movers for a
    sixth of it, and the target's crash (immediate stop) last, as production
    ends: the drain that follows starts from the worst fault."""
    kills = max(MIN_WORKER_KILLS, int(window / 15))
    faults: list[tuple[str, Callable[[], None]]] = [
        ("worker SIGKILL", soak.kill_worker if n % 2 else soak.kill_worker_mid_batch) for n in range(kills)] + [
        ("target restart fast", lambda: soak.restart_target("fast")),
        ("source restart", soak.restart_source),
        ("redis restart", soak.restart_redis),
    ]
    timed = [(random.uniform(0.05, 0.9) * window, name, act) for name, act in faults]
    movers_at = random.uniform(0.05, 0.7) * window
    timed += [(movers_at, "movers start", soak.start_movers),
              (movers_at + window / 6, "movers stop", soak.stop_movers),
              (random.uniform(0.95, 1.0) * window, "target restart immediate",
               lambda: soak.restart_target("immediate"))]
    return sorted(timed, key=lambda entry: entry[0])


def test_soak(soak, request, capsys):
    events = request.config.getoption("--soak-events")
    seed = int(os.environ.get("QMOVER_SOAK_SEED", time.time_ns() % 10**6))
    random.seed(seed)
    window = max(MIN_WINDOW, events / RATE)
    producers = [Producer(soak.source, name, events // len(ROUTES), window) for name in ROUTES]
    soak.procs.worker(concurrency=2)
    soak.procs.beat()

    started = time.monotonic()
    for producer in producers:
        producer.start()
    for at, _name, act in schedule(soak, window):
        soak.sleep_until(started + at)
        act()
    last_fault = time.monotonic()
    for producer in producers:
        while producer.is_alive():
            soak.supervise()
            producer.join(0.5)
        assert producer.crashed is None, f"producer {producer.tag} crashed: {producer.crashed!r}"
    produced = time.monotonic()

    try:
        wait_until(lambda: soak.supervise() or soak.drained(), 600, "the target to hold every source event",
                   every=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (seed {seed})\n{soak.stuck_report()}") from None
    drained = time.monotonic()
    wait_until(lambda: all(s == t for s, t in soak.positions().values()), 60, "both positions of every route")
    soak.procs.stop()

    source, target = soak.source_hashes(), soak.target_hashes()
    duplicates = sum((target - source).values())
    lost = sum((source - target).values())
    positions = soak.positions()
    logs = soak.procs.logs()
    results = moves_in(logs)  # of the tasks that ended: a killed worker's batches are not in them
    figures = [
        f"soak: seed {seed}, {events:,} events wanted from {len(ROUTES)} producers over {window:.0f} s",
        f"  events: source {sum(source.values()):,}, target {sum(target.values()):,}, "
        f"duplicates {duplicates}, lost {lost}",
        "  faults: " + ", ".join(f"{kind} {count}" for kind, count in sorted(soak.faults.items())),
        f"  batches moved by tasks that ended {sum(r['batches'] for r in results):,} "
        f"({sum(r['events'] for r in results):,} events); kills sent while a target "
        f"transaction was open {soak.kills_in_transaction}; batches found already on the target "
        f"(after a kill, or by a concurrent mover) {sum(r['skipped'] for r in results)}; "
        f"producer reconnects {sum(p.reconnects for p in producers)}; worker exits on its own (started again, "
        f"as a supervisor would) {soak.worker_exits}",
        f"  drain: {drained - last_fault:.1f} s after the last fault, {drained - produced:.1f} s after the "
        f"producers stopped",
        "  positions (source tick, target tick): " + ", ".join(f"{name} {pos}" for name, pos in positions.items()),
    ]
    with capsys.disabled():
        print("\n" + "\n".join(figures))

    assert duplicates == 0 and lost == 0
    if soak.worker_exits:  # only the Celery releases known to exit when Redis drops
        assert celery_under_test()[0] in EXITS_ON_REDIS_LOSS, soak.worker_exits
        assert logs.count("Unrecoverable error: AttributeError") == soak.worker_exits
    assert sum(source.values()) >= events
    assert all(s == t for s, t in positions.values()), positions
    assert soak.faults["worker SIGKILL"] >= MIN_WORKER_KILLS and len(soak.faults) == 6, soak.faults
