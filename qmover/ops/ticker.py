"""Ticks and maintenance for databases that run no pgqd.

pgq.ticker() closes batches on every queue of a database; the steps of
pgq.maint_operations() rotate event tables, re-queue retry events and vacuum
PgQ's tables, each in its own transaction, as pgqd does them.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmover.config.route import Route
from qmover.pg import queries
from qmover.pg.connector import Connector
from qmover.pg.db import Side
from qmover.pg.queries import Ticker
from qmover.pg.session import Link


@dataclass(frozen=True)
class Ticked:
    queues: int  # queues that got a new tick
    maintenance_steps: int


def tick(route: Route, side: Side, connector: Connector) -> Ticked:
    """Tick every queue of one side of a route, then run the due maintenance, on
    the process's connection to that database (as a mover's, so a worker keeps
    one per database for both)."""
    return connector.run(route, side, _tick)


def _tick(link: Link) -> Ticked:
    ticked = link.value(Ticker.TICK_ALL_QUEUES) or 0
    steps = link.rows(Ticker.MAINT_OPERATIONS)
    for func_name, func_arg in steps:
        link.run(queries.maint_call(func_name, func_arg), arg=func_arg)
    return Ticked(ticked, len(steps))
