"""The demo: two local databases, events produced into one, moved into the other.

Creates (or recreates) databases qmover_demo_src and qmover_demo_dst with
PgQ, writes a skytools-style config, produces events in several ticks, runs
`qmover install` and `qmover run --once`, and prints what moved.
Run it with `bash scripts/demo.sh`; it is safe to run again.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import psycopg2
from psycopg2 import sql

from qmover import admin, runner
from qmover.config import load_config

SERVER_DSN = "host=127.0.0.1"
DATABASES = ("qmover_demo_src", "qmover_demo_dst")
CONFIG = """\
[demo_mover]
job_name = demo_mover
src_db = {server} dbname=qmover_demo_src
dst_db = {server} dbname=qmover_demo_dst
pgq_queue_name = eventlog
dst_queue_name = copy_of_eventlog
logfile = log/%(job_name)s.log
"""
CONTENT = "select md5(string_agg(concat_ws('|', ev_type, ev_data, ev_extra1, ev_time), ',' order by ev_id)), count(*) from {}"


def execute(dsn: str, *statements: object) -> list[tuple]:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    rows: list[tuple] = []
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
            rows = cur.fetchall() if cur.description else []
    conn.close()
    return rows


def prepare(server: str) -> None:
    for name in DATABASES:
        execute(f"{server} dbname=postgres",
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)),
                sql.SQL("create database {}").format(sql.Identifier(name)))
    execute(f"{server} dbname=qmover_demo_src", "create extension pgq", "select pgq.create_queue('eventlog')")
    execute(f"{server} dbname=qmover_demo_dst", "create extension pgq", "select pgq.create_queue('copy_of_eventlog')")


def produce(server: str, ticks: int, per_tick: int) -> None:
    """Orders and payments, one transaction and one tick at a time, like a busy app."""
    for tick in range(ticks):
        execute(f"{server} dbname=qmover_demo_src",
                sql.SQL("select count(pgq.insert_event('eventlog', t.kind, "
                        "json_build_object('id', i, 'tick', {}, 'amount', i * 3.5)::text, "
                        "'public.' || t.kind || 's', null, null, null)) "
                        "from generate_series(1, {}) i, "
                        "lateral (select case when i % 4 = 0 then 'payment' else 'order' end as kind) t"
                        ).format(sql.Literal(tick), sql.Literal(per_tick)),
                "select pgq.force_tick('eventlog')")
        execute(f"{server} dbname=qmover_demo_src", "select pgq.ticker('eventlog')")


def content(server: str, database: str, table: str) -> tuple[str, int]:
    schema, name = table.split(".")
    digest, count = execute(f"{server} dbname={database}",
                            sql.SQL(CONTENT).format(sql.Identifier(schema, name)))[0]
    return digest or hashlib.md5(b"").hexdigest(), count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=SERVER_DSN, help="libpq settings of the PostgreSQL server to use")
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--events-per-tick", type=int, default=500)
    parser.add_argument("--workdir", default="demo-output", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    print(f"creating {' and '.join(DATABASES)} with PgQ ...")
    prepare(args.server)
    args.workdir.mkdir(exist_ok=True)
    config_path = args.workdir / "demo.ini"
    config_path.write_text(CONFIG.format(server=args.server))
    routes = load_config(config_path).select()
    for route in routes:
        print(admin.install(route))
    print(f"producing {args.ticks} batches of {args.events_per_tick} events into eventlog ...")
    produce(args.server, args.ticks, args.events_per_tick)
    print(f"moving: qmover run --once {config_path}")
    code = runner.run(routes, once=True)

    src_digest, src_count = content(args.server, "qmover_demo_src", "pgq.event_1")
    dst_digest, dst_count = content(args.server, "qmover_demo_dst", "pgq.event_1")
    same = src_digest == dst_digest and src_count == dst_count
    print()
    print(f"{'':10} {'database':18} {'queue':18} {'events':>7}  content md5")
    print(f"{'source':10} {'qmover_demo_src':18} {'eventlog':18} {src_count:>7}  {src_digest}")
    print(f"{'target':10} {'qmover_demo_dst':18} {'copy_of_eventlog':18} {dst_count:>7}  {dst_digest}")
    print()
    print("every event moved exactly once" if same else "MISMATCH between source and target")
    for row in map(admin.status, routes):
        print(f"route {row['route']}: source tick {row['source_last_tick']}, "
              f"target tick {row['target_last_tick']}, pending {row['pending_events']}")
    print(f"try: .venv/bin/qmover status {config_path}")
    return 0 if same and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
