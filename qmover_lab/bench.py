"""`qmover bench`: how fast qmover moves events, next to the database's own floor.

For each workload it makes fresh databases, loads the same events in the
same ticks once, and lets three consumers of that one source queue move them:

- floor:   a server-side loop in the source database (next_batch,
           insert ... select from get_batch_events, finish_batch, commit) into
           a second queue there: the database's own cost, no client involved;
- qmover:  the move loop, as `qmover run --once` runs it, in its own process;
- celery:  a real Celery worker and beat moving the same route.

After each mode the target's content must equal the source's, or the run
fails.  A latency run measures insert-to-target delay under a steady load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from psycopg2 import sql

from qmover.config import Route, load_config
from qmover.ops import admin
from qmover.pg.connector import Loan
from qmover.protocol.batch import Moved
from qmover.protocol.mover import Mover
from qmover_lab.processes import cpu_seconds, pool_children, start_celery, wait_for_celery
from qmover_lab.processes import stop as stop_celery
from qmover_lab.sandbox import connect, drop_database, recreate_database, run_sql
from qmover_lab.sandbox import value as scalar

SERVER = "host=127.0.0.1"
SOURCE, TARGET_QMOVER, TARGET_CELERY = "qmover_bench_src", "qmover_bench_qmover", "qmover_bench_celery"
QUEUE, COPY_QUEUE = "events", "events_copy"
CONFIG = """
[qmover]
broker_url = {broker}

[bench_qmover]
src_db = {server} dbname={src}
dst_db = {server} dbname={dst_qmover}
pgq_queue_name = events
dst_queue_name = events_copy
# a batch per tick, as the floor moves them: merged ticks would compare other batches
merge_ticks = 0

