"""Ticks and maintenance for databases that run no pgqd.

pgq.ticker() closes batches on every queue of a database; the steps of
pgq.maint_operations() rotate event tables, re-queue retry events and vacuum
PgQ's tables, each in its own transaction, as pgqd does them.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmover.config.route import Route
from qmover.pg import db, queries
from qmover.pg.connector import Connector, Session
from qmover.pg.db import Side


@dataclass(frozen=True)
class Ticked:
    queues: int  # queues that got a new tick
    maintenance_steps: int


def tick(route: Route, side: Side, connector: Connector) -> Ticked:
    """Tick every queue of one side of a route, then run the due maintenance, on
    the process's connection to that database (as a mover's, so a worker keeps
    one per database for both)."""
    return connector.run(route, side, _tick)


def _tick(session: Session) -> Ticked:
    conn = session.conn
    ticked = db.scalar(conn, queries.TICK_ALL_QUEUES) or 0
    with conn.cursor() as cur:
        cur.execute(queries.MAINT_OPERATIONS)
        steps = cur.fetchall()
    for func_name, func_arg in steps:
        with conn.cursor() as cur:
            cur.execute(queries.maint_call(func_name, func_arg),
                        None if func_arg is None or func_name.lower() == "vacuum" else (func_arg,))
    return Ticked(ticked, len(steps))
