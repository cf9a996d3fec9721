"""keep_event_id: the source's ev_id on the target, and a target ticker that sees the events."""

from __future__ import annotations

from conftest import run_qmover

WITH_IDS = "ev_id, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time"


def keep_ids(route) -> None:
    route.config.write_text(route.config.read_text() + "keep_event_id = 1\n")


def produce(route, batches: int) -> None:
    for n in range(batches):
        route.src.produce_series(route.src_queue, 25, tag=f"b{n}-")
        route.src.tick(route.src_queue)


def test_event_ids_are_kept_and_the_target_ticker_sees_them(route):
    keep_ids(route)
    route.src.execute("select setval(queue_event_seq, 5000) from pgq.queue where queue_name = %s",
                      (route.src_queue,))  # source ids far from the target's own
    route.dst.execute("select pgq.set_queue_config(%s, 'ticker_max_count', '1')", (route.dst_queue,))
    route.dst.execute("select pgq.set_queue_config(%s, 'ticker_max_lag', '1 hour')", (route.dst_queue,))
    # a second tick: from now on pgq.ticker() ticks only when the event sequence says there are new events
    assert route.dst.value("select pgq.ticker(%s)", (route.dst_queue,)) is not None
    assert route.dst.value("select pgq.ticker(%s)", (route.dst_queue,)) is None
    route.dst.execute("select pgq.register_consumer(%s, 'reader')", (route.dst_queue,))
    produce(route, 3)

    route.qmover("run", "--once", check=True)

    moved = route.dst.events(route.dst_queue, WITH_IDS)
    assert moved == route.src.events(route.src_queue, WITH_IDS) and len(moved) == 75
    assert moved[0][0] > 5000
    # the ticker counts events by the event sequence: it must have moved past the kept ids
    assert route.dst.value("select pgq.ticker(%s)", (route.dst_queue,)) is not None
    batch = route.dst.value("select pgq.next_batch(%s, 'reader')", (route.dst_queue,))
    assert route.dst.value("select count(*) from pgq.get_batch_events(%s)", (batch,)) == 75


def test_crash_after_target_commit_with_kept_ids_is_exactly_once(route):
    keep_ids(route)
    produce(route, 2)

    route.crash_at("after_target_commit")
    route.qmover("run", "--once", check=True)

    assert route.counters()["skipped"] == 1  # already applied
    assert route.dst.events(route.dst_queue, WITH_IDS) == route.src.events(route.src_queue, WITH_IDS)


def test_kept_ids_on_a_shared_target_queue_are_refused(route):
    text = route.config.read_text()
    second = text.replace("[queue_mover3]", "[second]").replace("job_name = eventlog_to_target_mover",
                                                                "job_name = second_mover")
    route.config.write_text(text + "keep_event_id = yes\n\n" + second)

    result = run_qmover("run", "--once", str(route.config))

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"qmover: error: {route.config}: [queue_mover3] keep_event_id: [second] and [queue_mover3] write to the "
        "same target queue 'copy_of_eventlog', where kept event ids would collide; give the route a target "
        "queue of its own or set keep_event_id = 0"]


def test_kept_ids_in_a_queue_a_split_route_maps_to_are_refused(route):
    split = (f"\n[splitter]\nsrc_db = {route.src.dsn}\ndst_db = {route.dst.dsn}\npgq_queue_name = eventlog\n"
             "split_field = ev_type\nsplit_map = order:copy_of_eventlog\n")
    route.config.write_text(route.config.read_text() + "keep_event_id = 1\n" + split)

    result = run_qmover("run", "--once", str(route.config))

    assert result.returncode == 2
    assert "[queue_mover3] keep_event_id: [splitter] and [queue_mover3] write to the same target queue " \
           "'copy_of_eventlog'" in result.stderr
