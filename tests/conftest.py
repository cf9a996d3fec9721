"""Fixtures: real PostgreSQL databases with PgQ, made per test and dropped after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from qmover.config import Route, load_config
from qmover.errors import QmoverError
from qmover.ops.metrics import Counters
from qmover.pg.queries import Claims
from qmover.protocol.batch import Moved
from qmover.protocol.mover import Mover
from qmover_lab.connections import QMOVER, ConnectionPeaks

from celery_helpers import Processes, Redis, free_port, wait_until
from fault_mover import CRASH_EXIT

ADMIN_DSN = os.environ.get("QMOVER_TEST_ADMIN_DSN", "host=127.0.0.1 dbname=postgres")
HOST_DSN = os.environ.get("QMOVER_TEST_HOST_DSN", "host=127.0.0.1")

Event = tuple  # (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
# A mover's COPY is running in the database named by the parameter.
COPY_RUNNING = f"select count(*) from pg_stat_activity where datname = %s and {QMOVER} and query ilike 'copy %%'"


EVENT_FIELDS = "ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time"
# (queue, tag, size, count): count events with ~size bytes of data each.
PRODUCE_SERIES = ("select count(pgq.insert_event(%s, 'type_' || (i %% 7), %s || i || ':' || repeat('x', %s),"
                  " 'public.t' || (i %% 3), 'extra2', null, i::text)) from generate_series(1, %s) i")


@dataclass
class PgqDatabase:
    """A throwaway database with PgQ; helpers speak SQL to it directly."""

    name: str
    server: str = HOST_DSN  # where it is, in DSN words: the machine's own server unless a test started one

    @property
    def dsn(self) -> str:
        return f"{self.server} dbname={self.name}"

    def connect(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        return conn

    def execute(self, query, params=None) -> list[tuple]:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(query, params)
            rows = cur.fetchall() if cur.description else []
        conn.close()
        return rows

    def value(self, query, params=None):
        rows = self.execute(query, params)
        return rows[0][0] if rows else None

    def create_queue(self, queue: str) -> None:
        self.execute("select pgq.create_queue(%s)", (queue,))

    def produce(self, queue: str, events: Sequence[Event]) -> None:
        """Insert events in one transaction, like an application would."""
        conn = psycopg2.connect(self.dsn)
        with conn, conn.cursor() as cur:
            for event in events:
                cur.execute("select pgq.insert_event(%s, %s, %s, %s, %s, %s, %s)", (queue, *event))
        conn.close()

    def produce_series(self, queue: str, count: int, size: int = 150, tag: str = "e") -> None:
        """count events with ~size bytes of data, generated server-side."""
        self.execute(PRODUCE_SERIES, (queue, tag, size, count))

    def tick(self, queue: str, force: bool = True) -> int | None:
        """Close a batch now.

        force: also with no new events (pgq.force_tick, which inflates the
        queue's event counter); otherwise only when an event came in.
        """
        if force:
            self.execute("select pgq.force_tick(%s)", (queue,))
        else:
            self.execute("select pgq.set_queue_config(%s, 'ticker_max_count', '1')", (queue,))
        return self.value("select pgq.ticker(%s)", (queue,))

    def events(self, queue: str, columns: str = EVENT_FIELDS) -> list[tuple]:
        """Every event in the queue's tables, in id order, visible columns only."""
        table = self.value("select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))
        schema, _, name = table.partition(".")
        query = sql.SQL("select {} from {} order by ev_id").format(
            sql.SQL(columns), sql.Identifier(schema, name))
        return self.execute(query)

    def copy_running(self) -> bool:
        """A mover's COPY is running in this database now."""
        return bool(self.value(COPY_RUNNING, (self.name,)))

    def last_tick(self, consumer: str) -> int | None:
        return self.value("select pgq_ext.get_last_tick(%s)", (consumer,))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-events", type=int, default=40_000,
                     help="events the soak test produces (the full run: 500000)")


def claim_as_another_mover(cur, *consumers: str) -> None:
    """Claim the routes of these consumers on cur's target session, as another mover does (for an hour)."""
    cur.execute(Claims.CLAIM.text, {"holder": "another mover", "lease": 3600, "consumers": list(consumers)})
    assert len(cur.fetchall()) == len(consumers)


def let_go_as_another_mover(cur) -> None:
    cur.execute(Claims.RELEASE_ALL.text)


def live_claims(target: PgqDatabase, since: float = 0.0) -> dict[str, int]:
    """Route (consumer) -> the pid of the process that holds its live claim (one
    taken after `since`, the target server's clock)."""
    rows = target.execute(f"select name, holder from qmover.claim c where kind = 'route' and {Claims.LIVE}"
                          " and c.since > to_timestamp(%s)", (since,))
    return {name: int(holder.rsplit(" ", 1)[1]) for name, holder in rows}


def positions(target: PgqDatabase) -> dict[str, int]:
    """Route (consumer) -> the last tick the target recorded for it."""
    return dict(target.execute("select consumer_id, last_tick_id from pgq_ext.completed_tick"))


def multiset(events: list[tuple]) -> Counter:
    return Counter(events)


@pytest.fixture(params=["streamed", "spooled", "spilled"])
def copy_path(request, monkeypatch) -> str:
    """Run an in-process test through one of the copy paths, whatever the batch size
    (spilled: spooled, through a temporary file from the first row on)."""
    from qmover.protocol import batch as batch_module

    monkeypatch.setattr(batch_module, "SMALL_BATCH", -1 if request.param == "streamed" else 10**12)
    if request.param == "spilled":
        monkeypatch.setattr(batch_module, "SPOOL_BYTES", 0)
    return request.param


class ClusterObjects:
    """Databases or roles a test makes through an admin connection, dropped after it."""

    def __init__(self, drop: str):
        self.drop = drop  # "drop database if exists {} with (force)", ...
        self.names: list[str] = []
        self.admin = psycopg2.connect(ADMIN_DSN)
        self.admin.autocommit = True

    def make(self, prefix: str, *statements: str) -> str:
        """Run each statement with {} as a new unique name; remember the name."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self.admin.cursor() as cur:
            for statement in statements:
                cur.execute(sql.SQL(statement).format(sql.Identifier(name)))
        self.names.append(name)
        return name

    def close(self) -> None:
        with self.admin.cursor() as cur:
            for name in self.names:
                cur.execute(sql.SQL(self.drop).format(sql.Identifier(name)))
        self.admin.close()


@pytest.fixture
def make_db() -> Iterator:
    """Factory: make_db(pgq=True) -> PgqDatabase, dropped after the test."""
    databases = ClusterObjects("drop database if exists {} with (force)")

    def create(pgq: bool = True, encoding: str = "UTF8") -> PgqDatabase:
        database = PgqDatabase(databases.make(
            "qmt", f"create database {{}} encoding '{encoding}' lc_collate 'C' lc_ctype 'C' template template0"))
        if pgq:
            database.execute("create extension pgq")
        return database

    yield create
    databases.close()


MANUAL_CONFIG = """\
[queue_mover3]
job_name = eventlog_to_target_mover
src_db = {src}
dst_db = {dst}
pgq_queue_name = eventlog
dst_queue_name = copy_of_eventlog
pidfile = log/%(job_name)s.pid
logfile = pid/%(job_name)s.log
"""


@dataclass
class Moves:
    """What the move loop did, batch by batch, and the errors it met."""

    batches: list[tuple[str, Moved]] = field(default_factory=list)  # (route name, batch), in order
    errors: list[QmoverError] = field(default_factory=list)

    @property
    def applied(self) -> list[Moved]:
        return [batch for _, batch in self.batches if not batch.skipped]

    @property
    def skipped(self) -> list[int]:
        """The ids of the batches found applied already."""
        return [batch.batch_id for _, batch in self.batches if batch.skipped]

    @property
    def sizes(self) -> list[int]:
        """Events of each batch applied."""
        return [batch.events for batch in self.applied]


def move(routes: Sequence[Route], mover: Mover | None = None, budget: float = 60,
         checkpoint: Callable[[Route, str], None] | None = None) -> Moves:
    """The one move loop in this process, round after round until a round moves
    nothing, as `qmover run --once` does (a route that fails stops)."""
    moves = Moves()
    own = mover is None
    mover = mover or Mover()
    try:
        while routes:
            outcomes = mover.move(routes, budget, checkpoint=checkpoint,
                                  moved=lambda route, batch: moves.batches.append((route.name, batch)))
            moves.errors += [outcome.error for outcome in outcomes if outcome.error]
            if not any(outcome.moved for outcome in outcomes):
                break
            routes = [outcome.route for outcome in outcomes if outcome.error is None]
    finally:
        if own:
            mover.close()
    return moves


@dataclass
class RouteSetup:
    """A source and a target database wired up as the manual's example route."""

    src: PgqDatabase
    dst: PgqDatabase
    config: Path
    name: str = "eventlog_to_target_mover"
    src_queue: str = "eventlog"
    dst_queue: str = "copy_of_eventlog"

    def qmover(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        return run_qmover(*args, str(self.config), timeout=timeout, check=check)

    def route(self) -> Route:
        return load_config(self.config).select()[0]

    def move(self, mover: Mover | None = None, checkpoint: Callable[[Route, str], None] | None = None) -> Moves:
        """The route moved in this process until nothing is ready (see move()); raises its first error."""
        moves = move([self.route()], mover, checkpoint=checkpoint)
        if moves.errors:
            raise moves.errors[0]
        return moves

    def counters(self) -> dict[str, float]:
        """The route's metrics counters (events, batches, skipped, filtered, errors), as every mover adds to them."""
        config = load_config(self.config)
        with Counters(config.metrics_url) as counters:
            return counters.read(config.select())[0] or {}

    def crash_at(self, point: str) -> None:
        """Move one batch in a process that dies hard at the protocol step named point."""
        result = subprocess.run([sys.executable, str(Path(__file__).with_name("fault_mover.py")),
                                 str(self.config), point], capture_output=True, text=True, timeout=60)
        assert result.returncode == CRASH_EXIT, result.stderr

    def source_events(self) -> list[tuple]:
        return self.src.events(self.src_queue)

    def target_events(self) -> list[tuple]:
        return self.dst.events(self.dst_queue)


def run_qmover(*args: str, timeout: float = 120, check: bool = False,
               env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "qmover", *args], capture_output=True,
                            text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"qmover {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def manual_route(make_db, tmp_path: Path, install: bool = True) -> RouteSetup:
    """Two new databases wired up as the manual's example route."""
    src, dst = make_db(), make_db()
    src.create_queue("eventlog")
    dst.create_queue("copy_of_eventlog")
    config = tmp_path / "queue_mover.ini"
    config.write_text(MANUAL_CONFIG.format(src=src.dsn, dst=dst.dsn))
    setup = RouteSetup(src, dst, config)
    if install:
        setup.qmover("install", check=True)
    return setup


@pytest.fixture
def route(make_db, tmp_path) -> RouteSetup:
    """The manual's example route, installed."""
    return manual_route(make_db, tmp_path)


# --- a Celery pipeline: partitions into one central queue, worker and beat -------------

ROUTE = """
[partition_{n}]
src_db = {src}
dst_db = {dst}
pgq_queue_name = events
dst_queue_name = central_events
move_interval = {interval}
{extra}
"""


@dataclass
class Pipeline:
    parts: list[PgqDatabase]
    central: PgqDatabase
    config: Path
    procs: Processes

    def produce(self, rounds: int, per_tick: int = 10, tick: bool = True, skip_tick: tuple = ()) -> int:
        """rounds x per_tick events into every partition, one tick each round."""
        for r in range(rounds):
            for n, part in enumerate(self.parts):
                part.produce_series("events", per_tick, size=60, tag=f"p{n}r{r}-")
                if tick and n not in skip_tick:
                    part.tick("events")
        return rounds * per_tick * len(self.parts)

    def produce_ticks(self, ticks: int, per_tick: int = 10) -> int:
        """ticks batches of per_tick events into every partition, over one connection
        each: fast enough (hundreds of batches a second) to keep workers busy."""
        conns = [part.connect() for part in self.parts]
        try:
            for conn in conns:
                with conn.cursor() as cur:
                    cur.execute("select pgq.set_queue_config('events', 'ticker_max_count', '1')")
            for t in range(ticks):
                for n, conn in enumerate(conns):
                    with conn.cursor() as cur:
                        cur.execute(PRODUCE_SERIES, ("events", f"p{n}t{t}-", 40, per_tick))
                        cur.execute("select pgq.ticker('events')")  # a statement of its own: a tick of its own
        finally:
            for conn in conns:
                conn.close()
        return ticks * per_tick * len(self.parts)

    def run_with_flower(self, rounds: int) -> tuple[int, int]:
        """Worker, beat and Flower; produce and wait. Returns (Flower's port, events produced).

        Flower lists only the tasks whose events it received, and a worker
        sends them once Flower has turned them on (qmover's app leaves them
        off: Flower asks at its start and every 5 s), so nothing is produced
        before the worker has said so."""
        port = free_port()
        self.procs.flower(port)
        self.procs.worker(concurrency=2)
        wait_until(lambda: flower_hears_workers(port), 60, "Flower to receive the worker's events", every=0.5)
        wait_until(lambda: TASK_EVENTS_ON in self.procs.log("worker"), 30, "Flower to turn task events on",
                   every=0.5)
        self.procs.beat()
        produced = self.produce(rounds)
        self.wait_for(produced)
        return port, produced

    def central_events(self) -> list[tuple]:
        return self.central.events("central_events")

    def source_events(self) -> list[tuple]:
        return [event for part in self.parts for event in part.events("events")]

    def wait_for(self, count: int, timeout: float = 90) -> None:
        """At least count events, and every event the partitions hold (earlier rounds' too), in the central queue."""
        count = max(count, len(self.source_events()))
        wait_until(lambda: len(self.central_events()) >= count, timeout, f"{count} events in the central queue")
        time.sleep(1.5)  # a straggler doubling an event would show now
        assert Counter(self.central_events()) == Counter(self.source_events())


TASK_EVENTS_ON = "Events of group {task} enabled by remote."  # the worker's log, at INFO


def flower_hears_workers(port: int) -> bool:
    """Flower answers and has a worker alive by its events (so it is subscribed to them)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers?status=true", timeout=5) as response:
            return any(json.load(response).values())
    except OSError:
        return False


@pytest.fixture
def redis_db():
    db = Redis()
    yield db
    db.close()


def partitions_and_central(make_db, count: int) -> tuple[list[PgqDatabase], PgqDatabase]:
    """count partition databases with a queue 'events', and a central one with 'central_events'."""
    parts = [make_db() for _ in range(count)]
    central = make_db()
    for part in parts:
        part.create_queue("events")
    central.create_queue("central_events")
    return parts, central


def installed_processes(config: Path, tmp_path: Path) -> Processes:
    """`qmover install` for the config's routes, then Celery processes that log under tmp_path/logs."""
    run_qmover("install", str(config), check=True)
    logdir = tmp_path / "logs"
    logdir.mkdir(exist_ok=True)
    return Processes(config, logdir)


@pytest.fixture
def pipeline(make_db, tmp_path, redis_db):
    """factory(routes, interval=..., first_extra=..., extra=..., password=..., broker=...) -> Pipeline,
    stopped after.  first_extra: lines for the first route; extra: for every route; broker: its URL
    (default: a Redis database of the test's own)."""
    made: list[Pipeline] = []

    def build(routes: int, interval: float = 0.5, first_extra: str = "", extra: str = "",
              password: str | None = None, broker: str | None = None) -> Pipeline:
        parts, central = partitions_and_central(make_db, routes)
        secret = f" password={password}" if password else ""
        text = "".join(ROUTE.format(n=n, src=part.dsn + secret, dst=central.dsn + secret, interval=interval,
                                    extra=(first_extra if n == 0 else "") + "\n" + extra)
                       for n, part in enumerate(parts))
        config = tmp_path / "pipeline.ini"
        config.write_text(text + f"\n[qmover]\nbroker_url = {broker or redis_db.url}\n")
        made.append(Pipeline(parts, central, config, installed_processes(config, tmp_path)))
        return made[-1]

    yield build
    for built in made:
        built.procs.stop()


def peaks(central: PgqDatabase, others: Sequence[PgqDatabase]) -> ConnectionPeaks:
    """qmover's connections on the central database, the busiest of the others and them all,
    sampled every 20 ms from now until stop()."""
    return ConnectionPeaks(central.connect(), central.name, [database.name for database in others], every=0.02)
