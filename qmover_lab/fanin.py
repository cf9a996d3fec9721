"""`qmover bench --routes N`: a fan-in of N partition databases into one central queue.

It makes N partition databases (1,000 events each), one central database,
and one more source database that carries the same N x 1,000 events through
a single route, then runs a real Celery beat and worker(s) twice: one worker
with two pool processes, and two workers of one process started separately.
For each it measures:

- drain: all partitions ticked at once, until central holds every event;
  then the same events through the one route (the median of three runs each);
- connections qmover holds (pg_stat_activity, application_name 'qmover ...'),
  at their peak on the central database and on the whole server;
- CPU with nothing to move, for the machine and per process (beat, workers,
  PostgreSQL, Redis, and RabbitMQ, which this machine runs for the tests
  though the benchmark does not use it), and the memory of beat and workers;
- latency: partitions ticked at random, each second, until their event is
  in central (p50, p99, max);
- a status scrape of every route (admin.statuses), cold and with kept
  connections (as `qmover metrics` keeps them);
- the machine while only `select 1` goes to every partition once a second
  (the floor of any once-a-second polling);
- the server CPU of one move per partition, in this process, on source
  connections opened for it and on kept ones: what the connection bound
  costs a move.
Every database it made is dropped at the end.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import tempfile
import threading
import time
from contextlib import closing
from functools import lru_cache
from pathlib import Path
from typing import Any

from psycopg2 import sql

from qmover.config import load_config
from qmover.ops import admin
from qmover.pg.connector import Connector
from qmover.protocol.mover import Mover
from qmover_lab.connections import ConnectionPeaks
from qmover_lab.processes import (
    cpu_seconds,
    machine_busy,
    moves_in,
    pids_named,
    pool_children,
    start_celery,
    wait_for_celery,
)
from qmover_lab.processes import stop as stop_celery
from qmover_lab.sandbox import Cluster, connect, drop_database, recreate_database, run_sql
from qmover_lab.sandbox import value as scalar

PREFIX = "qmover_fanin"
PER_PARTITION = 1000
INTERVAL = 1.0
DRAINS = 3
CONFIG = """
[qmover]
broker_url = {broker}

[part]
partitions = {partitions}
src_db = {server} dbname={prefix}_p%(partition)s
dst_db = {server} dbname={prefix}_central
pgq_queue_name = events
dst_queue_name = central_events
move_interval = {interval}

