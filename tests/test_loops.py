"""Routes that would feed events back into their own queue are refused, from what the servers report."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

from qmover.config import load_config
from qmover.protocol.mover import Mover

from conftest import run_qmover

# One database, three spellings of its DSN: only the server can tell they are the same.
SPELLINGS = ("host=127.0.0.1 dbname={name}", "postgresql://127.0.0.1:5432/{name}?connect_timeout=5",
             "hostaddr=127.0.0.1 port=5432 dbname={name} application_name=other")

INTO_ITSELF = """
[into_itself]
src_db = {src}
dst_db = {dst}
pgq_queue_name = events
"""

CYCLE = """
[a_to_b]
src_db = {a}
dst_db = {b}
pgq_queue_name = events
dst_queue_name = central

[b_to_a]
src_db = {b2}
dst_db = {a2}
pgq_queue_name = central
dst_queue_name = events
"""


def refusals(*command: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "qmover", *command], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("qmover: error:")]


def test_a_route_into_its_own_source_queue_is_refused_at_install_and_every_start(make_db, tmp_path):
    db = make_db()
    db.create_queue("events")
    config = tmp_path / "loop.ini"
    config.write_text(INTO_ITSELF.format(src=SPELLINGS[0].format(name=db.name), dst=SPELLINGS[1].format(name=db.name)))

    for command in (("install",), ("run", "--once"), ("run",), ("worker",)):
        [line] = refusals(*command, str(config))
        assert f"route into_itself: its target is its own source, queue 'events' in database '{db.name}'" in line
    assert db.value("select count(*) from pgq.get_consumer_info()") == 0  # install did nothing

    db.execute("".join(resources.files("qmover.pg").joinpath(part).read_text()  # what install would add
                       for part in ("schema.sql", "claims.sql")))
    [outcome] = Mover().move(load_config(config).select(), budget=10)  # checked too when a mover opens it
    assert "its target is its own source" in str(outcome.error)


def test_another_queue_of_the_same_database_is_no_loop(make_db, tmp_path):
    db = make_db()
    db.create_queue("events")
    db.create_queue("archive")
    config = tmp_path / "same-db.ini"
    config.write_text(INTO_ITSELF.format(src=db.dsn, dst=db.dsn) + "dst_queue_name = archive\n")
    run_qmover("install", str(config), check=True)
    db.produce_series("events", 10)
    db.tick("events")
    run_qmover("run", "--once", str(config), check=True)
    assert len(db.events("archive")) == 10


def test_two_routes_in_a_cycle_are_refused(make_db, tmp_path):
    a, b = make_db(), make_db()
    for db in (a, b):
        db.create_queue("events")
        db.create_queue("central")
    config = tmp_path / "cycle.ini"
    config.write_text(CYCLE.format(a=SPELLINGS[0].format(name=a.name), b=SPELLINGS[0].format(name=b.name),
                                   a2=SPELLINGS[2].format(name=a.name), b2=SPELLINGS[1].format(name=b.name)))

    for command in (("install",), ("run", "--once"), ("worker",), ("install", "--route", "a_to_b")):
        [line] = refusals(*command, str(config))
        assert "routes a_to_b, b_to_a form a cycle" in line or "routes b_to_a, a_to_b form a cycle" in line
        assert f"{a.name}/events into {b.name}/central" in line
    for db in (a, b):
        assert db.value("select count(*) from pgq.get_consumer_info()") == 0