[bench_celery]
src_db = {server} dbname={src}
dst_db = {server} dbname={dst_celery}
pgq_queue_name = events
dst_queue_name = events_copy
move_interval = 0.1
move_budget = 600
merge_ticks = 0
"""
# A web shop's order event: ~150 bytes of JSON plus table name, key and time.
LOAD = """
insert into {table} (ev_time, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
select clock_timestamp(), 'order.' || (array['created', 'paid', 'shipped'])[1 + i %% 3],
       format('{{"order_id": %%s, "customer": "c-%%s", "amount": %%s.%%s, "currency": "EUR", '
              '"items": [{{"sku": "%%s", "qty": %%s}}], "note": "%%s"}}',
              %(base)s + i, (i::bigint * 7919) %% 100000, i %% 997, i %% 100, md5(i::text), 1 + i %% 5,
              substr(md5((i * 31)::text), 1, 24)),
       'public.orders', (%(base)s + i)::text, null, 'web'
  from generate_series(1, %(count)s) as i
"""
FLOOR = """
do $floor$
declare
    batch bigint;
begin
    loop
        batch := pgq.next_batch('events', 'bench_floor');
        exit when batch is null;
        execute format('insert into %s (ev_time, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)'
                       ' select ev_time, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4'
                       ' from pgq.get_batch_events($1)',
                       pgq.quote_fqname(pgq.current_event_table('events_copy'))) using batch;
        perform pgq.finish_batch(batch);
        commit;
    end loop;
end
$floor$
"""
CONTENT = """
select count(*), md5(string_agg(row, ',' order by row)) from (
    select concat_ws('|', ev_time, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4) as row
      from {table}) events
"""


@dataclass(frozen=True)
class Workload:
    name: str
    events: int
    batches: int


@dataclass
class Result:
    workload: str
    mode: str
    events: int
    batches: int
    seconds: float
    peak_rss_mb: float | None
    step_ms: dict[str, float] | None = None  # qmover: mean time of each protocol step
    cpu_ms: dict[str, float] | None = None  # CPU a batch, per process: the floor's backend; qmover's two and its own

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


WORKLOADS = (Workload("200k events in 10 batches", 200_000, 10),
             Workload("100k events in 1000 batches", 100_000, 1000),
             Workload("1M events in 1 batch", 1_000_000, 1))
SWEEP = (Workload("sweep 10/batch", 2_000, 200), Workload("sweep 100/batch", 20_000, 200),
         Workload("sweep 1k/batch", 100_000, 100), Workload("sweep 10k/batch", 100_000, 10),
         Workload("sweep 100k/batch", 200_000, 2))


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident memory of a process on this machine (Linux /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def prepare(server: str, workload: Workload) -> list[int]:
    """Fresh databases and queues, the workload loaded; returns the tick ids."""
    for name in (SOURCE, TARGET_QMOVER, TARGET_CELERY):
        recreate_database(server, name)
    run_sql(server, SOURCE, "create extension pgq", f"select pgq.create_queue('{QUEUE}')",
            f"select pgq.set_queue_config('{QUEUE}', 'ticker_max_count', '1')",
            f"select pgq.create_queue('{COPY_QUEUE}')",
            f"select pgq.register_consumer('{QUEUE}', 'bench_floor')")
    for name in (TARGET_QMOVER, TARGET_CELERY):
        run_sql(server, name, "create extension pgq", f"select pgq.create_queue('{COPY_QUEUE}')")
    per_batch = workload.events // max(1, workload.batches)
    ticks = []
    with closing(connect(server, SOURCE)) as conn, conn.cursor() as cur:
        for n in range(workload.batches):
            schema, table = scalar(conn, "select pgq.current_event_table(%s)", (QUEUE,)).split(".")
            cur.execute(sql.SQL(LOAD).format(table=sql.Identifier(schema, table)),
                        {"base": n * per_batch, "count": per_batch})
            ticks.append(scalar(conn, "select pgq.ticker(%s)", (QUEUE,)))
    run_sql(server, SOURCE, "vacuum analyze")
    return ticks


def content(server: str, database: str, queue: str) -> tuple[int, str]:
    pfx = run_sql(server, database, sql.SQL("select queue_data_pfx from pgq.queue where queue_name = {}").format(
        sql.Literal(queue)))[0][0]
    schema, table = pfx.split(".")
    return run_sql(server, database, sql.SQL(CONTENT).format(table=sql.Identifier(schema, table)))[0]


def run_floor(server: str, workload: Workload) -> Result:
    with closing(connect(server, SOURCE)) as conn, conn.cursor() as cur:
        backend = scalar(conn, "select pg_backend_pid()")
        cpu = cpu_seconds([backend])
        started = time.perf_counter()
        cur.execute(FLOOR)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds([backend]) - cpu
        rss = vm_hwm_mb(backend)
    return Result(workload.name, "floor", workload.events, workload.batches, seconds, rss,
                  cpu_ms={"server": cpu * 1000 / workload.batches})


def run_qmover(config: Path, workload: Workload) -> Result:
    """The move protocol in a process of its own, so its memory is its own."""
    out = subprocess.run([sys.executable, "-m", "qmover_lab.bench", "--move", str(config), "bench_qmover"],
                         check=True, capture_output=True, text=True).stdout
    moved = json.loads(out)
    if moved["events"] != workload.events:
        raise SystemExit(f"qmover moved {moved['events']} of {workload.events} events")
    steps = ", ".join(f"{step} {ms:.2f}" for step, ms in moved["step_ms"].items())
    print(f"   qmover steps, ms a batch: {steps}", flush=True)
    cpu = ", ".join(f"{process} {ms:.2f}" for process, ms in moved["cpu_ms"].items())
    print(f"   qmover CPU, ms a batch: {cpu}", flush=True)
    return Result(workload.name, "qmover", workload.events, moved["batches"], moved["seconds"], moved["rss_mb"],
                  moved["step_ms"], moved["cpu_ms"])


class StepClock:
    """A move-protocol checkpoint that adds up the time spent in each step."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.totals[step] = self.totals.get(step, 0.0) + now - self.last
        self.last = now


def move_all(config: str, route_name: str) -> None:
    """Entry of the --move child: move every ready batch with the move loop, print what it took."""
    route = load_config(config).select([route_name])[0]
    events = batches = 0
    clock = StepClock()
    mover = Mover()
    with Loan(mover.connector) as loan:  # the connections the loop then borrows, and the route's checks
        src, dst = loan.link(route, "source"), loan.link(route, "target")
        mover.preflight.via_insert_event(route, src, dst)
        backends = [link.session.conn.get_backend_pid() for link in (src, dst)]

    def moved(_route: Route, batch: Moved) -> None:
        nonlocal events, batches
        events += batch.events
        batches += 1
        clock.start()  # what follows the batch's commit (the loop's own work) is no step of the protocol

    cpu = [cpu_seconds([pid]) for pid in backends] + [time.process_time()]
    started = time.perf_counter()
    clock.start()
    mover.move([route], budget=float("inf"), checkpoint=lambda _route, step: clock(step), moved=moved)
    seconds = time.perf_counter() - started
    cpu = [after - before for before, after in
           zip(cpu, [cpu_seconds([pid]) for pid in backends] + [time.process_time()], strict=True)]
    mover.close()
    print(json.dumps({"events": events, "batches": batches, "seconds": seconds,
                      "rss_mb": vm_hwm_mb(os.getpid()),
                      "step_ms": {step: total * 1000 / max(1, batches) for step, total in clock.totals.items()},
                      "cpu_ms": {process: seconds * 1000 / max(1, batches)
                                 for process, seconds in zip(("source", "target", "client"), cpu, strict=True)}}))


def run_celery(server: str, config: Path, workdir: Path, workload: Workload, ticks: list[int]) -> Result:
    """Worker and beat run idle first; the clock starts when the consumer is
    moved back to before the loaded ticks, and stops when the target holds the
    last tick."""
    route = load_config(config).select(["bench_celery"])[0]
    log = workdir / "celery.log"
    log.write_text("")
    worker = start_celery(config, log, "worker", "-c", "1", "-l", "info", "--without-mingle", "--without-gossip")
    beat = start_celery(config, log, "beat", "-l", "info", "-s", str(workdir / "beat-schedule"))
    try:
        wait_for_celery([log], workers=1)
        first_tick = ticks[0] - 1
        with closing(connect(server, SOURCE)) as src, closing(connect(server, TARGET_CELERY)) as dst:
            with src.cursor() as cur:
                started = time.perf_counter()
                cur.execute("select pgq.register_consumer_at(%s, %s, %s)", (QUEUE, route.consumer, first_tick))
            while scalar(dst, "select pgq_ext.get_last_tick(%s)", (route.consumer,)) != ticks[-1]:
                time.sleep(0.01)
            seconds = time.perf_counter() - started
        rss = max((vm_hwm_mb(child) or 0.0 for child in pool_children(worker.pid)), default=None)
    finally:
        stop_celery((beat, worker), timeout=30)
    return Result(workload.name, "celery", workload.events, workload.batches, seconds, rss)


def run_workload(server: str, config: Path, workdir: Path, workload: Workload, celery: bool) -> list[Result]:
    print(f"-- {workload.name}: loading ...", flush=True)
    ticks = prepare(server, workload)
    routes = load_config(config).routes
    # Register the movers after loading: the celery consumer is rewound at the start gate.
    admin.install(routes["bench_qmover"])
    admin.install(routes["bench_celery"])
    run_sql(server, SOURCE, sql.SQL("select pgq.register_consumer_at({}, 'bench_qmover', {})").format(
        sql.Literal(QUEUE), sql.Literal(ticks[0] - 1)))
    expected = content(server, SOURCE, QUEUE)
    results = [run_floor(server, workload), run_qmover(config, workload)]
    checks = [(SOURCE, COPY_QUEUE, "floor"), (TARGET_QMOVER, COPY_QUEUE, "qmover")]
    if celery:
        results.append(run_celery(server, config, workdir, workload, ticks))
        checks.append((TARGET_CELERY, COPY_QUEUE, "celery"))
    for database, queue, mode in checks:
        if content(server, database, queue) != expected:
            raise SystemExit(f"{workload.name}: {mode} target differs from the source; benchmark invalid")
    for result in results:
        cpu = "".join(f", {process} {ms:.2f}" for process, ms in (result.cpu_ms or {}).items())
        print(f"   {result.mode:7} {result.seconds:8.3f} s  {result.rate:10,.0f} events/s"
              + (f"  (CPU, ms a batch{cpu})" if cpu else ""), flush=True)
    return results


def latency(server: str, config: Path, seconds: float, rate: int) -> dict[str, float]:
    """Steady `rate` events/s into the source, a tick every second, qmover moving
    in a loop (loop_delay 0.1 s): delay from insert to commit on the target."""
    prepare(server, Workload("latency", 0, 0))
    route = load_config(config).select(["bench_qmover"])[0]
    admin.install(route)
    stop = threading.Event()
    delays: list[float] = []
    moves: list[float] = []

    def produce() -> None:
        with closing(connect(server, SOURCE)) as conn, conn.cursor() as cur:
            next_at = time.monotonic()
            while not stop.is_set():
                cur.execute("select pgq.insert_event(%s, 'latency', clock_timestamp()::text)", (QUEUE,))
                next_at += 1 / rate
                time.sleep(max(0.0, next_at - time.monotonic()))

    def tick() -> None:
        with closing(connect(server, SOURCE)) as conn, conn.cursor() as cur:
            while not stop.wait(1.0):
                cur.execute("select pgq.ticker(%s)", (QUEUE,))

    threads = [threading.Thread(target=produce), threading.Thread(target=tick)]
    for thread in threads:
        thread.start()
    last_id = 0
    ended = time.monotonic() + seconds
    mover = Mover()
    with closing(connect(server, TARGET_QMOVER)) as dst, dst.cursor() as cur:

        def arrived(_route: Route, batch: Moved) -> None:
            nonlocal last_id
            committed = time.time()
            moves.append(batch.seconds)
            cur.execute("select ev_id, extract(epoch from ev_data::timestamptz) from pgq.event_1 where ev_id > %s",
                        (last_id,))
            for ev_id, inserted in cur.fetchall():
                delays.append(committed - float(inserted))
                last_id = max(last_id, ev_id)

        while time.monotonic() < ended:
            if not mover.move([route], budget=ended - time.monotonic(), moved=arrived)[0].moved:
                time.sleep(0.1)
    mover.close()
    stop.set()
    for thread in threads:
        thread.join()
    delays.sort()
    return {"events": len(delays), "rate": rate, "p50_s": delays[len(delays) // 2],
            "p99_s": delays[int(len(delays) * 0.99)], "max_s": delays[-1],
            "mean_move_s": statistics.mean(moves) if moves else 0.0, "batches": len(moves)}


def table(results: list[Result]) -> str:
    floors = {r.workload: r.seconds for r in results if r.mode == "floor"}
    lines = ["| workload | mode | events | batches | seconds | events/s | ratio to floor | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rss = "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"
        lines.append(f"| {r.workload} | {r.mode} | {r.events:,} | {r.batches:,} | {r.seconds:.2f} | "
                     f"{r.rate:,.0f} | {r.seconds / floors[r.workload]:.2f} | {rss} |")
    return "\n".join(lines)


def svg_plot(results: list[Result], path: Path) -> None:
    """events/s against events per batch, one line per mode, log-log, as SVG."""
    import math

    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        series.setdefault(r.mode, []).append((r.events / r.batches, r.rate))
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    w, h, m = 640, 400, 60

    def px(x: float, y: float) -> tuple[float, float]:
        return (m + (math.log10(x) - x0) / (x1 - x0 or 1) * (w - 2 * m),
                h - m - (math.log10(y) - y0) / (y1 - y0 or 1) * (h - 2 * m))

    colors = {"floor": "#555", "qmover": "#1b7f3b", "celery": "#2a5db0"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">events/s by batch size '
             f'(qmover bench)</text>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>']
    for exp in range(int(y0), int(y1) + 1):
        _, y = px(10 ** x0, 10 ** exp)
        parts.append(f'<text x="{m - 6}" y="{y + 4}" text-anchor="end">1e{exp}</text>')
        parts.append(f'<line x1="{m}" y1="{y}" x2="{w - m}" y2="{y}" stroke="#ddd"/>')
    for x in sorted(set(xs)):
        px_x, _ = px(x, 10 ** y0)
        parts.append(f'<text x="{px_x}" y="{h - m + 16}" text-anchor="middle">{x:,.0f}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 18}" text-anchor="middle">events per batch</text>')
    for n, (mode, points) in enumerate(series.items()):
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(x, y) for x, y in sorted(points)))
        color = colors.get(mode, "black")
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{w - m - 80}" y="{m + 16 * n}" fill="{color}">{mode}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help=f"libpq settings of the PostgreSQL server to use (default {SERVER!r}; "
                                         "with --routes, a throwaway cluster of its own)")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14", help="broker for the Celery mode")
    parser.add_argument("--json", type=Path, help="keep the figures in this file (default, without --routes: "
                                                  "bench-results.json)")
    parser.add_argument("--svg", type=Path, help="write the batch-size plot here")
    parser.add_argument("--no-celery", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="skip the batch-size sweep")
    parser.add_argument("--latency-seconds", type=float, default=30)
    parser.add_argument("--only", metavar="TEXT", help="run only workloads whose name contains TEXT")
    parser.add_argument("--pgoptions", metavar="OPTIONS",
                        help="PGOPTIONS for every mode, e.g. '-c synchronous_commit=off' to see the cost of flushes")
    parser.add_argument("--routes", type=int, nargs="?", const=100, metavar="N",
                        help="the fan-in benchmark instead: N partitions into one central queue (N default 100)")
    parser.add_argument("--idle-seconds", type=float, default=20, help="with --routes: how long idle CPU is sampled")
    live = parser.add_argument_group("with --routes and --rate: the live fan-in, qmover against skytools")
    live.add_argument("--rate", type=int, metavar="R", help="events a second from each partition (a steady load)")
    live.add_argument("--seconds", type=float, default=60, help="seconds of load measured (default 60)")
    live.add_argument("--warmup", type=float, help="seconds of load before measuring, at least (default: 10, or "
                                                    "routes/10 when more: every worker process opens and checks each "
                                                    "route); then until the tool has caught up, at most 60 s more")
    live.add_argument("--interval", type=float, default=1.0,
                      help="qmover's move_interval and skytools' loop_delay (default 1)")
    live.add_argument("--concurrency", type=int, default=2, help="qmover's worker processes (default 2)")
    live.add_argument("--pool", default="prefork", choices=("prefork", "threads", "solo"),
                      help="qmover's worker pool (default prefork); -c is then its threads")
    live.add_argument("--tools", default="qmover,skytools", help="which movers, in this order (default both)")
    live.add_argument("--repeat", type=int, default=1, help="run the tools this many times, alternating")
    live.add_argument("--qmover-setting", action="append", default=[], metavar="KEY=VALUE",
                      help="a line for qmover's [qmover] section (repeatable)")
    live.add_argument("--route-setting", action="append", default=[], metavar="KEY=VALUE",
                      help="a line for qmover's route template (repeatable)")
    live.add_argument("--servers", type=int, default=1, metavar="K",
                      help="spread the partitions over K throwaway clusters, central on the first (default 1)")
    live.add_argument("--ticks", default="each", metavar="each|pgqd",
                      help="each: a tick right after every round's commit (default); pgqd: pgq.ticker() once a "
                           "second with PgQ's thresholds, as pgqd ticks")
    live.add_argument("--outage", type=float, default=0, metavar="S",
                      help="central refuses connections for S seconds before the measured window: the backlog, "
                           "the catch-up")
    live.add_argument("--idle", type=float, default=0, metavar="S",
                      help="after the load: S seconds of ticks only with the tool running, then S with it stopped")
    live.add_argument("--idle-settle", type=float, default=None, metavar="S",
                      help="with --idle: seconds from the load's stop to the idle figures, while PgQ's ticks slow "
                           "to one a minute (default 100 s, that ramp with PgQ's defaults)")
    live.add_argument("--load-alone", type=float, default=0, metavar="S",
                      help="before the tools: S seconds of the load with no mover running, what every tool's "
                           "figures stand on")
    parser.add_argument("--move", nargs=2, metavar=("CONFIG", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.move:
        move_all(*args.move)
        return 0
    if args.rate is not None:
        if args.routes is None:
            parser.error("--rate needs --routes N")
        from qmover_lab import live as live_benchmark

        return live_benchmark.main(args)
    if args.routes is not None:
        from qmover_lab import fanin

        return fanin.run(args.server, args.broker, args.routes, args.idle_seconds, args.latency_seconds, args.json)
    args.server = args.server or SERVER
    args.json = args.json or Path("bench-results.json")

    if args.pgoptions:
        os.environ["PGOPTIONS"] = args.pgoptions  # libpq in this process and in every child reads it
    workloads = [w for w in WORKLOADS if not args.only or args.only in w.name]
    sweeps = [] if args.no_sweep else [w for w in SWEEP if not args.only or args.only in w.name]
    workdir = Path(tempfile.mkdtemp(prefix="qmover-bench-"))
    config = workdir / "bench.ini"
    config.write_text(CONFIG.format(server=args.server, src=SOURCE, dst_qmover=TARGET_QMOVER,
                                    dst_celery=TARGET_CELERY, broker=args.broker))
    results = [r for w in workloads for r in run_workload(args.server, config, workdir, w, not args.no_celery)]
    sweep = [r for w in sweeps for r in run_workload(args.server, config, workdir, w, not args.no_celery)]
    lat = None
    if args.latency_seconds > 0:
        print(f"-- latency: {args.latency_seconds:.0f} s at 1,000 events/s, 1 s ticks ...", flush=True)
        lat = latency(args.server, config, args.latency_seconds, 1000)
    for name in (SOURCE, TARGET_QMOVER, TARGET_CELERY):
        drop_database(args.server, name)

    print()
    if results:
        print(table(results))
    if sweep:
        print()
        print(table(sweep))
    if lat:
        print()
        print(f"latency at {lat['rate']} events/s, 1 s ticks, mover polling every 0.1 s: "
              f"p50 {lat['p50_s'] * 1000:.0f} ms, p99 {lat['p99_s'] * 1000:.0f} ms, max {lat['max_s'] * 1000:.0f} ms "
              f"({lat['events']} events, {lat['batches']} batches, mean move {lat['mean_move_s'] * 1000:.1f} ms)")
    args.json.write_text(json.dumps({"workloads": [asdict(r) | {"events_per_s": r.rate} for r in results],
                                     "sweep": [asdict(r) | {"events_per_s": r.rate} for r in sweep],
                                     "latency": lat}, indent=2))
    print(f"results written to {args.json}")
    if args.svg and sweep:
        svg_plot(sweep, args.svg)
        print(f"plot written to {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def command(bench_args: tuple[str, ...]) -> None:
    """Benchmark: floor vs qmover vs Celery on fresh databases (--help for options)."""
    sys.exit(main(list(bench_args)))