[one]
src_db = {server} dbname={prefix}_one
dst_db = {server} dbname={prefix}_central
pgq_queue_name = events
dst_queue_name = one_events
move_interval = {interval}
"""
PRODUCE = ("select count(pgq.insert_event('events', 'order', %s || i || ':' || repeat('x', 120),"
           " 'public.orders', i::text, null, null)) from generate_series(1, %s) i")
# force_tick marks the queue as due, ticker then ticks it (in a statement of its own).
TICK_NOW = "select pgq.force_tick('events'); select pgq.ticker('events')"
def family(pid: int) -> list[int]:
    """A process and its children (a worker's pool)."""
    return [pid, *pool_children(pid)]


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


@lru_cache(maxsize=8)
def queue_table(server: str, queue: str) -> sql.Identifier:
    """A central queue's event table (its parent: every rotation's rows)."""
    table = run_sql(server, f"{PREFIX}_central", sql.SQL(
        "select queue_data_pfx from pgq.queue where queue_name = {}").format(sql.Literal(queue)))[0][0]
    return sql.Identifier(*table.split("."))


class Central:
    """Counts the events in a central queue over one kept connection: a new
    connection per poll would cost the server more than the moves it watches."""

    def __init__(self, server: str, queue: str):
        self.conn = connect(server, f"{PREFIX}_central")
        self.query = sql.SQL("select count(*) from {}").format(queue_table(server, queue))

    def count(self) -> int:
        return int(scalar(self.conn, self.query))

    def wait_for(self, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"the central queue never reached {count} events")
            time.sleep(0.05)


def produce(server: str, database: str, tag: str, count: int, tick: bool = False) -> None:
    """count events into a database's queue, ticked at once when tick is set."""
    with closing(connect(server, database)) as conn, conn.cursor() as cur:
        cur.execute(PRODUCE, (f"{tag}-", count))
        if tick:
            cur.execute(TICK_NOW)


def drain(server: str, databases: list[str], per_database: int, queue: str, tag: str) -> float:
    """Load events untouched by any tick, tick every database at once; seconds until central holds them."""
    central = Central(server, queue)
    before = central.count()
    for database in databases:
        produce(server, database, tag, per_database)
    conns = [connect(server, database) for database in databases]
    try:
        started = time.monotonic()
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute(TICK_NOW)
        central.wait_for(before + per_database * len(databases))
        return time.monotonic() - started
    finally:
        for conn in [*conns, central.conn]:
            conn.close()


def latency(server: str, partitions: list[str], seconds: float) -> dict[str, float]:
    """Each second, one event into each of ten random partitions, then a tick there (as pgqd
    ticks); the time from each tick to its event being in central."""
    central = connect(server, f"{PREFIX}_central")
    table = queue_table(server, "central_events")
    query = sql.SQL("select ev_id, ev_type, ev_data from {} where ev_id > %s").format(table)
    last_id = sql.SQL("select coalesce(max(ev_id), 0) from {}").format(table)
    ticked: dict[str, float] = {}
    delays: list[float] = []
    done = threading.Event()

    def watch() -> None:
        with central.cursor() as cur:
            last = scalar(central, last_id)
            while not done.wait(0.01):
                cur.execute(query, (last,))
                now = time.monotonic()
                for ev_id, ev_type, marker in cur.fetchall():
                    last = max(last, ev_id)
                    if ev_type == "latency" and marker in ticked:
                        delays.append(now - ticked[marker])

    watcher = threading.Thread(target=watch)
    watcher.start()
    conns = {name: connect(server, name) for name in partitions}
    rng = random.Random(7)
    try:
        ended = time.monotonic() + seconds
        n = 0
        while time.monotonic() < ended:
            second = time.monotonic()
            for offset, name in sorted(zip((rng.random() for _ in partitions),
                                           rng.sample(partitions, min(10, len(partitions))), strict=False)):
                time.sleep(max(0.0, second + offset - time.monotonic()))  # at random moments of the second
                marker = f"lat-{n}"
                n += 1
                with conns[name].cursor() as cur:
                    cur.execute("select pgq.insert_event('events', 'latency', %s)", (marker,))
                    cur.execute(TICK_NOW)
                ticked[marker] = time.monotonic()
            time.sleep(max(0.0, second + 1.0 - time.monotonic()))
        deadline = time.monotonic() + 30  # the last ticks arrive; what has not by then counts as not arrived
        while len(delays) < len(ticked) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        watcher.join()
        for conn in conns.values():
            conn.close()
        central.close()
    delays.sort()
    lost = len(ticked) - len(delays)
    return {"events": len(delays), "not_arrived": lost, "p50_s": delays[len(delays) // 2],
            "p99_s": delays[min(len(delays) - 1, int(len(delays) * 0.99))], "max_s": delays[-1]}


def busy_percent(seconds: float) -> float:
    """How busy the whole machine is over the next seconds."""
    busy0, total0 = machine_busy()
    time.sleep(seconds)
    busy1, total1 = machine_busy()
    return round(100 * (busy1 - busy0) / (total1 - total0), 1)


def scrape_seconds(config: Path) -> dict[str, float]:
    routes = load_config(config).select()
    started = time.monotonic()
    admin.statuses(routes)
    cold = time.monotonic() - started
    with closing(Connector()) as kept:
        admin.statuses(routes, kept)
        started = time.monotonic()
        admin.statuses(routes, kept)
        warm = time.monotonic() - started
    return {"cold_s": round(cold, 3), "kept_connections_s": round(warm, 3)}


def polling_floor(server: str, databases: list[str], seconds: float) -> float:
    """How busy the machine is while this process only asks each database
    `select 1` once a second over kept connections: what any once-a-second
    question to every database costs, before the question does anything."""
    conns = [connect(server, database) for database in databases]
    done = threading.Event()

    def ask() -> None:
        while not done.wait(1.0 - time.monotonic() % 1.0):
            for conn in conns:
                with conn.cursor() as cur:
                    cur.execute("select 1")

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        return busy_percent(seconds)
    finally:
        done.set()
        asker.join()
        for conn in conns:
            conn.close()


def server_cpu_per_move(server: str, config: Path, partitions: list[str]) -> dict[str, float]:
    """Server CPU (ms) of one 1,000-event move per partition, in this process: on a
    source connection opened for it, then on kept ones (as worker processes keep them)."""
    routes = [route for route in load_config(config).select() if route.name.startswith("part_")]
    figures = {}
    for label, max_idle in (("fresh_source_ms", 1), ("kept_source_ms", None)):
        with closing(Mover(Connector(max_idle=max_idle))) as mover:
            for warm_up in (True, False):  # checks, the target's session and, when kept, every source
                for database in partitions:
                    produce(server, database, "cpu", PER_PARTITION, tick=True)
                before = cpu_seconds(pids_named("postgres"))
                for route in routes:  # each route a loop of its own, as a task with one route has it
                    mover.move([route], budget=60)
                if not warm_up:
                    figures[label] = round(1000 * (cpu_seconds(pids_named("postgres")) - before) / len(routes), 1)
    return figures


def setup_run(name: str, server: str, config: Path, workdir: Path, worker_args: list[list[str]],
              partitions: list[str], idle_seconds: float, latency_seconds: float) -> dict[str, Any]:
    print(f"-- {name}", flush=True)
    logs = [workdir / f"{name}-worker{n}.log" for n in range(len(worker_args))]
    beat_log = workdir / f"{name}-beat.log"
    # Only the bench's own databases count: other work may share the server.
    peaks = ConnectionPeaks(connect(server, "postgres"), f"{PREFIX}_central", [*partitions, f"{PREFIX}_one"])
    workers = [start_celery(config, log, "worker", "-l", "info", "--without-mingle", "--without-gossip",
                            "-n", f"w{n}@%h", *args, mode="w")
               for n, (log, args) in enumerate(zip(logs, worker_args, strict=True))]
    beat = start_celery(config, beat_log, "beat", "-l", "info", "-s", str(workdir / f"{name}-beat"), mode="w")
    result: dict[str, Any] = {"setup": name}
    try:
        wait_for_celery([*logs, beat_log], workers=len(workers))
        result["worker_processes"] = sum(len(family(worker.pid)) - 1 for worker in workers)
        # The median of DRAINS runs: where a tick falls in the sweep interval moves each run by up to a second.
        fanin = [drain(server, partitions, PER_PARTITION, "central_events", f"{name}-{n}") for n in range(DRAINS)]
        one = [drain(server, [f"{PREFIX}_one"], PER_PARTITION * len(partitions), "one_events", f"{name}-{n}")
               for n in range(DRAINS)]
        result["drain_runs_s"] = [round(seconds, 2) for seconds in fanin]
        result["one_route_drain_runs_s"] = [round(seconds, 2) for seconds in one]
        result["drain_s"] = round(statistics.median(fanin), 2)
        result["one_route_drain_s"] = round(statistics.median(one), 2)
        result["drain_ratio"] = round(result["drain_s"] / result["one_route_drain_s"], 2)
        time.sleep(3)
        peaks.every = 2.0  # not to count its own queries as idle load
        pids = {"beat": [beat.pid], "workers": [pid for worker in workers for pid in family(worker.pid)],
                "postgres": pids_named("postgres"), "redis": pids_named("redis-server"),
                "rabbitmq (idle, not used)": pids_named("beam.smp")}
        before = {part: cpu_seconds(found) for part, found in pids.items()}
        result["idle_machine_busy_pct"] = busy_percent(idle_seconds)
        result["idle_core_pct"] = {part: round(100 * (cpu_seconds(found) - before[part]) / idle_seconds, 1)
                                   for part, found in pids.items()}
        result["memory_mb"] = round(rss_mb(pids["beat"] + pids["workers"]), 1)
        peaks.every = 0.05
        if latency_seconds > 0:
            result["latency"] = latency(server, partitions, latency_seconds)
        result["batches_moved_by_each_worker"] = [sum(moved["batches"] for moved in moves_in(log.read_text()))
                                                  for log in logs]
    finally:
        stop_celery([beat, *workers], timeout=30)
        (result["peak_connections_central"], result["peak_connections_partition"],
         result["peak_connections_server"]) = peaks.stop()
    return result


def create_databases(server: str, partitions: list[str]) -> None:
    for name in (*partitions, f"{PREFIX}_one", f"{PREFIX}_central"):
        recreate_database(server, name)
        run_sql(server, name, "create extension pgq")
    for name in (*partitions, f"{PREFIX}_one"):
        run_sql(server, name, "select pgq.create_queue('events')")
    run_sql(server, f"{PREFIX}_central", "select pgq.create_queue('central_events')",
            "select pgq.create_queue('one_events')")


def table(results: list[dict[str, Any]], routes: int) -> str:
    def row(label: str, goal: str, value: Any) -> str:
        return f"| {label} | {goal} | " + " | ".join(str(value(r)) for r in results) + " |"

    lines = ["| figure | goal | " + " | ".join(r["setup"] for r in results) + " |",
             "|---|---|" + "---:|" * len(results),
             row(f"drain {routes} x {PER_PARTITION:,} events, median of {DRAINS} (s)", "",
                 lambda r: f"{r['drain_s']} ({', '.join(map(str, r['drain_runs_s']))})"),
             row("the same events through one route (s)", "",
                 lambda r: f"{r['one_route_drain_s']} ({', '.join(map(str, r['one_route_drain_runs_s']))})"),
             row("ratio", "<= 1.5", lambda r: r["drain_ratio"]),
             row("peak connections on the central database", "<= processes + 2",
                 lambda r: f"{r['peak_connections_central']} ({r['worker_processes']} processes)"),
             row("peak connections on the busiest partition", "<= 1 + processes",
                 lambda r: r["peak_connections_partition"]),
             row("peak connections on the server", "", lambda r: r["peak_connections_server"]),
             row("machine busy, nothing to move", "<= 4 %", lambda r: f"{r['idle_machine_busy_pct']} %"),
             row("  beat / workers / PostgreSQL / Redis / RabbitMQ (% of a core)", "",
                 lambda r: " / ".join(str(v) for v in r["idle_core_pct"].values())),
             row("memory of beat and workers (MB)", "", lambda r: r["memory_mb"]),
             row("batches moved by each worker", "", lambda r: r["batches_moved_by_each_worker"])]
    if all("latency" in r for r in results):
        lines += [row("tick on a partition -> in central, p50 / p99 / max (ms)", "p99 <= 1500",
                      lambda r: " / ".join(f"{r['latency'][k] * 1000:.0f}" for k in ("p50_s", "p99_s", "max_s")))]
    return "\n".join(lines)


def run(server: str | None, broker: str, routes: int, idle_seconds: float, latency_seconds: float,
        json_path: Path | None) -> int:
    """The benchmark on server, or on a throwaway cluster with room for the connections."""
    # every database on one server: beat's sweep and each of the two worker
    # processes keep a connection to each, the benchmark one more
    needed = 4 * (routes + 2) + 50
    if server is not None:
        allowed = int(run_sql(server, "postgres", "show max_connections")[0][0])
        if allowed < needed:
            raise SystemExit(f"qmover bench: the server allows {allowed} connections; {routes} routes on one server "
                             f"need about {needed}: raise max_connections, or leave out --server to use a cluster "
                             f"of its own")
        return _run(server, broker, routes, idle_seconds, latency_seconds, json_path)
    print(f"-- a throwaway PostgreSQL cluster (max_connections {needed}) ...", flush=True)
    cluster = Cluster(settings={"max_connections": str(needed)})
    try:
        return _run(f"host=127.0.0.1 port={cluster.port} user=postgres", broker, routes, idle_seconds,
                    latency_seconds, json_path)
    finally:
        cluster.close()


def _run(server: str, broker: str, routes: int, idle_seconds: float, latency_seconds: float,
         json_path: Path | None) -> int:
    width = len(str(routes - 1))
    names = [f"{n:0{width}d}" for n in range(routes)]
    partitions = [f"{PREFIX}_p{name}" for name in names]
    workdir = Path(tempfile.mkdtemp(prefix="qmover-bench-fanin-"))
    config = workdir / "fanin.ini"
    config.write_text(CONFIG.format(broker=broker, server=server, prefix=PREFIX, interval=INTERVAL,
                                    partitions=f"{names[0]}-{names[-1]}"))
    print(f"-- {routes} partition databases, a central one and a one-route source ...", flush=True)
    create_databases(server, partitions)
    try:
        for route in load_config(config).select():
            admin.install(route)
        scrape = scrape_seconds(config)
        print("-- the machine with qmover stopped ...", flush=True)
        stopped = busy_percent(idle_seconds)
        floor = polling_floor(server, partitions, idle_seconds)
        results = [setup_run(name, server, config, workdir, args, partitions, idle_seconds, latency_seconds)
                   for name, args in (("one worker -c 2", [["-c", "2"]]),
                                      ("two workers -c 1", [["-c", "1"], ["-c", "1"]]))]
        print("-- server CPU of a move, fresh and kept source connections ...", flush=True)
        qmover_log = logging.getLogger("qmover.protocol.mover")
        level = qmover_log.level
        qmover_log.setLevel(logging.WARNING)  # not a line per batch moved in this process
        try:
            per_move = server_cpu_per_move(server, config, partitions)
        finally:
            qmover_log.setLevel(level)
    finally:
        for name in (*partitions, f"{PREFIX}_one", f"{PREFIX}_central"):
            drop_database(server, name)
    print()
    print(table(results, routes))
    print(f"\nthe machine with qmover stopped (its databases made, nothing running): {stopped} % busy; "
          f"{floor} % while asking each partition `select 1` once a second (the floor of any polling)")
    print(f"\nstatus of all {routes + 1} routes, each database asked once: {scrape['cold_s']} s with new "
          f"connections (qmover status), {scrape['kept_connections_s']} s with kept ones (a qmover metrics scrape)")
    print(f"\nserver CPU of moving one {PER_PARTITION:,}-event batch: {per_move['fresh_source_ms']} ms on a source "
          f"connection opened for it, {per_move['kept_source_ms']} ms on a kept one (as worker processes keep them)")
    if json_path:
        json_path.write_text(json.dumps({"routes": routes, "scrape": scrape, "machine_busy_qmover_stopped_pct": stopped,
                                         "machine_busy_select_1_polling_pct": floor,
                                         "server_cpu_per_move": per_move, "setups": results}, indent=2))
        print(f"results written to {json_path}")
    print(f"logs in {workdir}")
    return 0
