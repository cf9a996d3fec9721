"""`qmover bench --routes N --rate R --seconds S`: a live fan-in, qmover against skytools' queue_mover.

N partition databases produce without pause: every second each partition
commits R events (the first of them a probe) and calls the ticker, each
partition at its own moment of the second, as independent partitions would.
One route per partition moves them into a central queue.  The same load
runs through qmover (a Celery worker and beat) and through skytools'
queue_mover (one python-pgq SerialConsumer daemon per route,
qmover_lab/skytools_mover.py), one after the other, on throwaway clusters
(--servers K: the partitions spread over K of them, central on the first).
How ticks come (--ticks): "each", every round ticks right after its commit
(ticker_max_count 1); "pgqd", PgQ's own thresholds, as pgqd ticks with its
defaults: pgq.ticker() once a second, a tick once 3 s of events wait
(ticker_max_lag), an idle queue once a minute (ticker_idle_period).  For
each tool it prints:

- events not yet in central when the load stops, and the drain after;
- probe latency from the probe's transaction on its partition to its
  insert into central just before the mover's commit, by the server's clock
  (a trigger on central's event tables NOTIFYs each probe with it, so this
  process being slow to hear does not count): p50, p99, max, and the routes
  whose probes waited more than two move intervals; and from the tick that
  closed the probe's batch to its arrival (this process's clock);
- the machine's busy share during the load, the CPU of the mover's own
  processes, of PostgreSQL, of Redis and of this benchmark (the load), and
  the peak memory of the mover's processes, together and the largest one;
- peak connections: central, the busiest partition, the busiest server;
- how late the load generator was against its schedule (a late generator
  makes every other figure mean less);
- whether every event arrived exactly once;
- with --outage S: central refuses connections for S seconds at the start
  of the measured window (ALLOW_CONNECTIONS false, its sessions ended): the
  backlog when it is back, and how long the tool takes to catch up (at most
  1 s of load behind); the window's other figures are measured after that;
- with --idle S: once the load stopped and drained, the partitions only
  tick (as pgqd would); once PgQ's ticks have slowed to one a minute
  (--idle-settle, IDLE_SETTLE by default), the machine's busy share over
  S seconds with the tool running (and the CPU of its processes and of
  PostgreSQL), then over S seconds with it stopped (and PostgreSQL's);
- with --load-alone S, first: the load with no mover for S seconds (the
  queues have no consumer yet): the machine's busy share, PostgreSQL's CPU
  and the generator's lateness, the floor under every tool's figures.

The warm-up is not measured: a live fan-in runs all day, so both tools
start with their connections made.  It lasts --warmup seconds, and then until
the tool has caught up (less than two intervals of load not yet in central),
at most CATCH_UP_LIMIT seconds more; the table says when each caught up.
skytools runs one daemon per route; where that many do not fit in this
machine's memory it is left out, and the output says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection, cursor

from qmover.config import load_config
from qmover.ops import admin
from qmover_lab.connections import ConnectionPeaks
from qmover_lab.processes import cpu_seconds, machine_busy, pids_named, start_celery, stat_fields, wait_for_celery
from qmover_lab.processes import stop as stop_processes
from qmover_lab.sandbox import Cluster, drop_database, run_sql
from qmover_lab.sandbox import value as scalar

PREFIX = "qmover_live"
CENTRAL = f"{PREFIX}_central"
CATCH_UP_LIMIT = 60.0  # seconds of warm-up past --warmup a tool has to catch up
# Seconds from the load's stop until an idle queue ticks once a ticker_idle_period: PgQ's
# ticker doubles the time between ticks without events, from the last busy one (about
# ticker_max_lag) up to that period, 3 + 6 + 12 + 24 + 48 s with its defaults.
IDLE_SETTLE = 100.0
TEMPLATE_DB = f"{PREFIX}_template"
BENCH_APP = "bench load"  # this process's connections, left out of the counts (not 'qmover ...')
TOOLS = ("qmover", "skytools")
TICKS = ("each", "pgqd")
DAEMON_MB = 30  # what one skytools daemon takes, about (28 MB measured, peak RSS)
QMOVER_SETTINGS = """
[qmover]
broker_url = {broker}
{qmover_settings}
"""
# One section per server: its partitions, a route each.
QMOVER_ROUTES = """
[part_s{n}]
job_name = part_%(partition)s
partitions = {partitions}
src_db = {server} dbname={prefix}_p%(partition)s
dst_db = {central_server} dbname={central}
pgq_queue_name = events
dst_queue_name = qmover_events
move_interval = {interval}
{route_settings}
"""
SKYTOOLS_CONFIG = """
[queue_mover3]
job_name = sky_{partition}
src_db = {server} dbname={prefix}_p{partition}
dst_db = {central_server} dbname={central}
pgq_queue_name = events
dst_queue_name = skytools_events
loop_delay = {interval}
"""
# One round of a partition, one round trip: its events in one transaction
# (the first a probe, named by the marker), then the ticker, in a
# transaction of its own (it returns the new tick's id, or null without one).
ROUND = """
    begin;
    select count(pgq.insert_event('events', case when i = 1 then 'probe' else 'load' end,
                                  case when i = 1 then %(marker)s else %(marker)s || ':' || i || ':' || %(pad)s end,
                                  'public.orders', i::text, null, null))
      from generate_series(1, %(rate)s) i;
    commit;
    select pgq.ticker('events')
