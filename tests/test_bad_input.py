"""Bad input: one line naming cause and fix, exit != 0, nothing moved, no batch finished."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from celery_helpers import wait_until
from conftest import COPY_RUNNING, MANUAL_CONFIG, run_qmover
from servers import Cluster


def rewrite(route, old: str, new: str) -> None:
    text = route.config.read_text()
    assert old in text
    route.config.write_text(text.replace(old, new))


def drop_line(route, key: str) -> None:
    lines = route.config.read_text().splitlines(keepends=True)
    route.config.write_text("".join(line for line in lines if not line.startswith(key)))


CASES = {
    # name: (break the route, extra args, exit code, words the one line must hold)
    "missing config file": (lambda r: r.config.unlink(), (), 2, ["config file not found"]),
    "missing key": (lambda r: drop_line(r, "dst_db"), (), 2, ["[queue_mover3] dst_db: missing"]),
    "unknown key": (lambda r: r.config.write_text(r.config.read_text() + "dst_queue_nmae = x\n"), (), 2,
                    ["dst_queue_nmae: unknown key", "did you mean 'dst_queue_name'"]),
    "unknown route": (lambda r: None, ("--route", "nope"), 2, ["unknown route 'nope'", "eventlog_to_target_mover"]),
    "bad DSN": (lambda r: rewrite(r, "src_db = ", "src_db = dbname "), (), 2,
                ["[queue_mover3] src_db: not a valid libpq connection string"]),
    "database does not exist": (lambda r: rewrite(r, f"dbname={r.dst.name}", "dbname=qmt_no_such_db"), (), 1,
                                ["target database", "cannot connect", "qmt_no_such_db", "check dst_db"]),
    "unreachable server": (lambda r: rewrite(r, "dst_db = host=127.0.0.1", "dst_db = host=127.0.0.1 port=1"), (), 1,
                           ["target database", "cannot connect", "port=1", "that the server is up"]),
    "missing source queue": (lambda r: r.src.execute("select pgq.drop_queue('eventlog', true)"), (), 1,
                             ["source database", "queue 'eventlog' does not exist", "pgq.create_queue"]),
    "missing target queue": (lambda r: r.dst.execute("select pgq.drop_queue('copy_of_eventlog')"), (), 1,
                             ["target database", "queue 'copy_of_eventlog' does not exist"]),
    "pgq not installed": (lambda r: r.dst.execute("drop extension pgq cascade"), (), 1,
                          ["target database", "PgQ is not installed", "CREATE EXTENSION pgq"]),
    "pgq_ext missing": (lambda r: r.dst.execute("drop schema pgq_ext cascade"), (), 1,
                        ["schema pgq_ext is missing", "qmover install"]),
    "claim table missing": (lambda r: r.dst.execute("drop schema qmover cascade"), (), 1,
                            ["qmover's claim table (qmover.claim) is missing", "qmover install"]),
    "consumer not registered": (
        lambda r: r.src.execute("select pgq.unregister_consumer('eventlog', 'eventlog_to_target_mover')"), (), 1,
        ["consumer 'eventlog_to_target_mover' is not registered", "qmover install"]),
}


REMOVE_CONSUMER = {"missing source queue", "consumer not registered"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(route, case):
    route.src.produce_series(route.src_queue, 10)
    route.src.tick(route.src_queue)
    before = route.src.execute("select last_tick, current_batch from pgq.get_consumer_info()")
    breaker, args, code, words = CASES[case]
    breaker(route)

    result = run_qmover("run", "--once", str(route.config), *args)

    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if "ERROR" in line or "error:" in line]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in result.stderr
    # nothing moved, no batch taken or finished on the source
    if route.dst.value("select count(*) from pg_namespace where nspname = 'pgq'"):
        assert route.dst.value("select count(*) from pgq.event_template") == 0
    after = route.src.execute("select last_tick, current_batch from pgq.get_consumer_info()")
    assert after == ([] if case in REMOVE_CONSUMER else before)


def test_pgq_missing_on_source_is_reported_by_install(make_db, tmp_path):
    src, dst = make_db(pgq=False), make_db()
    dst.create_queue("copy_of_eventlog")
    config = tmp_path / "mover.ini"
    config.write_text(MANUAL_CONFIG.format(src=src.dsn, dst=dst.dsn))

    result = run_qmover("install", str(config))

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qmover: error: route eventlog_to_target_mover: source database (host=127.0.0.1 dbname={src.name}): "
        "PgQ is not installed; install PgQ (Debian: apt-get install postgresql-15-pgq3) "
        "and run CREATE EXTENSION pgq in that database"]
    assert dst.value("select count(*) from pg_namespace where nspname = 'pgq_ext'") == 0


def test_status_reports_an_unreachable_route_and_exits_1(route):
    rewrite(route, "dst_db = host=127.0.0.1", "dst_db = host=127.0.0.1 port=1")
    result = run_qmover("status", str(route.config))
    assert result.returncode == 1
    assert "cannot connect" in result.stdout
    assert "Traceback" not in result.stderr


def test_statement_timeout_on_the_target(route):
    route.src.produce_series(route.src_queue, 300_000, size=100)
    route.src.tick(route.src_queue)
    rewrite(route, f"dbname={route.dst.name}", f"dbname={route.dst.name} options='-c statement_timeout=200'")

    result = run_qmover("run", "--once", str(route.config))

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "statement timeout" in errors[0] and "raise statement_timeout" in errors[0]
    assert route.target_events() == []
    assert route.src.value("select current_batch from pgq.get_consumer_info()") is not None  # not finished


def latin1_target(make_db, tmp_path):
    """A UTF8 source and a LATIN1 target: each server converts text to and from the client's UTF8."""
    src, dst = make_db(), make_db(encoding="LATIN1")
    src.create_queue("eventlog")
    dst.create_queue("copy_of_eventlog")
    config = tmp_path / "mover.ini"
    config.write_text(MANUAL_CONFIG.format(src=src.dsn, dst=dst.dsn))
    run_qmover("install", str(config), check=True)
    return src, dst, config


