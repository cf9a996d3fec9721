"""Least privilege: install as an admin, move as roles that are not superusers."""

from __future__ import annotations

from collections import Counter

import psycopg2
import psycopg2.errors
import pytest
from psycopg2 import sql

from conftest import ClusterObjects


@pytest.fixture
def make_role():
    """Factory: make_role(*member_of) -> a LOGIN role, dropped after the test's databases."""
    roles = ClusterObjects("drop role if exists {}")

    def create(*member_of: str) -> str:
        return roles.make("qmt_role", "create role {} login nosuperuser",
                          *(f"grant {role} to {{}}" for role in member_of))

    yield create
    roles.close()


def as_roles(route, source_role: str, target_role: str) -> None:
    """Point the route's DSNs at the given roles (install already ran as an admin)."""
    text = route.config.read_text()
    text = text.replace(f"dbname={route.src.name}", f"dbname={route.src.name} user={source_role}")
    text = text.replace(f"dbname={route.dst.name}", f"dbname={route.dst.name} user={target_role}")
    route.config.write_text(text)


def grant_copy_rights(route, role: str) -> None:
    """Exactly what the COPY path needs beyond pgq_writer: INSERT on the target
    queue's event tables, USAGE on its event id sequence."""
    tables = [row[0] for row in route.dst.execute(
        "select c.oid::regclass::text from pg_class c join pgq.queue q"
        " on c.relname like split_part(q.queue_data_pfx, '.', 2) || '%%'"
        " and c.relnamespace = 'pgq'::regnamespace and c.relkind = 'r'"
        " where q.queue_name = %s", (route.dst_queue,))]
    assert len(tables) == 4  # the parent and its three rotating tables
    for table in tables:
        route.dst.execute(sql.SQL("grant insert on {} to {}").format(sql.SQL(table), sql.Identifier(role)))
    sequence = route.dst.value("select queue_event_seq from pgq.queue where queue_name = %s", (route.dst_queue,))
    route.dst.execute(sql.SQL("grant usage on sequence {} to {}").format(sql.SQL(sequence), sql.Identifier(role)))


def produce(route, batches: int = 3) -> None:
    for n in range(batches):
        route.src.produce_series(route.src_queue, 40, tag=f"b{n}-")
        route.src.tick(route.src_queue)


def visible(events: list[tuple]) -> Counter:
    """Events without ev_time, which the pgq.insert_event path does not keep."""
    return Counter(event[:6] for event in events)


def test_moving_with_least_privileges(make_role, route):
    reader, writer = make_role("pgq_reader"), make_role("pgq_writer")
    grant_copy_rights(route, writer)
    as_roles(route, reader, writer)
    produce(route)

    result = route.qmover("run", "--once", check=True)

    assert "insert_event" not in result.stderr  # no fallback warning
    assert route.target_events() == route.source_events()  # ev_time kept too
    assert route.dst.value("select count(*) from pg_roles where rolname in (%s, %s) and rolsuper",
                           (reader, writer)) == 0
    status = route.qmover("status", "--json", check=True)
    assert '"error": null' in status.stdout


def test_a_pgq_writer_target_moves_through_insert_event(make_role, route):
    reader, writer = make_role("pgq_reader"), make_role("pgq_writer")
    as_roles(route, reader, writer)
    produce(route)

    result = route.qmover("run", "--once", check=True)

    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and "held no position" not in line]
    assert len(warnings) == 1 and "through pgq.insert_event" in warnings[0] and "ev_time" in warnings[0]
    counted = route.counters()
    assert (counted["events"], counted["batches"]) == (120, 1)  # three waiting ticks, one batch
    assert visible(route.target_events()) == visible(route.source_events())
    assert len(route.target_events()) == 120

    # exactly once on this path too: crash after the target commit, move again
    produce(route, 1)
    route.crash_at("after_target_commit")
    route.qmover("run", "--once", check=True)
    assert route.counters()["skipped"] == 1  # already applied
    assert visible(route.target_events()) == visible(route.source_events())
    assert len(route.target_events()) == 160


def test_a_target_role_without_pgq_writer_is_told_what_to_grant(make_role, route):
    reader, nobody = make_role("pgq_reader"), make_role()
    as_roles(route, reader, nobody)
    produce(route, 1)

    result = route.qmover("run", "--once")

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "grant it pgq_writer" in errors[0]
    assert route.target_events() == []
    assert route.src.value("select current_batch from pgq.get_consumer_info()") is None


def pgq_ext_functions(db) -> list[str]:
    return [row[0] for row in db.execute(
        "select p.oid::regprocedure::text from pg_proc p where p.pronamespace = 'pgq_ext'::regnamespace order by 1")]


def callable_by(db, role: str) -> list[str]:
    return [name for name in pgq_ext_functions(db)
            if db.value("select has_function_privilege(%s, %s::regprocedure, 'execute')", (role, name))]


def test_a_role_granted_nothing_cannot_call_pgq_ext_and_the_target_role_can(make_role, route):
    nobody, writer = make_role(), make_role("pgq_writer")
    produce(route, 1)
    route.qmover("run", "--once", check=True)
    position = route.dst.value("select pgq_ext.get_last_tick(%s)", (route.name,))

    assert len(pgq_ext_functions(route.dst)) == 14  # upstream's 13 for pgq_writer, and version()
    assert callable_by(route.dst, nobody) == ["pgq_ext.version()"]
    assert callable_by(route.dst, writer) == pgq_ext_functions(route.dst)
    conn = psycopg2.connect(f"{route.dst.dsn} user={nobody}")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege), conn, conn.cursor() as cur:
        cur.execute("select pgq_ext.set_last_tick(%s, null::bigint)", (route.name,))
    conn.close()
    assert route.dst.value("select pgq_ext.get_last_tick(%s)", (route.name,)) == position is not None


def test_install_brings_a_pgq_ext_qmover_made_earlier_to_upstreams_rights(route):
    route.dst.execute("drop function pgq_ext.upgrade_schema()")
    route.dst.execute("grant execute on all functions in schema pgq_ext to public")  # as installs before did
    assert len(callable_by(route.dst, "public")) == 13

    result = route.qmover("install", check=True)

    assert "already registered" in result.stdout and "pgq_ext present" in result.stdout
    assert callable_by(route.dst, "public") == ["pgq_ext.version()"]
    assert route.dst.value("select pgq_ext.upgrade_schema()") == 0
