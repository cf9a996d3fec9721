"""Beat's schedule and the tasks' arguments, without a server: one database
is one database however many logins reach it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qmover.config import load_config
from qmover.config.route import by_database
from qmover.errors import QmoverError
from qmover.tasks import app, beat_schedule
from qmover.tasks.names import TICK_TASK

TWO_LOGINS = """
[qmover]
broker_url = redis://127.0.0.1:6379/0

[alice_route]
src_db = host=127.0.0.1 port=5432 dbname=shop user=alice
dst_db = host=127.0.0.1 port=5432 dbname=central
pgq_queue_name = orders
dst_queue_name = central
ticker = source

[bob_route]
src_db = dbname=shop user=bob password=secret host=127.0.0.1 port=5432
dst_db = host=127.0.0.1 port=5432 dbname=central
pgq_queue_name = payments
dst_queue_name = central
ticker = source
"""


def two_logins(tmp_path: Path):
    path = tmp_path / "routes.ini"
    path.write_text(TWO_LOGINS)
    return load_config(path)


def test_one_database_reached_as_two_users_is_ticked_once(tmp_path):
    ticks = [entry for entry in beat_schedule(two_logins(tmp_path)).values() if entry["task"] == TICK_TASK]
    assert [entry["args"] for entry in ticks] == [("alice_route", "source")]


def test_routes_are_grouped_by_database_whoever_logs_in(tmp_path):
    routes = list(two_logins(tmp_path).routes.values())
    assert [[route.name for route in group] for group in by_database(routes, "source")] == [
        ["alice_route", "bob_route"]]
    other = replace(routes[1], src_dsn="host=127.0.0.1 port=5433 dbname=shop")
    assert len(by_database([routes[0], other], "source")) == 2


def test_a_tick_task_for_a_side_that_is_neither_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QMOVER_CONFIG", str(two_logins(tmp_path).path))  # qmover's app reads it once
    result = app.tasks[TICK_TASK].apply(("alice_route", "sorce"))
    assert isinstance(result.result, QmoverError)
    assert str(result.result) == "tick_database: side is 'source' or 'target', not 'sorce'"