def test_event_in_another_encoding_arrives_as_the_same_text(make_db, tmp_path):
    src, dst, config = latin1_target(make_db, tmp_path)
    src.produce("eventlog", [("ok", "café", "Größe", None, None, "½ µ ÿ")])
    src.tick("eventlog")

    run_qmover("run", "--once", str(config), check=True)

    # Read back through a UTF8 client: bytes stored unconverted would read as "cafÃ©".
    assert dst.events("copy_of_eventlog", "ev_type, ev_data, ev_extra1, ev_extra4") == [
        ("ok", "café", "Größe", "½ µ ÿ")]


def test_event_the_target_encoding_cannot_hold(make_db, tmp_path):
    src, dst, config = latin1_target(make_db, tmp_path)
    src.produce("eventlog", [("ok", "café", None, None, None, None), ("cjk", "日本語", None, None, None, None)])
    src.tick("eventlog")

    result = run_qmover("run", "--once", str(config))

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "has no equivalent in encoding" in errors[0] and "encoding UTF8" in errors[0]
    assert dst.events("copy_of_eventlog") == []


def test_queue_names_that_need_quoting(make_db, tmp_path):
    src, dst = make_db(), make_db()
    source_queue, target_queue = 'sr"c; drop table pgq.queue; --', "we;ird q'ueue"
    src.create_queue(source_queue)
    dst.create_queue(target_queue)
    config = tmp_path / "mover.ini"
    config.write_text(f"[r]\nsrc_db = {src.dsn}\ndst_db = {dst.dsn}\n"
                      f"pgq_queue_name = {source_queue}\ndst_queue_name = {target_queue}\n")
    run_qmover("install", str(config), check=True)
    src.produce_series(source_queue, 25)
    src.tick(source_queue)

    run_qmover("run", "--once", str(config), check=True)

    assert dst.events(target_queue) == src.events(source_queue)
    assert len(dst.events(target_queue)) == 25
    status = run_qmover("status", "--json", str(config), check=True)
    assert target_queue in status.stdout.replace("\\\"", '"')


@pytest.fixture
def scram_cluster():
    """A cluster of its own whose TCP logins need the password."""
    cluster = Cluster(auth="scram", password="right-horse-battery")
    yield cluster
    cluster.close()


