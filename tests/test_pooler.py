"""Behind PgBouncer: session mode moves with every guarantee; transaction and
statement mode are refused at start, in one line, and said so if met later."""

from __future__ import annotations

import re

import psycopg2
import pytest

from qmover.config import load_config
from qmover.errors import WrongPooler
from qmover.pg.connector import Connector, Loan
from qmover.pg.queries import NEXT_LOCK, Source
from qmover_lab.connections import QMOVER

from celery_helpers import Processes, error_lines, wait_until
from conftest import ROUTE, live_claims, partitions_and_central, positions, run_qmover
from servers import PgBouncer


@pytest.fixture
def bouncer():
    made: list[PgBouncer] = []

    def start(pool_mode: str, pool_size: int = 4) -> PgBouncer:
        made.append(PgBouncer(pool_mode, pool_size))
        return made[-1]

    yield start
    for pooler in made:
        pooler.close()


# A qmover session of the database waiting for an advisory lock.
WAITING = (f"select count(*) from pg_stat_activity where datname = %s and {QMOVER}"
           " and wait_event_type = 'Lock' and wait_event = 'advisory'")


def pooled_config(make_db, tmp_path, pooler: PgBouncer, routes: int, broker: str):
    parts, central = partitions_and_central(make_db, routes)
    config = tmp_path / "pooled.ini"
    config.write_text("".join(ROUTE.format(n=n, src=pooler.dsn(part.name), dst=pooler.dsn(central.name),
                                           interval=0.5, extra="") for n, part in enumerate(parts))
                      + f"\n[qmover]\nbroker_url = {broker}\n")
    return parts, central, config


def test_session_mode_a_worker_sigkilled_while_it_holds_routes(make_db, tmp_path, redis_db, bouncer):
    """Its claims stay on server sessions the pooler keeps open; they run out,
    and the next worker moves those routes, every event once.  The worker is
    held mid-task, its routes claimed, by the lock its next_batch takes on the
    first partition (taken there by the test, past the pooler), and killed there."""
    pooler = bouncer("session")
    parts, central, config = pooled_config(make_db, tmp_path, pooler, 4, redis_db.url)
    run_qmover("install", str(config), check=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(config, logs, app="qmover")
    holding = parts[0].connect()
    try:
        with holding.cursor() as cur:
            cur.execute(f"select pg_advisory_lock({NEXT_LOCK.key('%s::text')})", ("partition_0",))
        procs.worker("first", 2)
        procs.beat()
        for n, part in enumerate(parts):
            part.produce_series("events", 20, size=40, tag=f"p{n}-")
            part.tick("events")
        wait_until(lambda: "partition_0" in live_claims(central) and parts[0].value(WAITING, (parts[0].name,)), 60,
                   "the first worker to claim partition_0 and wait for its next batch")
        held = sorted(live_claims(central))
        procs.kill("first")
        holding.close()
        before = positions(central)
        procs.worker("second", 2)
        for round_no in range(3):
            for n, part in enumerate(parts):
                part.produce_series("events", 10, size=40, tag=f"after-p{n}r{round_no}-")
                part.tick("events")
        wait_until(lambda: all(positions(central).get(route, 0) > before.get(route, 0) for route in held), 90,
                   f"{held} to move again after their worker was killed")
        source = [event for part in parts for event in part.events("events")]
        wait_until(lambda: len(central.events("central_events")) >= len(source), 90, "every event in central")
        assert sorted(central.events("central_events")) == sorted(source)
        assert error_lines(procs.log("second")) == []
    finally:
        holding.close()
        procs.stop()


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
def test_transaction_and_statement_mode_are_refused_at_start(make_db, tmp_path, redis_db, bouncer, pool_mode):
    pooler = bouncer(pool_mode)
    parts, central, config = pooled_config(make_db, tmp_path, pooler, 2, redis_db.url)
    for part in parts:
        part.produce_series("events", 10)
        part.tick("events")

    for command in (["install"], ["run", "--once"], ["worker"]):
        done = run_qmover(command[0], str(config), *command[1:])
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "pool_mode = session" in line]
        assert done.returncode != 0, (command, done.stderr[-500:])
        assert len(lines) == 1 and "Traceback" not in done.stderr, (command, done.stderr[-2000:])
        assert re.search(r"route partition_\d: (source|target) database \(host=127.0.0.1 port=\d+ dbname=\w+ "
                         r"user=postgres\): .*a pooler in transaction or statement mode", lines[0])
    assert central.events("central_events") == []


def test_a_transaction_pooler_met_while_moving_is_said_so(make_db, tmp_path, redis_db, bouncer):
    """Past the start check (a pooler put in later, say): a PREPAREd statement
    missing on the server session a transaction reached names the pooler."""
    pooler = bouncer("transaction", pool_size=2)
    _, _, config = pooled_config(make_db, tmp_path, pooler, 1, redis_db.url)
    route = load_config(config).select()[0]
    with Loan(Connector()) as loan:
        link = loan.link(route, "source")
        link.rows(Source.SWEEP_STATE, queues=[], consumers=[])  # PREPAREd on the server session it reached
        other = psycopg2.connect(pooler.dsn(route.src_dsn.rsplit("=", 1)[1]))
        try:
            with other.cursor() as cur:  # holds that session (the pooler hands out the one used last)
                cur.execute("select 1")
                with pytest.raises(WrongPooler, match=r"prepared statement .* does not exist: a pooler in "
                                                      r"transaction or statement mode .* pool_mode = session"):
                    link.rows(Source.SWEEP_STATE, queues=[], consumers=[])
        finally:
            other.close()
