"""Lost position is refused; rewind, reset and unregister put things right."""

from __future__ import annotations

import json


def consumer_info(route) -> tuple:
    return route.src.execute(
        "select last_tick, current_batch from pgq.get_consumer_info(%s, %s)",
        (route.src_queue, route.name))[0]


def move_batches(route, count: int) -> list[int]:
    """Produce and move count batches of 10 events; return their end ticks."""
    ticks = []
    for n in range(count):
        route.src.produce_series(route.src_queue, 10, tag=f"m{n}-")
        ticks.append(route.src.tick(route.src_queue))
    route.qmover("run", "--once", check=True)
    return ticks


def test_target_ahead_is_lost_position_and_nothing_moves(route):
    move_batches(route, 1)
    route.dst.execute("select pgq_ext.set_last_tick(%s, 9999)", (route.name,))
    route.src.produce_series(route.src_queue, 10, tag="late")
    route.src.tick(route.src_queue)
    before_target = route.target_events()
    last_tick_before, _ = consumer_info(route)

    result = route.qmover("run", "--once")

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert "lost position" in errors[0] and "tick 9999" in errors[0]
    assert "qmover rewind" in errors[0] and "qmover reset" in errors[0]
    assert "Traceback" not in result.stderr
    assert route.target_events() == before_target
    last_tick, batch = consumer_info(route)
    assert last_tick == last_tick_before and batch is not None  # batch not finished


def test_target_restored_from_backup_is_recovered_by_rewind(route):
    ticks = move_batches(route, 3)
    # The target comes back from a backup taken after the first batch.
    route.dst.execute("delete from pgq.event_1 where ev_data not like 'm0-%%'")
    route.dst.execute("select pgq_ext.set_last_tick(%s, %s)", (route.name, ticks[0]))
    route.src.produce_series(route.src_queue, 10, tag="m3-")
    route.src.tick(route.src_queue)

    lost = route.qmover("run", "--once")
    assert lost.returncode == 1 and "lost position" in lost.stderr

    rewound = route.qmover("rewind", check=True)
    assert f"moved to tick {ticks[0]}" in rewound.stdout
    route.qmover("run", "--once", check=True)

    assert sorted(route.target_events()) == sorted(route.source_events())
    assert len(route.target_events()) == 40


def test_reset_drops_a_wrong_target_position(route):
    move_batches(route, 2)
    route.dst.execute("select pgq_ext.set_last_tick(%s, 424242)", (route.name,))
    route.src.produce_series(route.src_queue, 10, tag="after")
    route.src.tick(route.src_queue)
    assert route.qmover("run", "--once").returncode == 1

    reset = route.qmover("reset", check=True)
    assert "target position" in reset.stdout and "cleared" in reset.stdout
    assert route.dst.last_tick(route.name) is None
    route.qmover("run", "--once", check=True)

    assert route.target_events() == route.source_events()
    assert route.dst.last_tick(route.name) == consumer_info(route)[0]


def test_rewind_without_target_position_says_so(route):
    result = route.qmover("rewind")
    assert result.returncode == 1
    assert "no position recorded" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unregister_then_install_starts_afresh(route):
    move_batches(route, 1)

    result = route.qmover("unregister", check=True)
    assert "unregistered" in result.stdout
    assert route.dst.last_tick(route.name) is None
    status = route.qmover("status", "--json")
    assert status.returncode == 1
    assert "not registered" in json.loads(status.stdout)[0]["error"]

    route.dst.execute("select pgq_ext.set_last_tick(%s, 12345)", (route.name,))  # stale leftovers
    route.qmover("install", check=True)  # a new registration clears them, as skytools does
    assert route.dst.last_tick(route.name) is None
    route.src.produce_series(route.src_queue, 5, tag="new")
    route.src.tick(route.src_queue)
    route.qmover("run", "--once", check=True)
    assert len(route.target_events()) == 15


def test_status_reports_positions_and_backlog(route):
    move_batches(route, 1)
    route.src.produce_series(route.src_queue, 25, tag="waiting")
    route.src.tick(route.src_queue, force=False)

    rows = json.loads(route.qmover("status", "--json", check=True).stdout)

    assert len(rows) == 1
    row = rows[0]
    assert row["route"] == route.name and row["error"] is None
    assert row["pending_events"] == 25
    assert row["target_last_tick"] == row["source_last_tick"]
    assert row["lag_seconds"] >= 0
    text = route.qmover("status", check=True).stdout
    assert text.splitlines()[0].split() == ["route", "lag_s", "pending", "src_tick", "dst_tick", "batch",
                                            "moved", "filtered", "held_s"]
    assert route.name in text.splitlines()[1]
    assert (row["events_moved"], row["events_filtered"]) == (10, 0)  # counted by run, in Redis


def test_target_reset_resumes_from_the_source_with_a_warning(route):
    move_batches(route, 2)
    kept = route.target_events()
    route.dst.execute("delete from pgq_ext.completed_tick")  # e.g. pgq_ext recreated on the target
    route.src.produce_series(route.src_queue, 10, tag="after")
    route.src.tick(route.src_queue)

    result = route.qmover("run", "--once", check=True)

    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "held no position" in warnings[0] and "reset" in warnings[0]
    assert sorted(route.target_events()) == sorted(route.source_events())  # each event once
    assert len(route.target_events()) == len(kept) + 10
    assert route.dst.last_tick(route.name) == consumer_info(route)[0]


def test_only_a_new_routes_first_batch_says_it_held_no_position(route):
    runs = []
    for n in range(2):
        route.src.produce_series(route.src_queue, 10, tag=f"r{n}-")
        route.src.tick(route.src_queue)
        runs.append(route.qmover("run", "--once", check=True).stderr)

    assert "held no position" in runs[0] and "held no position" not in runs[1]
