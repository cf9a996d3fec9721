"""Beat's schedule and the tasks' arguments, without a server: one database
is one database however many logins reach it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from celery.beat import PersistentScheduler

from qmover.config import load_config
from qmover.config.route import by_database
from qmover.errors import QmoverError
from qmover.tasks import app, beat_schedule
from qmover.tasks.names import SWEEP_TASK, TICK_TASK
from qmover.tasks.schedule import SteadyScheduler, celery_settings

from beat_loop import beat_app, steady

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


def routes_file(tmp_path: Path, text: str):
    path = tmp_path / "routes.ini"
    path.write_text(text)
    return load_config(path)


FAN_IN = """
[qmover]
broker_url = {broker}

[part]
partitions = 0-5
src_db = host=127.0.0.1 dbname=part%(partition)s
dst_db = host=127.0.0.1 dbname=central
pgq_queue_name = events
ticker = source
ticker_interval = 2

[slow]
src_db = host=127.0.0.1 dbname=archive
dst_db = host=127.0.0.1 dbname=central
pgq_queue_name = events
move_interval = 10
ticker = both
"""


def test_a_sweep_per_interval_each_of_a_slice_of_its_sources_and_a_tick_per_database(tmp_path):
    schedule = beat_schedule(routes_file(tmp_path, FAN_IN.format(broker="redis://127.0.0.1:6379/2")))
    sweeps = {name: entry for name, entry in schedule.items() if entry["task"] == SWEEP_TASK}
    assert sweeps == {
        "qmover sweep every 1s": {"task": SWEEP_TASK, "schedule": 0.25, "args": (1.0,),  # 6 sources, 4 slices
                                  "options": {"queue": "qmover", "expires": 0.25}},
        "qmover sweep every 10s": {"task": SWEEP_TASK, "schedule": 10.0, "args": (10.0,),  # 1 source, 1 slice
                                   "options": {"queue": "qmover", "expires": 10.0}}}
    ticks = sorted((entry["args"], entry["schedule"]) for entry in schedule.values() if entry["task"] == TICK_TASK)
    # each partition's source every 2 s; archive's source and central (slow's target, once) every 1 s
    assert ticks == sorted([((f"part_{n}", "source"), 2.0) for n in range(6)]
                           + [(("slow", "source"), 1.0), (("slow", "target"), 1.0)])
    assert all(entry["options"]["expires"] == entry["schedule"] for entry in schedule.values())


def test_qmover_app_acks_late_prefetches_one_and_keeps_redbeat_lock_in_a_redis(tmp_path):
    on_redis = celery_settings(routes_file(tmp_path, FAN_IN.format(broker="redis://127.0.0.1:6379/2")))
    assert (on_redis["task_acks_late"], on_redis["task_reject_on_worker_lost"], on_redis["worker_prefetch_multiplier"]
            ) == (True, True, 1)
    assert on_redis["task_default_queue"] == "qmover" and on_redis["task_routes"] == {"qmover.*": {"queue": "qmover"}}
    assert on_redis["redbeat_redis_url"] == "redis://127.0.0.1:6379/2"
    rabbit = FAN_IN.format(broker="amqp://guest@127.0.0.1//\nmetrics_url = redis://h:6379/4")
    on_rabbit = celery_settings(routes_file(tmp_path, rabbit))
    assert (on_rabbit["result_backend"], on_rabbit["redbeat_redis_url"]) == (None, "redis://h:6379/4")


def test_qmovers_beat_sleeps_until_an_entry_is_due_where_celerys_own_spins(tmp_path):
    assert celery_settings(two_logins(tmp_path))["beat_scheduler"] == "qmover.tasks.schedule:SteadyScheduler"
    assert steady(str(tmp_path / "steady.db")).sleeps_until_due
    # What the class is for: with an entry 5 ms from due, Celery's own returns
    # less than nothing, which beat's loop takes as "ask again now", ms after ms.
    celerys = PersistentScheduler(app=beat_app(), schedule_filename=str(tmp_path / "celery.db"))
    assert celerys.adjust(0.005) < 0 < SteadyScheduler.adjust(celerys, 0.005)
    celerys.close()
