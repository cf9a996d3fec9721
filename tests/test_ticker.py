"""The built-in ticker for databases without pgqd: ticks and maintenance."""

from __future__ import annotations

import time
from contextlib import closing

from qmover.config import load_config
from qmover.ops import ticker
from qmover.pg.connector import Connector

from celery_helpers import wait_until


def test_tick_closes_batches_and_runs_maintenance(route):
    src = route.src
    src.execute("select pgq.set_queue_config('eventlog', 'ticker_max_count', '1')")
    src.execute("select pgq.set_queue_config('eventlog', 'rotation_period', '1 second')")
    src.produce_series("eventlog", 25)
    configured = load_config(route.config).select()[0]
    table_before = src.value("select queue_cur_table from pgq.queue where queue_name = 'eventlog'")
    connector = Connector()

    first = ticker.tick(configured, "source", connector)
    assert first.queues >= 1
    route.qmover("run", "--once", check=True)
    assert len(route.target_events()) == 25

    time.sleep(1.2)  # past the rotation period, with the consumer caught up
    steps = []

    def rotated() -> bool:
        """A round of ticks and maintenance.  PgQ holds a rotation back while the
        consumer's last tick saw a transaction older than the last rotation (any
        transaction of the cluster, another test run's too): then the consumer
        moves on to a newer tick and maintenance runs again."""
        src.produce_series("eventlog", 1)
        steps.append(ticker.tick(configured, "source", connector).maintenance_steps)
        if src.value("select queue_cur_table from pgq.queue where queue_name = 'eventlog'") != table_before:
            return True
        route.qmover("run", "--once", check=True)
        return False

    wait_until(rotated, 60, "the event table to rotate", every=0.5)
    assert max(steps) >= 2  # rotate step 1 and step 2 at least
    route.qmover("run", "--once", check=True)
    with closing(connector):
        ticker.tick(configured, "source", connector)
        assert connector.idle_count() == 1  # one kept connection served every tick
    route.qmover("run", "--once", check=True)
    assert sorted(route.target_events()) == sorted(route.source_events())
    assert len(route.target_events()) == 25 + len(steps)
