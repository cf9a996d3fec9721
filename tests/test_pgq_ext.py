"""The pgq_ext-compatible schema: its API, and positions shared with skytools' mover."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import manual_route


def skytools_move(route, *args: str) -> None:
    """Run the SerialConsumer-based skytools mover on the same config file
    (args: a skytools command such as --register instead of moving)."""
    workdir = route.config.parent
    for folder in ("log", "pid"):  # the manual's pidfile/logfile paths
        (workdir / folder).mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "qmover_lab.skytools_mover", str(route.config), *args], cwd=workdir,
                   check=True, capture_output=True, timeout=120)


def produce(route, batches: int, tag: str) -> None:
    for n in range(batches):
        route.src.produce_series(route.src_queue, 10, tag=f"{tag}{n}-")
        route.src.tick(route.src_queue)


def test_api_answers_like_pgq_ext(route):
    q = route.dst.value
    assert q("select pgq_ext.version()") == "3.1"
    # tick tracking, with and without subconsumer
    assert q("select pgq_ext.get_last_tick('c')") is None
    assert q("select pgq_ext.set_last_tick('c', 5)") == 1
    assert q("select pgq_ext.set_last_tick('c', 'sub', 7)") == 1
    assert q("select pgq_ext.get_last_tick('c')") == 5
    assert q("select pgq_ext.get_last_tick('c', '')") == 5
    assert q("select pgq_ext.get_last_tick('c', 'sub')") == 7
    assert q("select pgq_ext.set_last_tick('c', null::bigint)") == 1
    assert q("select pgq_ext.get_last_tick('c')") is None
    assert q("select pgq_ext.get_last_tick('c', 'sub')") == 7
    # batch tracking
    assert q("select pgq_ext.is_batch_done('c', 1)") is False
    assert q("select pgq_ext.set_batch_done('c', 1)") is True
    assert q("select pgq_ext.set_batch_done('c', 1)") is False
    assert q("select pgq_ext.is_batch_done('c', 1)") is True
    assert q("select pgq_ext.set_batch_done('c', 2)") is True
    assert q("select pgq_ext.is_batch_done('c', 1)") is False
    assert q("select pgq_ext.is_batch_done('c', 'sub', 2)") is False
    # event tracking: marks of a batch are dropped once the next batch starts
    assert q("select pgq_ext.set_event_done('c', 3, 101)") is True
    assert q("select pgq_ext.set_event_done('c', 3, 101)") is False
    assert q("select pgq_ext.is_event_done('c', 3, 101)") is True
    assert q("select pgq_ext.is_event_done('c', 'sub', 3, 101)") is False
    assert q("select pgq_ext.set_event_done('c', 'sub', 3, 101)") is True
    assert q("select pgq_ext.set_event_done('c', 4, 201)") is True
    assert q("select pgq_ext.is_event_done('c', 3, 101)") is False
    assert route.dst.execute(
        "select consumer_id, subconsumer_id, batch_id, event_id from pgq_ext.completed_event order by 2"
    ) == [("c", "", 4, 201), ("c", "sub", 3, 101)]


def test_qmover_continues_where_skytools_stopped(route):
    produce(route, 2, "sky")
    skytools_move(route)
    sky_tick = route.dst.last_tick(route.name)
    assert len(route.target_events()) == 20 and sky_tick is not None

    produce(route, 2, "qm")
    route.qmover("run", "--once", check=True)

    counted = route.counters()
    assert (counted["events"], counted["batches"]) == (20, 1)  # its two waiting ticks, as one batch
    assert sorted(route.target_events()) == sorted(route.source_events())
    assert len(route.target_events()) == 40
    assert route.dst.last_tick(route.name) > sky_tick


def test_skytools_continues_where_qmover_stopped(route):
    produce(route, 2, "qm")
    route.qmover("run", "--once", check=True)
    qm_tick = route.dst.last_tick(route.name)

    produce(route, 2, "sky")
    skytools_move(route)

    assert sorted(route.target_events()) == sorted(route.source_events())
    assert len(route.target_events()) == 40
    assert route.dst.last_tick(route.name) > qm_tick


def test_skytools_skips_a_batch_qmover_applied_but_did_not_finish(route):
    produce(route, 2, "x")
    route.crash_at("after_target_commit")

    skytools_move(route)

    assert sorted(route.target_events()) == sorted(route.source_events())
    assert len(route.target_events()) == 20


def test_install_leaves_an_existing_pgq_ext_alone(make_db, tmp_path):
    new = manual_route(make_db, tmp_path, install=False)
    dst = new.dst
    dst.execute((Path(__file__).parents[1] / "qmover" / "pg" / "pgq_ext.sql").read_text())
    dst.execute("comment on schema pgq_ext is 'ours, not qmover''s'")
    dst.execute("create or replace function pgq_ext.version() returns text language sql as $$ select 'theirs' $$")
    dst.execute("create table pgq_ext.their_table (x int)")

    result = new.qmover("install", check=True)

    assert "pgq_ext present" in result.stdout
    assert dst.value("select pgq_ext.version()") == "theirs"
    assert dst.value("select count(*) from pg_tables where schemaname = 'pgq_ext'") == 5
    assert dst.value("select to_regprocedure('pgq_ext.upgrade_schema()')") is None  # not added
    assert dst.value("select has_function_privilege('public', 'pgq_ext.set_last_tick(text, bigint)', "
                     "'execute')")  # their rights stay theirs


def test_upgrade_schema_gives_old_tables_their_subconsumer(route):
    dst = route.dst
    assert dst.value("select pgq_ext.upgrade_schema()") == 0  # nothing to do on qmover's schema
    dst.execute("alter table pgq_ext.completed_tick drop column subconsumer_id")  # the pkey goes with it
    dst.execute("alter table pgq_ext.completed_tick add primary key (consumer_id)")
    dst.execute("insert into pgq_ext.completed_tick values ('old', 7)")
    dst.execute("alter table pgq_ext.completed_batch alter column subconsumer_id drop default")

    assert dst.value("select pgq_ext.upgrade_schema()") == 2

    assert dst.value("select pgq_ext.get_last_tick('old')") == 7  # the row is subconsumer ''
    assert dst.value("select pgq_ext.set_last_tick('old', 'sub', 9)") == 1  # a second key for one consumer
    assert dst.value("select pg_get_constraintdef(oid) from pg_constraint "
                     "where conrelid = 'pgq_ext.completed_tick'::regclass and contype = 'p'") == \
        "PRIMARY KEY (consumer_id, subconsumer_id)"
    assert dst.value("select pgq_ext.set_batch_done('c', 1)") is True  # the default is back
    assert dst.value("select pgq_ext.upgrade_schema()") == 0


def test_incomplete_pgq_ext_is_reported_not_altered(make_db, tmp_path):
    new = manual_route(make_db, tmp_path, install=False)
    src, dst = new.src, new.dst
    dst.execute("create schema pgq_ext")
    dst.execute("create table pgq_ext.completed_batch (consumer_id text primary key, last_batch_id bigint)")

    result = new.qmover("install")

    assert result.returncode == 1
    assert "pgq_ext has no get_last_tick" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert dst.value("select count(*) from pg_tables where schemaname = 'pgq_ext'") == 1
    assert src.value("select count(*) from pgq.get_consumer_info()") == 0  # nothing registered


def test_migration_steps_from_the_readme(make_db, tmp_path):
    """skytools registered and ran the route; qmover install keeps its position."""
    new = manual_route(make_db, tmp_path, install=False)
    new.dst.execute((Path(__file__).parents[1] / "qmover" / "pg" / "pgq_ext.sql").read_text())  # skytools' pgq_ext
    skytools_move(new, "--register")
    produce(new, 2, "sky")
    skytools_move(new)
    sky_tick = new.dst.last_tick(new.name)

    installed = new.qmover("install", check=True)
    produce(new, 2, "qm")
    new.qmover("run", "--once", check=True)

    assert "already registered" in installed.stdout and "pgq_ext present" in installed.stdout
    assert sky_tick is not None and new.dst.last_tick(new.name) > sky_tick
    assert sorted(new.target_events()) == sorted(new.source_events())
    assert len(new.target_events()) == 40
