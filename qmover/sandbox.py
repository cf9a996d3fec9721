"""Databases the demo and the benchmark make for themselves on a server."""

from __future__ import annotations

from contextlib import closing

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection


def connect(server: str, database: str, autocommit: bool = True) -> connection:
    conn = psycopg2.connect(f"{server} dbname={database}")
    conn.autocommit = autocommit
    return conn


def run_sql(server: str, database: str, *statements: object) -> list[tuple]:
    """Run statements in autocommit on a fresh connection; the last one's rows."""
    rows: list[tuple] = []
    with closing(connect(server, database)) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
            rows = cur.fetchall() if cur.description else []
    return rows


def drop_database(server: str, name: str) -> None:
    run_sql(server, "postgres", sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def recreate_database(server: str, name: str) -> None:
    drop_database(server, name)
    run_sql(server, "postgres", sql.SQL("create database {}").format(sql.Identifier(name)))
