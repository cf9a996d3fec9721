"""The demo: two partition databases into one central queue, through Celery.

Creates (or recreates) qmover_demo_part1, qmover_demo_part2 and
qmover_demo_central with PgQ, writes a two-route config, starts a Celery
worker, beat (which also ticks the partitions: no pgqd needed) and Flower,
produces events into both partitions for a while, waits until the central
queue holds exactly what was produced, prints a per-route table and stops
what it started.  Run it with `bash scripts/demo.sh`; it is safe to run again.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import redis
from psycopg2 import sql

from qmover.config import Route, load_config
from qmover.ops import admin
from qmover.ops.metrics import Counters
from qmover_lab.processes import start_celery
from qmover_lab.processes import stop as stop_celery
from qmover_lab.sandbox import recreate_database, run_sql

SERVER = "host=127.0.0.1"
ROUTE = """
[{db}]
src_db = {server} dbname={db}
dst_db = {server} dbname={central}
pgq_queue_name = events
dst_queue_name = central_events
move_interval = 0.5
ticker = source
ticker_interval = 0.5
pidfile = pid/%(job_name)s.pid
"""
EVENTS = "select ev_type, ev_data, ev_extra1, ev_time from pgq.event_1"


def create_databases(server: str, parts: tuple[str, ...], central: str) -> None:
    for name in (*parts, central):
        recreate_database(server, name)
    for name in parts:
        run_sql(server, name, "create extension pgq", "select pgq.create_queue('events')",
                "select pgq.set_queue_config('events', 'ticker_max_lag', '0.5 seconds')")
    run_sql(server, central, "create extension pgq", "select pgq.create_queue('central_events')")


def produce(server: str, part: str, count: int, round_no: int) -> None:
    """An order-and-payment burst, as one application transaction."""
    run_sql(server, part, sql.SQL(
        "select count(pgq.insert_event('events', kind, "
        "json_build_object('part', {part}, 'round', {round}, 'id', i, 'amount', i * 3.5)::text, "
        "'public.' || kind || 's', null, null, null)) "
        "from generate_series(1, {count}) i, "
        "lateral (select case when i % 4 = 0 then 'payment' else 'order' end) as k(kind)").format(
            part=sql.Literal(part), round=sql.Literal(round_no), count=sql.Literal(count)))


def ensure_redis() -> subprocess.Popen | None:
    """Use the Redis on 127.0.0.1:6379, starting one if none answers."""
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
        return None
    except redis.ConnectionError:
        print("starting redis-server on 127.0.0.1:6379")
        server = subprocess.Popen(["redis-server", "--port", "6379", "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        return server


def start(workdir: Path, name: str, *args: str) -> subprocess.Popen:
    return start_celery((workdir / "demo.ini").resolve(), workdir / f"{name}.log", *args, mode="w")


def screenshot(url: str, path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium found: screenshot skipped (apt-get install chromium)")
        return
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", "--window-size=1400,800", "--virtual-time-budget=8000",
                    f"--screenshot={path.resolve()}", url],
                   check=False, capture_output=True, timeout=60)
    print(f"screenshot of {url} saved to {path}")


def counted(counters: Counters, routes: list[Route]) -> list[tuple[int, int]]:
    """(events, batches) of each route, as the metrics counters hold them."""
    return [(int(found.get("events", 0)), int(found.get("batches", 0))) if found else (0, 0)
            for found in counters.read(routes)]


def count_events(server: str, database: str) -> int:
    return run_sql(server, database, "select count(*) from pgq.event_1")[0][0]


def produce_for(args: argparse.Namespace, parts: tuple[str, ...], central: str) -> int:
    """Produce into every partition for args.seconds, showing progress; return the count."""
    produced, round_no = 0, 0
    per_round = max(1, args.events_per_second // 5)
    started = time.monotonic()
    while time.monotonic() - started < args.seconds:
        for part in parts:
            produce(args.server, part, per_round, round_no)
            produced += per_round
        round_no += 1
        if round_no % 5 == 0:
            print(f"  producing: {produced} events so far, central queue holds {count_events(args.server, central)}")
        time.sleep(0.2)
    print(f"produced {produced} events; waiting for the central queue ...")
    return produced


def wait_for(server: str, central: str, produced: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        arrived = count_events(server, central)
        print(f"  central queue: {arrived} / {produced}")
        if arrived >= produced:
            break
        time.sleep(1)
    time.sleep(1)  # a duplicate arriving late would show in the report


def report(args: argparse.Namespace, parts: tuple[str, ...], central: str, routes: list[Route], produced: int,
           moved: list[tuple[int, int]]) -> bool:
    """Print the per-route table (moved: each route's events and batches); True
    when the central queue equals what was produced."""
    source = Counter(row for part in parts for row in run_sql(args.server, part, EVENTS))
    target = Counter(run_sql(args.server, central, EVENTS))
    exact = source == target and sum(target.values()) == produced
    print()
    print(f"{'route':24} {'events':>8} {'batches':>8} {'lag_s':>6}")
    for route, found, (events, batches) in zip(routes, admin.statuses(routes), moved, strict=True):
        lag = found["lag_seconds"]
        print(f"{route.name:24} {events:>8} {batches:>8} {lag:>6.1f}")
    print()
    print(f"central queue: {sum(target.values())} events, produced: {produced}, "
          + ("every event exactly once" if exact else "MISMATCH"))
    return exact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=SERVER, help="libpq settings of the PostgreSQL server to use")
    parser.add_argument("--seconds", type=float, default=10, help="how long to produce events")
    parser.add_argument("--events-per-second", type=int, default=400, help="per partition")
    parser.add_argument("--flower-port", type=int, default=5555)
    parser.add_argument("--workdir", default="demo-output", type=Path)
    parser.add_argument("--prefix", default="qmover_demo", help="names of the databases it (re)creates")
    parser.add_argument("--keep-running", action="store_true", help="leave worker, beat and Flower running")
    parser.add_argument("--screenshot", type=Path, help="save a PNG of Flower's task page here")
    args = parser.parse_args(argv)
    args.workdir.mkdir(exist_ok=True)
    parts = (f"{args.prefix}_part1", f"{args.prefix}_part2")
    central = f"{args.prefix}_central"

    print(f"creating {', '.join(parts)} and {central} with PgQ ...")
    create_databases(args.server, parts, central)
    config_path = args.workdir / "demo.ini"
    config_path.write_text("".join(ROUTE.format(db=part, central=central, server=args.server) for part in parts))
    config = load_config(config_path)
    routes = config.select()
    for route in routes:
        print(admin.install(route))
    counters = Counters(config.metrics_url)
    before = counted(counters, routes)  # an earlier demo's routes had the same names

    redis_server = ensure_redis()
    flower_url = f"http://127.0.0.1:{args.flower_port}"
    processes = [start(args.workdir, "worker", "worker", "-l", "info", "-c", "2", "--without-mingle"),
                 start(args.workdir, "beat", "beat", "-l", "info", "-s", str(args.workdir / "beat-schedule")),
                 start(args.workdir, "flower", "flower", f"--port={args.flower_port}", "--address=127.0.0.1")]
    print(f"started Celery worker, beat and Flower ({flower_url}); logs in {args.workdir}/")
    try:
        produced = produce_for(args, parts, central)
        wait_for(args.server, central, produced)
        if args.screenshot:
            screenshot(f"{flower_url}/tasks", args.screenshot)

        moved = [(events - earlier[0], batches - earlier[1])
                 for (events, batches), earlier in zip(counted(counters, routes), before, strict=True)]
        exact = report(args, parts, central, routes, produced, moved)
        print(f"Flower: {flower_url}/tasks")
    finally:
        if args.keep_running:
            print("--keep-running: worker, beat and Flower keep running (Ctrl-C or kill to stop)")
        else:
            stop_celery(processes)
            counters.close()
            if redis_server:
                redis_server.terminate()
            print("stopped worker, beat and Flower")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