"""
TICK = "select pgq.ticker('events')"
PAD = "x" * 150
# Each probe row NOTIFYs at the commit that writes it into central.
PROBE_TRIGGER = """
    create or replace function probe_arrived() returns trigger language plpgsql as $$
    begin
        -- the latency by the server's clock: from the probe's transaction on its
        -- partition (ev_time, copied along) to its insert here, just before the commit
        perform pg_notify('probe', new.ev_data || ' ' || extract(epoch from clock_timestamp() - new.ev_time));
        return null;
    end $$
"""
# Every tool's connections (qmover's and skytools'), the benchmark's own left out.
CLIENTS = f"backend_type = 'client backend' and application_name <> '{BENCH_APP}'"
CONNECTIONS = f"select datname, count(*) from pg_stat_activity where {CLIENTS} group by datname"
TOOL_SESSIONS = f"select count(*) from pg_stat_activity where {CLIENTS}"
# Central refuses connections, and the tools' sessions there end (an outage, as a mover sees it).
CENTRAL_DOWN = (sql.SQL("alter database {} with allow_connections false").format(sql.Identifier(CENTRAL)),
                sql.SQL("select count(pg_terminate_backend(pid)) from pg_stat_activity where datname = {} and "
                        + CLIENTS).format(sql.Literal(CENTRAL)))
CENTRAL_UP = sql.SQL("alter database {} with allow_connections true").format(sql.Identifier(CENTRAL))


def connect(server: str, database: str) -> connection:
    conn = psycopg2.connect(f"{server} dbname={database} application_name='{BENCH_APP}'")
    conn.autocommit = True
    return conn


KTHREADD = 2  # the parent of the kernel's own threads


def unreaped(cur: cursor, postmaster: int) -> int:
    """The server's backends that ended and are not yet reaped by its postmaster (whose
    cutime then holds their CPU): exiting, a client's backend gone from pg_stat_activity,
    or zombies.  cur: a session of that server's."""
    cur.execute("select pid from pg_stat_activity")
    listed = {pid for (pid,) in cur.fetchall()}
    left = 0
    for pid in descendants(postmaster)[1:]:
        fields = stat_fields(pid)
        if fields is not None and (fields[0] == "Z" or (pid not in listed and _titled_as_client(pid))):
            left += 1
    return left


def _titled_as_client(pid: int) -> bool:
    """Whether a PostgreSQL process's title is a client backend's: "postgres: USER DB HOST(PORT) STATE"."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # reaped meanwhile
    return b"(" in title or b"[local]" in title


def descendants(pid: int) -> list[int]:
    """A process and every process under it (a worker's pool, PostgreSQL's backends)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += descendants(int(child))
    return found


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


