"""Several routes moved in turn by the move loop (qmover.protocol.mover), failed at the points it touches.

Three partitions into one central queue, moved in this process by one
mover: one route's source or the shared target fails mid-loop, kept
connections die between loops, a loop ends with finishes to send.  Each
time every event arrives exactly once.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from contextlib import closing

import pytest
from psycopg2 import sql

from qmover.config import load_config
from qmover.errors import TransientError
from qmover.pg.connector import Connector, Loan
from qmover.pg.queries import Claims
from qmover.protocol import claim as claim_module
from qmover.protocol.mover import Mover
from qmover_lab.connections import QMOVER

from celery_helpers import wait_until
from conftest import ROUTE, claim_as_another_mover, let_go_as_another_mover, partitions_and_central, run_qmover


@pytest.fixture
def three(make_db, tmp_path, request):
    """Three routes; a batch for each tick unless the test's name says merged."""
    parts, central = partitions_and_central(make_db, 3)
    config = tmp_path / "three.ini"
    extra = "" if "merged" in request.node.name else "merge_ticks = 0"
    config.write_text("".join(ROUTE.format(n=n, src=part.dsn, dst=central.dsn, interval=1, extra=extra)
                              for n, part in enumerate(parts)))
    run_qmover("install", str(config), check=True)
    with closing(Mover()) as mover:
        yield parts, central, load_config(config).select(), mover


def produce(parts, batches: int, tag: str) -> None:
    for b in range(batches):
        for n, part in enumerate(parts):
            part.produce_series("events", 10, size=20, tag=f"{tag}{b}p{n}-")
            part.tick("events")


def exactly_once(parts, central) -> None:
    assert Counter(central.events("central_events")) == Counter(e for part in parts for e in part.events("events"))


def open_batch(part, consumer: str):
    return part.value("select current_batch from pgq.get_consumer_info('events', %s)", (consumer,))


def no_live_claims(central) -> None:
    """Wait until the server has seen every claiming session of the test's end."""
    wait_until(lambda: central.value(f"select count(*) from qmover.claim c where {Claims.LIVE}") == 0, 10,
               "the closed sessions' backends to end")


def backend_of(database) -> None:
    database.execute(f"select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and {QMOVER}",
                     (database.name,))


def test_one_loop_moves_every_ready_batch_of_each_route_and_finishes_the_last(three):
    parts, central, routes, mover = three
    produce(parts, 3, "a")
    outcomes = mover.move(routes, 10)
    assert [(o.batches, o.events, o.error) for o in outcomes] == [(3, 30, None)] * 3
    assert all(open_batch(part, route.consumer) is None for part, route in zip(parts, routes, strict=True))
    exactly_once(parts, central)
    assert mover.connector.idle_count() == 4  # one connection per database, given back


def test_one_loop_moves_each_routes_waiting_ticks_merged_as_one_batch(three):
    parts, central, routes, mover = three
    produce(parts, 3, "m")
    outcomes = mover.move(routes, 10)
    assert [(o.batches, o.events, o.error) for o in outcomes] == [(1, 30, None)] * 3
    exactly_once(parts, central)


def test_a_source_lost_mid_loop_fails_only_its_route(three):
    parts, central, routes, mover = three
    produce(parts, 2, "b")

    def lose_source(route, step: str) -> None:
        if route is routes[1] and step == "after_target_commit":
            backend_of(parts[1])  # batch 1 applied, not finished

    outcomes = mover.move(routes, 10, checkpoint=lose_source)
    assert isinstance(outcomes[1].error, TransientError) and outcomes[1].error.side == "source"
    assert (outcomes[0].batches, outcomes[2].batches) == (2, 2)  # the others went on, on the shared target
    assert open_batch(parts[1], routes[1].consumer) is not None

    again = mover.move(routes, 10)
    assert (again[1].batches, again[1].skipped, again[1].error) == (1, 1, None)  # batch 1 found applied
    exactly_once(parts, central)


def test_the_shared_target_lost_mid_loop_stops_every_route_and_nothing_is_half_done(three):
    parts, central, routes, mover = three
    produce(parts, 2, "c")
    lost = []

    def lose_target(route, step: str) -> None:
        if route is routes[1] and step == "position" and not lost:
            lost.append(route)
            backend_of(central)  # the connection that holds every route's claim

    outcomes = mover.move(routes, 10, checkpoint=lose_target)
    assert isinstance(outcomes[1].error, TransientError) and outcomes[1].error.side == "target"
    assert outcomes[0].batches == 1 and outcomes[2].batches == 0  # no route moved on without its claim
    no_live_claims(central)  # they ended with the session

    mover.move(routes, 10)
    exactly_once(parts, central)


def test_connections_that_died_between_loops_are_replaced_at_once(three):
    parts, central, routes, mover = three
    produce(parts, 1, "d")
    mover.move(routes, 10)
    for database in (*parts, central):  # a restart of the server while the connections sat idle
        backend_of(database)
    produce(parts, 1, "e")
    outcomes = mover.move(routes, 10)
    assert [(o.batches, o.error) for o in outcomes] == [(1, None)] * 3
    exactly_once(parts, central)