def test_wrong_password(scram_cluster, tmp_path):
    for name, queue in (("src", "eventlog"), ("dst", "copy_of_eventlog")):
        scram_cluster.execute("postgres", f"create database {name}")
        scram_cluster.execute(name, "create extension pgq")
        scram_cluster.execute(name, "select pgq.create_queue(%s)", (queue,))
    config = tmp_path / "mover.ini"
    config.write_text(MANUAL_CONFIG.format(src=scram_cluster.dsn("src", password=True),
                                           dst=scram_cluster.dsn("dst", password=True)))
    run_qmover("install", str(config), check=True)
    scram_cluster.execute("src", "select pgq.insert_event('eventlog', 't', 'd')")
    scram_cluster.execute("src", "select pgq.force_tick('eventlog'), pgq.ticker('eventlog')")
    config.write_text(config.read_text().replace("right-horse-battery", "wrong-staple"))
    without_password = {**os.environ, "PGPASSWORD": "wrong-staple"}
    no_password_config = tmp_path / "nopass.ini"
    no_password_config.write_text(MANUAL_CONFIG.format(src=scram_cluster.dsn("src"), dst=scram_cluster.dsn("dst")))

    for args, env in ((("run", "--once", str(config)), None),
                      (("run", str(config)), None),  # the loop does not retry a refused login
                      (("run", "--once", str(no_password_config)), without_password)):
        result = run_qmover(*args, env=env, timeout=60)

        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1, result.stderr
        # the target first: the route's claim is taken there before its source opens
        assert "target database" in errors[0] and "login refused" in errors[0]
        assert 'password authentication failed for user "postgres"' in errors[0]
        assert "check the user and password in dst_db (or PGPASSWORD / ~/.pgpass)" in errors[0]
        assert "wrong-staple" not in result.stderr + result.stdout
    assert scram_cluster.execute("src", "select current_batch from pgq.get_consumer_info()") == [(None,)]
    assert scram_cluster.execute("dst", "select count(*) from pgq.event_1") == [(0,)]

    right = {**os.environ, "PGPASSWORD": "right-horse-battery"}
    run_qmover("run", "--once", str(no_password_config), env=right, check=True)
    assert scram_cluster.execute("dst", "select count(*) from pgq.event_1") == [(1,)]


def test_target_server_going_away_mid_batch(make_db, tmp_path):
    src, target = make_db(), Cluster()
    try:
        target.execute("postgres", "create database dst")
        target.execute("dst", "create extension pgq")
        target.execute("dst", "select pgq.create_queue('copy_of_eventlog')")
        src.create_queue("eventlog")
        config = tmp_path / "mover.ini"
        config.write_text(MANUAL_CONFIG.format(src=src.dsn, dst=target.dsn("dst")))
        run_qmover("install", str(config), check=True)
        src.produce_series("eventlog", 300_000, size=100)
        src.tick("eventlog")
        mover = subprocess.Popen([sys.executable, "-m", "qmover", "run", "--once", str(config)],
                                 stderr=subprocess.PIPE, text=True)
        wait_until(lambda: target.execute("dst", COPY_RUNNING, ("dst",))[0][0] > 0, 30, "the COPY into the target",
                   every=0.02)

        target.stop("immediate")
        _, stderr = mover.communicate(timeout=60)

        assert mover.returncode == 1, stderr
        errors = [line for line in stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1, stderr
        assert "target database" in errors[0] and "connection failed" in errors[0], errors[0]
        assert "Traceback" not in stderr
        assert src.value("select current_batch from pgq.get_consumer_info()") is not None  # not finished
        target.start()
        assert target.execute("dst", "select count(*) from pgq.event_1") == [(0,)]
        run_qmover("run", "--once", str(config), check=True)
        moved = target.execute("dst", "select count(*), count(distinct ev_data) from pgq.event_1")
        assert moved == [(300_000, 300_000)]
    finally:
        target.close()


def test_event_larger_than_100_mb(route):
    route.src.execute("select pgq.insert_event(%s, 'big', repeat('0123456789abcdef', 101 * 65536))",
                      (route.src_queue,))
    route.src.produce_series(route.src_queue, 3)
    route.src.tick(route.src_queue)

    route.qmover("run", "--once", check=True)

    fingerprint = "ev_type, length(ev_data), md5(ev_data)"
    moved = route.dst.events(route.dst_queue, fingerprint)
    assert moved == route.src.events(route.src_queue, fingerprint)
    assert moved[0][:2] == ("big", 101 * 1024 * 1024) and len(moved) == 4


def test_status_says_when_the_claim_table_is_missing(route):
    route.dst.execute("drop schema qmover cascade")
    result = run_qmover("status", str(route.config))
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == (
        f"error: route {route.name}: target database ({route.route().dst_display}): qmover's claim table "
        f"(qmover.claim) is missing, so routes cannot be claimed; run: qmover install CONFIG --route {route.name}")
    run_qmover("install", str(route.config), check=True)  # brings it back, and nothing else changes
    assert run_qmover("status", str(route.config)).returncode == 0