class KernelThreads:
    """The CPU of the kernel's own threads (kworkers; on this VM kdamond) from
    now, counted thread by thread: a kworker that exits takes its seconds with
    it, and a plain sum at each end would then go down."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> dict[int, float]:
        return {pid: cpu_seconds([pid]) for pid in descendants(KTHREADD)[1:]}

    def seconds(self) -> float:
        """Their CPU since this sampler was made, over the threads alive at both ends."""
        now = self._sample()
        return sum(max(0.0, now[pid] - self.start[pid]) for pid in now if pid in self.start)


class Load:
    """The producers: each partition commits `rate` events and calls the ticker once a
    second, partition i at i/N of each second, spread over `threads` threads with a
    connection to each of their partitions.  While idle, the partitions only call
    the ticker, as pgqd would."""

    def __init__(self, servers: list[str], partitions: list[str], rate: int, threads: int = 8):
        self.servers, self.partitions, self.rate = servers, partitions, rate
        self.threads = max(1, min(threads, len(partitions)))
        self.commits: dict[str, float] = {}  # probe marker -> when its round's commit returned
        self.ticked: dict[int, list[tuple[int, float]]] = {}  # partition -> (round, when) of each tick it made
        self.lateness: list[float] = []  # seconds each round started after its moment
        self.produced = 0
        self.rounds = 0
        self.idle = False
        self._quiet: set[int] = set()  # threads whose rounds only tick now
        self.tag = ""
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self, tag: str) -> None:
        self.tag, self.origin, self.idle = tag, time.monotonic() + 0.5, False
        self._quiet.clear()
        self._done.clear()
        for n in range(self.threads):
            mine = list(range(n, len(self.partitions), self.threads))
            worker = threading.Thread(target=self._produce, args=(n, mine), daemon=True)
            worker.start()
            self._workers.append(worker)

    def _produce(self, thread: int, mine: list[int]) -> None:
        conns = {i: connect(self.servers[i], self.partitions[i]) for i in mine}
        try:
            second = 0
            while not self._done.is_set():
                for i in mine:
                    due = self.origin + second + i / len(self.partitions)
                    wait = due - time.monotonic()
                    if wait > 0 and self._done.wait(wait):
                        return
                    started = time.monotonic()
                    marker = f"{self.tag}:{i}:{second}"
                    idle = self.idle
                    if idle:
                        with self._lock:
                            self._quiet.add(thread)
                    with conns[i].cursor() as cur:
                        if idle:
                            cur.execute(TICK)
                        else:
                            cur.execute(ROUND, {"marker": marker, "rate": self.rate, "pad": PAD})
                        row = cur.fetchone()
                        ticked = row is not None and row[0] is not None
                    done = time.monotonic()
                    with self._lock:
                        if ticked:
                            self.ticked.setdefault(i, []).append((second, done))
                        if not idle:
                            self.commits[marker] = done
                            self.lateness.append(started - due)
                            self.produced += self.rate
                            self.rounds += 1
                second += 1
        finally:
            for conn in conns.values():
                conn.close()

    def quiet(self) -> None:
        """From now on the partitions only tick: returns once no round produces any more."""
        self.idle = True
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._quiet) == len(self._workers):
                    return
            time.sleep(0.05)
        raise SystemExit("qmover bench: the load generator did not stop producing within 10 s, so the events "
                         "it produced are not known; the machine is too busy for this load")

    def tick_of(self, marker: str) -> float | None:
        """When the tick that closed the probe's batch was made (the first of its partition's
        ticks from its round on: a round ticks after its commit)."""
        _, partition, second = marker.split(":")
        return next((when for tick_round, when in self.ticked.get(int(partition), [])
                     if tick_round >= int(second)), None)

    def snapshot(self) -> tuple[int, int, int]:
        """(events produced, rounds, lateness samples) so far."""
        with self._lock:
            return self.produced, self.rounds, len(self.lateness)

    def stop(self) -> None:
        self._done.set()
        for worker in self._workers:
            worker.join()
        self._workers.clear()


class Memory(threading.Thread):
    """The peak resident memory of a set of processes and their children, sampled every second."""

    def __init__(self, roots: list[int]):
        super().__init__(daemon=True)
        self.roots = roots
        self.total_mb = self.largest_mb = 0.0
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.wait(1.0):
            sizes = [rss_mb(pid) for root in self.roots for pid in descendants(root)]
            self.total_mb = max(self.total_mb, sum(sizes))
            self.largest_mb = max([self.largest_mb, *sizes])

    def stop(self) -> None:
        self._done.set()
        self.join()


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def watch_probes(server: str, database: str, queue: str) -> None:
    """Make each probe row written into the queue NOTIFY at its commit (see Arrivals)."""
    run_sql(server, database, PROBE_TRIGGER)
    pfx, tables = run_sql(server, database, sql.SQL(
        "select queue_data_pfx, queue_ntables from pgq.queue where queue_name = {}").format(sql.Literal(queue)))[0]
    schema, table = pfx.split(".")
    for n in range(tables):
        run_sql(server, database, sql.SQL(
            "create trigger probe after insert on {} for each row when (new.ev_type = 'probe')"
            " execute function probe_arrived()").format(sql.Identifier(schema, f"{table}_{n}")))


class Arrivals(threading.Thread):
    """LISTENs on a database whose queue has watch_probes(): when each probe was committed there."""

    def __init__(self, server: str, database: str = CENTRAL):
        super().__init__(daemon=True)
        self.conn = connect(server, database)
        with self.conn.cursor() as cur:
            cur.execute("listen probe")
        self.seen: dict[str, float] = {}  # probe marker -> when its notice came (this process's clock)
        self.latency: dict[str, float] = {}  # probe marker -> seconds from its partition to here (the server's)
        self.duplicates = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            if select.select([self.conn], [], [], 0.1)[0]:
                self.conn.poll()
                now = time.monotonic()
                for note in self.conn.notifies:
                    marker, _, latency = note.payload.partition(" ")
                    if marker in self.seen:
                        self.duplicates += 1
                    else:
                        self.seen[marker] = now
                        self.latency[marker] = float(latency)
                self.conn.notifies.clear()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.conn.close()


@dataclass
class Figures:
    """One tool's run."""

    tool: str
    produced_in_window: int = 0
    batches_in_window: int = 0
    behind_at_stop: int = 0
    behind_at_stop_s: float = 0.0  # the same, in seconds of load
    drain_s: float | None = None
    probes: int = 0
    probes_not_arrived: int = 0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    latency_max_s: float = 0.0
    after_tick_p50_s: float = 0.0  # from the tick that closed the probe's batch
    after_tick_p99_s: float = 0.0
    after_tick_max_s: float = 0.0
    routes_waiting_over_two_intervals: int = 0
    machine_busy_pct: float = 0.0
    mover_cpu_s: float = 0.0
    mover_cpu_ms_per_batch: float = 0.0
    postgres_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    load_cpu_s: float = 0.0
    kernel_cpu_s: float = 0.0  # the kernel's own threads: kworkers, and on this VM kdamond (DAMON's reclaim)
    peak_memory_mb: float = 0.0  # the mover's processes together
    peak_process_memory_mb: float = 0.0  # the largest of them
    peak_connections_central: int = 0
    peak_connections_partition: int = 0
    peak_connections_server: int = 0  # the busiest server: the tool's connections to the run's databases
    generator_late_rounds: int = 0  # rounds that started more than 0.1 s after their moment
    generator_max_late_s: float = 0.0
    caught_up_after_s: float | None = None  # from the load's start; None: not within the warm-up
    outage_backlog: int | None = None  # events not yet in central when it came back
    outage_catch_up_s: float | None = None  # from its return to at most 1 s of load behind
    idle_busy_pct: float | None = None  # the machine with only the ticker's load, the tool running
    idle_stopped_busy_pct: float | None = None  # the same, the tool stopped
    idle_cpu_s: dict[str, float] | None = None  # CPU of the tool's processes and of PostgreSQL; PostgreSQL's stopped
    exactly_once: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, servers: list[str], postmasters: list[int], args: argparse.Namespace):
        self.servers, self.postmasters, self.args = servers, postmasters, args
        self.central_server = servers[0]
        width = max(3, len(str(args.routes - 1)))
        self.names = [f"{n:0{width}d}" for n in range(args.routes)]
        self.partitions = [f"{PREFIX}_p{name}" for name in self.names]
        # partition n on server n * K // N: a block of partitions each
        self.server_of = [servers[n * len(servers) // args.routes] for n in range(args.routes)]
        self.workdir = Path(tempfile.mkdtemp(prefix="qmover-bench-live-"))
        self.runs = 0  # each run's events carry a tag of their own
        # seconds events wait for their tick: PgQ's ticker_max_lag when it ticks as pgqd does
        self.tick_lag = 3.0 if args.ticks == "pgqd" else 0.0

    def _on(self, server: str) -> list[str]:
        return [part for part, where in zip(self.partitions, self.server_of, strict=True) if where == server]

    # --- databases ---------------------------------------------------------
    def create(self) -> None:
        print(f"-- {len(self.partitions)} partition databases on {len(self.servers)} server(s) and a central one ...",
              flush=True)
        threads = [threading.Thread(target=self._create_partitions, args=(server,)) for server in self.servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        drop_database(self.central_server, CENTRAL)
        run_sql(self.central_server, "postgres", sql.SQL("create database {}").format(sql.Identifier(CENTRAL)))
        run_sql(self.central_server, CENTRAL, "create extension pgq")
        for tool in TOOLS:
            run_sql(self.central_server, CENTRAL,
                    sql.SQL("select pgq.create_queue({})").format(sql.Literal(f"{tool}_events")))
            watch_probes(self.central_server, CENTRAL, f"{tool}_events")
        self.qmover_config = self.workdir / "live.ini"
        sections = [QMOVER_ROUTES.format(
            n=n, server=server, central_server=self.central_server, prefix=PREFIX, central=CENTRAL,
            partitions=",".join(part.removeprefix(f"{PREFIX}_p") for part in self._on(server)),
            interval=self.args.interval, route_settings="\n".join(self.args.route_setting))
            for n, server in enumerate(self.servers) if self._on(server)]
        self.qmover_config.write_text(QMOVER_SETTINGS.format(
            broker=self.args.broker, qmover_settings="\n".join(self.args.qmover_setting)) + "".join(sections))

    def install_central(self) -> None:
        """pgq_ext on central, which skytools needs too: qmover's install of the first route makes
        it, and registers that route's consumer (after --load-alone, whose events no tool moves)."""
        admin.install(load_config(self.qmover_config).select()[0])

    def _create_partitions(self, server: str) -> None:
        mine = self._on(server)
        for name in (*mine, TEMPLATE_DB):
            drop_database(server, name)
        run_sql(server, "postgres", sql.SQL("create database {}").format(sql.Identifier(TEMPLATE_DB)))
        run_sql(server, TEMPLATE_DB, "create extension pgq", "select pgq.create_queue('events')")
        if self.args.ticks == "each":
            run_sql(server, TEMPLATE_DB, "select pgq.set_queue_config('events', 'ticker_max_count', '1')")
        for name in mine:
            run_sql(server, "postgres", sql.SQL("create database {} template {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)))

    def drop(self) -> None:
        for part, server in zip(self.partitions, self.server_of, strict=True):
            drop_database(server, part)
        drop_database(self.central_server, CENTRAL)

    def central_count(self, conn: connection, tool: str) -> int:
        return int(scalar(conn, sql.SQL("select count(*) from {}").format(self._table(tool))))

    def _table(self, tool: str) -> sql.Identifier:
        pfx = run_sql(self.central_server, CENTRAL, sql.SQL(
            "select queue_data_pfx from pgq.queue where queue_name = {}").format(sql.Literal(f"{tool}_events")))[0][0]
        return sql.Identifier(*pfx.split("."))

    # --- the movers -------------------------------------------------------------
    @contextmanager
    def movers(self, tool: str) -> Iterator[list[int]]:
        """The tool's processes, consumers registered and started; yields their root pids."""
        if tool == "qmover":
            routes = load_config(self.qmover_config).select()
            for route in routes:
                admin.install(route)
            logs = [self.workdir / "qmover-worker.log", self.workdir / "qmover-beat.log"]
            worker = start_celery(self.qmover_config, logs[0], "worker", "-l", "info", "--without-mingle",
                                  "--without-gossip", "-P", self.args.pool, "-c", str(self.args.concurrency),
                                  "-n", "live@%h", mode="w")
            beat = start_celery(self.qmover_config, logs[1], "beat", "-l", "info", "-s",
                                str(self.workdir / "beat-schedule"), mode="w")
            processes = [worker, beat]
            try:
                wait_for_celery(logs, workers=1)
                yield [worker.pid, beat.pid]
            finally:
                stop_processes(processes, timeout=30)
                for route in routes:
                    admin.unregister(route)
            return
        if importlib.util.find_spec("pgq") is None:
            raise SystemExit("qmover bench: skytools' mover needs python-pgq and skytools: install the test extras "
                             "(pip install -e '.[test]'), or leave skytools out with --tools qmover")
        daemons = []
        for name, part, server in zip(self.names, self.partitions, self.server_of, strict=True):
            run_sql(server, part, sql.SQL("select pgq.register_consumer('events', {})").format(
                sql.Literal(f"sky_{name}")))
            run_sql(self.central_server, CENTRAL, sql.SQL("select pgq_ext.set_last_tick({}, null::bigint)").format(
                sql.Literal(f"sky_{name}")))
            config = self.workdir / f"sky_{name}.ini"
            config.write_text(SKYTOOLS_CONFIG.format(partition=name, server=server, prefix=PREFIX,
                                                     central_server=self.central_server, central=CENTRAL,
                                                     interval=self.args.interval))
            log = (self.workdir / f"sky_{name}.log").open("w")
            daemons.append(subprocess.Popen([sys.executable, "-m", "qmover_lab.skytools_mover", "--loop", str(config)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                            start_new_session=True))
        try:
            self._wait_for_daemons(daemons)
            yield [daemon.pid for daemon in daemons]
        finally:
            stop_processes(daemons, timeout=30)
            for name, part, server in zip(self.names, self.partitions, self.server_of, strict=True):
                run_sql(server, part, sql.SQL("select pgq.unregister_consumer('events', {})").format(
                    sql.Literal(f"sky_{name}")))

    def _wait_for_daemons(self, daemons: list[subprocess.Popen]) -> None:
        """Until every daemon holds its source connection (Python starting 100 times takes a while)."""
        deadline = time.monotonic() + 300
        while True:
            on_parts = 0
            for server in self.servers:
                with closing(connect(server, "postgres")) as conn, conn.cursor() as cur:
                    cur.execute(CONNECTIONS)
                    on_parts += sum(count for name, count in cur.fetchall() if name and name.startswith(f"{PREFIX}_p"))
            if on_parts >= len(daemons):
                break
            dead = [daemon for daemon in daemons if daemon.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SystemExit(f"skytools' daemons did not start; see the logs in {self.workdir}")
            time.sleep(0.5)
        time.sleep(2)

    # --- one run ----------------------------------------------------------------
    def run_tool(self, tool: str) -> Figures:
        args = self.args
        print(f"-- {tool}: {len(self.partitions)} partitions x {args.rate} events/s, "
              f"{args.warmup:g} s warm-up, {args.seconds:g} s measured"
              + (f" after {args.outage:g} s of central down" if args.outage else "") + " ...", flush=True)
        figures = Figures(tool)
        peaks = [ConnectionPeaks(connect(server, "postgres"), CENTRAL, self._on(server), who=CLIENTS, every=1.0)
                 for server in self.servers]
        arrivals = Arrivals(self.central_server)
        arrivals.start()
        load = Load(self.server_of, self.partitions, args.rate)
        counter = connect(self.central_server, CENTRAL)
        memory = None
        try:
            with self.movers(tool) as roots:
                memory = Memory(roots)
                before_count = self.central_count(counter, tool)
                self.runs += 1
                tag = f"{tool}{self.runs}"
                load.start(tag)
                time.sleep(max(0.0, load.origin + args.warmup - time.monotonic()))
                figures.caught_up_after_s = self._catch_up(counter, tool, load, before_count)
                if args.outage:
                    self._outage(figures, counter, tool, load, before_count)
                produced0, _, late0 = load.snapshot()
                movers = [pid for root in roots for pid in descendants(root)]
                cpu0 = self._cpu(movers)
                kernel = KernelThreads()
                parts0 = self._parts(tool, roots)
                busy0 = machine_busy()
                started = time.monotonic()
                time.sleep(args.seconds)
                cpu1 = self._cpu([pid for root in roots for pid in descendants(root)] + movers)
                figures.kernel_cpu_s = round(kernel.seconds(), 1)
                parts1 = self._parts(tool, roots)
                busy1 = machine_busy()
                window_end = time.monotonic()
                produced1, _, late1 = load.snapshot()
                load.quiet()  # the partitions only tick from now on
                stopped = time.monotonic()
                produced = load.snapshot()[0]
                arrived = self.central_count(counter, tool) - before_count
                figures.behind_at_stop = produced - arrived
                figures.behind_at_stop_s = round(figures.behind_at_stop / (args.rate * len(self.partitions)), 2)
                figures.drain_s = self._drain(counter, tool, before_count + produced, stopped)
                time.sleep(1)  # a late duplicate would show now
                figures.exactly_once = self._exactly_once(counter, tool, tag, produced, arrivals, before_count)
                if args.idle:
                    time.sleep(max(0.0, stopped + args.idle_settle - time.monotonic()))
                    idle_movers = [pid for root in roots for pid in descendants(root)]
                    idle_cpu0, kernel = self._cpu(idle_movers), KernelThreads()
                    figures.idle_busy_pct = self._busy_over(args.idle)
                    idle_cpu1 = self._cpu(idle_movers)
                    figures.idle_cpu_s = {part: round(idle_cpu1[part] - idle_cpu0[part], 1)
                                          for part in ("mover", "postgres")}
                    figures.idle_cpu_s["kernel"] = round(kernel.seconds(), 1)
            if args.idle:
                self._until_tools_gone()
                stopped0, kernel = self._cpu([]), KernelThreads()
                figures.idle_stopped_busy_pct = self._busy_over(args.idle)
                stopped1 = self._cpu([])
                if figures.idle_cpu_s is not None:
                    figures.idle_cpu_s["postgres_stopped"] = round(stopped1["postgres"] - stopped0["postgres"], 1)
                    figures.idle_cpu_s["kernel_stopped"] = round(kernel.seconds(), 1)
        finally:
            load.stop()
            arrivals.stop()
            for peak in peaks:
                peak.stop()
            counter.close()
            if memory is not None:
                memory.stop()
        seconds = window_end - started
        figures.produced_in_window = produced1 - produced0
        figures.batches_in_window = sum(1 for ticks in load.ticked.values() for _, when in ticks
                                        if started <= when < window_end)  # a batch per tick, at most
        figures.machine_busy_pct = round(100 * (busy1[0] - busy0[0]) / (busy1[1] - busy0[1]), 1)
        for part in ("mover", "postgres", "redis", "load"):
            setattr(figures, f"{part}_cpu_s", round(cpu1[part] - cpu0[part], 1))
        figures.mover_cpu_ms_per_batch = round(1000 * figures.mover_cpu_s / max(1, figures.batches_in_window), 2)
        figures.peak_memory_mb = round(memory.total_mb) if memory else 0.0
        figures.peak_process_memory_mb = round(memory.largest_mb) if memory else 0.0
        figures.peak_connections_central = peaks[0].central
        figures.peak_connections_partition = max(peak.partition for peak in peaks)
        figures.peak_connections_server = max(peak.total for peak in peaks)
        late = load.lateness[late0:late1]
        figures.generator_late_rounds = sum(1 for value in late if value > 0.1)
        figures.generator_max_late_s = round(max(late, default=0.0), 3)
        self._latency(figures, load, arrivals, started, window_end)
        figures.extra["measured_s"] = round(seconds, 1)
        figures.extra["mover_cpu_s_by_process"] = {part: round(parts1[part] - parts0[part], 1) for part in parts1}
        return figures

    def load_alone(self, seconds: float) -> dict[str, float]:
        """The load for `seconds` with no mover running, after a few seconds to make its connections."""
        load = Load(self.server_of, self.partitions, self.args.rate)
        load.start("alone")
        try:
            time.sleep(max(0.0, load.origin + 5 - time.monotonic()))
            _, _, late0 = load.snapshot()
            postgres0 = self._cpu([])["postgres"]
            busy = self._busy_over(seconds)
            postgres = self._cpu([])["postgres"] - postgres0
            late = load.lateness[late0:]
        finally:
            load.stop()
        self._tick_all()  # the events no tool is to move end before the tick the consumers start from
        return {"seconds": seconds, "machine_busy_pct": busy, "postgres_cpu_s": round(postgres, 1),
                "generator_late_rounds": sum(1 for value in late if value > 0.1),
                "generator_max_late_s": round(max(late, default=0.0), 3)}

    def _tick_all(self) -> None:
        """A tick on every partition now, whatever PgQ's thresholds say (a thread per server)."""
        def tick(server: str) -> None:
            for part in self._on(server):
                run_sql(server, part, "select pgq.force_tick('events')", "select pgq.ticker('events')")

        threads = [threading.Thread(target=tick, args=(server,)) for server in self.servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _outage(self, figures: Figures, conn: connection, tool: str, load: Load, before_count: int) -> None:
        """Central refuses connections for --outage seconds; then the backlog, and the time to catch up."""
        for statement in CENTRAL_DOWN:
            run_sql(self.central_server, "postgres", statement)
        try:
            time.sleep(self.args.outage)
        finally:
            run_sql(self.central_server, "postgres", CENTRAL_UP)
        back = time.monotonic()
        figures.outage_backlog = load.snapshot()[0] - (self.central_count(conn, tool) - before_count)
        allowed = (1 + self.tick_lag) * self.args.rate * len(self.partitions)  # 1 s of load, and a tick's wait
        while load.snapshot()[0] - (self.central_count(conn, tool) - before_count) > allowed:
            if time.monotonic() - back > max(300.0, self.args.outage):
                return
            time.sleep(0.1)
        figures.outage_catch_up_s = round(time.monotonic() - back, 1)

    def _until_tools_gone(self, timeout: float = 60.0) -> None:
        """Until no tool's session is left on any server, and its postmaster has reaped
        every backend that ended.  A backend that ends as a window starts would
        otherwise bring its whole life's CPU into the window, through its
        postmaster's cutime, after the start had missed it."""
        deadline = time.monotonic() + timeout
        for server, postmaster in zip(self.servers, self.postmasters, strict=True):
            with closing(connect(server, "postgres")) as conn, conn.cursor() as cur:
                while time.monotonic() < deadline:
                    cur.execute(TOOL_SESSIONS)
                    (sessions,) = cur.fetchone() or (0,)
                    if not sessions and not unreaped(cur, postmaster):
                        break
                    time.sleep(0.2)

    @staticmethod
    def _busy_over(seconds: float) -> float:
        before = machine_busy()
        time.sleep(seconds)
        after = machine_busy()
        return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)

    def _catch_up(self, conn: connection, tool: str, load: Load, before_count: int) -> float | None:
        """Wait until less than two intervals of load (and a tick's wait) are not yet in central; when,
        from the load's start."""
        allowed = (2 * self.args.interval + self.tick_lag) * self.args.rate * len(self.partitions)
        deadline = time.monotonic() + CATCH_UP_LIMIT
        while time.monotonic() < deadline:
            if load.snapshot()[0] - (self.central_count(conn, tool) - before_count) < allowed:
                return round(time.monotonic() - load.origin, 1)
            time.sleep(0.5)
        return None

    def _cpu(self, movers: list[int]) -> dict[str, float]:
        postgres = [pid for postmaster in self.postmasters for pid in descendants(postmaster)]
        return {"mover": cpu_seconds(sorted(set(movers))), "postgres": cpu_seconds(postgres),
                "redis": cpu_seconds(pids_named("redis-server")), "load": self_cpu()}

    @staticmethod
    def _parts(tool: str, roots: list[int]) -> dict[str, float]:
        """The mover's CPU by kind of process: for qmover the worker's main process, its pool and beat."""
        if tool != "qmover":
            return {"daemons": cpu_seconds(roots)}
        worker, beat = roots
        return {"worker": cpu_seconds([worker]), "pool": cpu_seconds(descendants(worker)[1:]),
                "beat": cpu_seconds([beat])}

    def _drain(self, conn: connection, tool: str, total: int, stopped: float) -> float | None:
        deadline = time.monotonic() + 300
        while self.central_count(conn, tool) < total:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        return round(time.monotonic() - stopped, 2)

    def _exactly_once(self, conn: connection, tool: str, tag: str, produced: int, arrivals: Arrivals,
                      before_count: int) -> bool:
        """Each event of this run is unique by its data (its tag, partition, round
        and number): central holds each produced one once, and nothing else came in."""
        with conn.cursor() as cur:
            cur.execute(sql.SQL("select count(*), count(distinct ev_data) from {} where ev_data like %s").format(
                self._table(tool)), (f"{tag}:%",))
            count, distinct = cur.fetchone() or (0, 0)
        arrived = self.central_count(conn, tool) - before_count
        return count == distinct == produced == arrived and arrivals.duplicates == 0

    def _latency(self, figures: Figures, load: Load, arrivals: Arrivals, start: float, end: float) -> None:
        delays: list[float] = []
        after_tick: list[float] = []
        worst: dict[str, float] = {}
        for marker, committed in load.commits.items():
            if not start <= committed < end:
                continue
            figures.probes += 1
            delay = arrivals.latency.get(marker)
            if delay is None:
                figures.probes_not_arrived += 1
                continue
            delays.append(delay)
            ticked = load.tick_of(marker)
            if ticked is not None:
                after_tick.append(max(0.0, arrivals.seen[marker] - ticked))
                delay = after_tick[-1] if self.tick_lag else delay  # a tick's wait is not the mover's
            route = marker.split(":")[1]
            worst[route] = max(worst.get(route, 0.0), delay)
        for name, values in (("latency", delays), ("after_tick", after_tick)):
            values.sort()
            if values:
                setattr(figures, f"{name}_p50_s", round(statistics.median(values), 3))
                setattr(figures, f"{name}_p99_s", round(values[min(len(values) - 1, int(len(values) * 0.99))], 3))
                setattr(figures, f"{name}_max_s", round(values[-1], 3))
        figures.routes_waiting_over_two_intervals = sum(1 for value in worst.values()
                                                        if value > 2 * self.args.interval)


def table(results: list[Figures]) -> str:
    rows: list[tuple[str, Any]] = [
        ("events produced in the measured window", lambda f: f"{f.produced_in_window:,}"),
        ("events not yet in central when the load stops", lambda f: f"{f.behind_at_stop:,} ({f.behind_at_stop_s} s)"),
        ("drain after the load stopped (s)", lambda f: f.drain_s),
        ("probe latency p50 / p99 / max (s)",
         lambda f: f"{f.latency_p50_s} / {f.latency_p99_s} / {f.latency_max_s} ({f.probes:,} probes)"),
        ("from the tick that closed its batch, p50 / p99 / max (s)",
         lambda f: f"{f.after_tick_p50_s} / {f.after_tick_p99_s} / {f.after_tick_max_s}"),
        ("probes not arrived", lambda f: f.probes_not_arrived),
        ("routes with a probe waiting over two intervals", lambda f: f.routes_waiting_over_two_intervals),
        ("machine busy during the load", lambda f: f"{f.machine_busy_pct} %"),
        ("CPU of the mover's processes (s)", lambda f: f"{f.mover_cpu_s} ({f.mover_cpu_ms_per_batch} ms a batch)"),
        ("  by process", lambda f: ", ".join(f"{k} {v}" for k, v in f.extra["mover_cpu_s_by_process"].items())),
        ("peak memory of the mover's processes, together / the largest (MB)",
         lambda f: f"{f.peak_memory_mb:g} / {f.peak_process_memory_mb:g}"),
        ("CPU of PostgreSQL (s)", lambda f: f.postgres_cpu_s),
        ("CPU of Redis (s)", lambda f: f.redis_cpu_s),
        ("CPU of the load generator, this process (s)", lambda f: f.load_cpu_s),
        ("CPU of the kernel's own threads (s)", lambda f: f.kernel_cpu_s),
        ("peak connections: central / busiest partition / busiest server",
         lambda f: f"{f.peak_connections_central} / {f.peak_connections_partition} / {f.peak_connections_server}"),
        ("generator rounds late by > 0.1 s (max lateness)",
         lambda f: f"{f.generator_late_rounds} ({f.generator_max_late_s} s)"),
        ("caught up after the load started (s)",
         lambda f: f"{f.caught_up_after_s}" if f.caught_up_after_s is not None else "not in the warm-up"),
        ("every event exactly once", lambda f: "yes" if f.exactly_once else "NO"),
    ]
    if any(f.outage_backlog is not None for f in results):
        rows[1:1] = [("central down: backlog when it came back (events)", lambda f: f"{f.outage_backlog:,}"),
                     ("central down: caught up (<= 1 s of load behind, and a tick's wait) after its return (s)",
                      lambda f: f.outage_catch_up_s if f.outage_catch_up_s is not None else "not in 300 s")]
    if any(f.idle_busy_pct is not None for f in results):
        rows.append(("idle (only ticks): machine busy, the tool running / stopped",
                     lambda f: f"{f.idle_busy_pct} % / {f.idle_stopped_busy_pct} %"))
        rows.append(("idle: CPU of the tool's processes / PostgreSQL / the kernel's threads, running; "
                     "PostgreSQL / the kernel's threads, stopped (s)",
                     lambda f: (f"{f.idle_cpu_s['mover']} / {f.idle_cpu_s['postgres']} / {f.idle_cpu_s['kernel']}; "
                                f"{f.idle_cpu_s['postgres_stopped']} / {f.idle_cpu_s['kernel_stopped']}")
                     if f.idle_cpu_s else ""))
    lines = ["| | " + " | ".join(f.tool for f in results) + " |", "|---|" + "---:|" * len(results)]
    lines += [f"| {label} | " + " | ".join(str(value(f)) for f in results) + " |" for label, value in rows]
    return "\n".join(lines)


def ratios(results: list[Figures]) -> str:
    """qmover against skytools, per pair of runs."""
    pairs = list(zip([f for f in results if f.tool == "qmover"], [f for f in results if f.tool == "skytools"],
                     strict=False))
    lines = []
    for n, (q, s) in enumerate(pairs, 1):
        lines.append(f"run {n}, qmover / skytools: mover CPU {q.mover_cpu_s / max(s.mover_cpu_s, 0.1):.2f}, "
                     f"machine busy {q.machine_busy_pct / max(s.machine_busy_pct, 0.1):.2f}, "
                     f"PostgreSQL CPU {q.postgres_cpu_s / max(s.postgres_cpu_s, 0.1):.2f}, "
                     f"latency p99 {q.latency_p99_s / max(s.latency_p99_s, 0.001):.2f}")
    return "\n".join(lines)


def fits_in_memory(daemons: int) -> bool:
    """Whether that many skytools daemons fit in this machine's available memory, with a fifth to spare."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return daemons * DAEMON_MB < 0.8 * int(line.split()[1]) / 1024
    return True


def main(args: argparse.Namespace) -> int:
    tools = [tool.strip() for tool in args.tools.split(",")]
    unknown = [tool for tool in tools if tool not in TOOLS]
    if unknown:
        raise SystemExit(f"qmover bench: unknown tool {unknown[0]!r} in --tools; say qmover, skytools or both")
    if args.ticks not in TICKS:
        raise SystemExit(f"qmover bench: --ticks is 'each' or 'pgqd', not {args.ticks!r}")
    notes = []
    if "skytools" in tools and not fits_in_memory(args.routes):
        tools.remove("skytools")
        notes.append(f"skytools left out: {args.routes} daemons at about {DAEMON_MB} MB each do not fit in this "
                     f"machine's available memory")
        print(f"-- {notes[-1]}", flush=True)
    if args.warmup is None:
        args.warmup = max(10.0, args.routes / 10)
    if args.idle_settle is None:
        args.idle_settle = IDLE_SETTLE
    servers = max(1, min(args.servers, args.routes))
    per_server = -(-args.routes // servers)
    connections = per_server * (3 + args.concurrency) + 60
    print(f"-- {servers} throwaway PostgreSQL cluster(s) (max_connections {connections}) ...", flush=True)
    clusters: list[Cluster] = []
    try:
        for _ in range(servers):
            clusters.append(Cluster(settings={"max_connections": str(connections)}))
        postmasters = [int((cluster.data / "postmaster.pid").read_text().split()[0]) for cluster in clusters]
        bench = Bench([f"host=127.0.0.1 port={cluster.port} user=postgres" for cluster in clusters], postmasters,
                      args)
        bench.create()
        alone = bench.load_alone(args.load_alone) if args.load_alone else None
        bench.install_central()
        results = [bench.run_tool(tool) for _ in range(args.repeat) for tool in tools]
    finally:
        for cluster in clusters:
            cluster.close()
    ticks = ("a tick right after each round's commit" if args.ticks == "each" else
             "pgq.ticker() once a second with PgQ's defaults (a tick once 3 s of events wait)")
    print()
    print(f"{args.routes} partitions on {servers} server(s) x {args.rate} events/s "
          f"({args.routes * args.rate:,} events/s), {ticks}; move_interval / loop_delay {args.interval:g} s, "
          f"qmover: one worker -P {args.pool} -c {args.concurrency} and beat; {args.seconds:g} s measured after "
          f"at least {args.warmup:g} s of warm-up and until caught up (at most {CATCH_UP_LIMIT:g} s more)"
          + (f", after central was down {args.outage:g} s and the tool caught up" if args.outage else ""))
    print(table(results))
    if alone is not None:
        print(f"the load alone, no mover ({alone['seconds']:g} s before the tools): machine busy "
              f"{alone['machine_busy_pct']} %, PostgreSQL CPU {alone['postgres_cpu_s']} s, generator rounds late by "
              f"> 0.1 s {alone['generator_late_rounds']} (max {alone['generator_max_late_s']} s)")
    if "qmover" in tools and "skytools" in tools:
        print(ratios(results))
    if any(f.generator_late_rounds for f in results):
        notes.append("the load generator fell behind its schedule in some rounds; those runs carried less than "
                     "the load asked for, and their figures mean less")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps({"routes": args.routes, "rate": args.rate, "seconds": args.seconds,
                                         "warmup": args.warmup, "interval": args.interval,
                                         "concurrency": args.concurrency, "pool": args.pool, "servers": servers,
                                         "ticks": args.ticks,
                                         "outage": args.outage, "idle": args.idle, "notes": notes,
                                         "route_settings": args.route_setting, "load_alone": alone,
                                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "results": [asdict(f) for f in results]}, indent=2))
        print(f"results written to {args.json}")
    print(f"logs in {bench.workdir}")
    return 0