def test_routes_held_by_another_mover_are_left_to_it(three):
    parts, central, routes, mover = three
    produce(parts, 1, "f")
    with closing(central.connect()) as other, other.cursor() as cur:  # another process's claim on part1
        claim_as_another_mover(cur, routes[1].consumer)
        outcomes = mover.move(routes, 10)
        assert [o.busy for o in outcomes] == [False, True, False]
        assert [o.batches for o in outcomes] == [1, 0, 1]
        let_go_as_another_mover(cur)
    assert mover.move(routes, 10)[1].batches == 1
    exactly_once(parts, central)


def test_a_kept_mover_lets_go_of_its_claims_and_survives_dropped_connections(route):
    """What a worker process's mover does between tasks: one mover at a time on a
    route, the claim let go at the end of each loop while the connections stay
    open, and kept connections the server dropped meanwhile replaced at once."""
    kept, other = Mover(), Mover()
    routes = [route.route()]
    meanwhile = []

    def other_tries(_route, step: str) -> None:
        if step == "position" and not meanwhile:
            meanwhile.append(other.move(routes, 10)[0])

    try:
        route.src.produce_series(route.src_queue, 5, tag="first")
        route.src.tick(route.src_queue)
        [first] = kept.move(routes, 10, checkpoint=other_tries)
        assert meanwhile[0].busy and meanwhile[0].batches == 0  # one mover at a time
        assert (first.events, first.error) == (5, None)
        assert kept.connector.idle_count() == 2  # given back, kept open

        route.src.produce_series(route.src_queue, 5, tag="other")
        route.src.tick(route.src_queue)
        assert other.move(routes, 10)[0].events == 5  # the claim was let go
        other.close()
        for database in (route.src, route.dst):  # e.g. a server restart between two tasks
            database.execute(f"select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and {QMOVER}",
                             (database.name,))

        route.src.produce_series(route.src_queue, 5, tag="again")
        route.src.tick(route.src_queue)
        [third] = kept.move(routes, 10)  # its kept connections replaced at once, no error
        assert (third.events, third.error) == (5, None)
        assert route.target_events() == route.source_events()
    finally:
        kept.close()
        other.close()


def test_a_claim_is_taken_over_once_its_lease_ran_out_or_its_session_ended(three):
    parts, central, routes, mover = three
    produce(parts, 1, "g")
    with closing(central.connect()) as other, other.cursor() as cur:  # a mover that stopped renewing
        claim_as_another_mover(cur, routes[0].consumer)
        assert mover.move(routes[:1], 10)[0].busy
        cur.execute("update qmover.claim set until = now() - interval '1 second'")
        assert mover.move(routes[:1], 10)[0].batches == 1  # its session is still open
    with closing(central.connect()) as other, other.cursor() as cur:
        claim_as_another_mover(cur, routes[1].consumer)
    no_live_claims(central)  # its session ended: the claim with it, once the server has seen the backend go
    assert mover.move(routes[1:2], 10)[0].batches == 1
    exactly_once(parts[:2], central)


def test_a_mover_whose_lease_another_took_lets_that_route_go(three, monkeypatch):
    parts, central, routes, mover = three
    produce(parts, 3, "h")
    monkeypatch.setattr(claim_module, "RENEW_EVERY", 0)  # renewed before every round
    other = central.connect()
    taken = []

    def take_over(route, step: str) -> None:
        if route is routes[1] and step == "after_target_commit" and not taken:
            taken.append(route)
            with other.cursor() as cur:  # as if this mover's lease ran out under a long batch
                cur.execute("update qmover.claim set until = now() - interval '1 second'"
                            " where kind = 'route' and name = %s", (route.consumer,))
                claim_as_another_mover(cur, route.consumer)

    try:
        outcomes = mover.move(routes, 10, checkpoint=take_over)
        assert [o.batches for o in outcomes] == [3, 1, 3]  # the taken route stopped at its first batch
        assert central.value("select holder from qmover.claim where name = %s", (routes[1].consumer,)) == \
            "another mover"  # and its release left the new holder's claim alone
    finally:
        other.close()
    no_live_claims(central)
    mover.move(routes, 10)
    exactly_once(parts, central)


def test_a_movers_sessions_give_up_a_silent_peer_on_both_ends(three):
    """libpq's keepalives and tcp_user_timeout, and the server's own for the session, unless the DSN says."""
    _, _, routes, mover = three
    said = dataclasses.replace(routes[0], dst_dsn=routes[0].dst_dsn + " keepalives_idle=30 tcp_user_timeout=0")
    with Loan(Connector(max_idle=0)) as loan:
        for route, side, idle, user_timeout in ((routes[0], "target", "5", "10000"), (said, "target", "30", "0")):
            link = loan.link(route, side)
            client = link.session.conn.get_dsn_parameters()
            server = [link.value(sql.SQL(f"show {name}")) for name in
                      ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")]
            assert (client["keepalives_idle"], client["tcp_user_timeout"]) == (idle, user_timeout)
            assert server == [idle, "2", "3", user_timeout]
            loan.discard(route, side)
