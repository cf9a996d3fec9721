"""What qmover decides to say and to show, without a server: driver errors as
one line with their fix, DSNs without their passwords, how an event picks
its queue, and the command line's own choices."""

from __future__ import annotations

import click
import psycopg2.errors
import pytest

from qmover.cli import format_status, logger_level
from qmover.config import Route
from qmover.config.route import Split, by_database, database_of, describe_dsn
from qmover.errors import QmoverError, TransientError
from qmover.pg.db import first_line, translate, where

ROUTE = Route(name="r", consumer="r", src_dsn="host=db1 port=5433 dbname=shop user=mover password=s3cret",
              dst_dsn="host=db2 dbname=central", src_queue="events", dst_queue="central")


def driver_error(kind: type[psycopg2.Error], text: str) -> psycopg2.Error:
    return kind(text)


def test_a_dsn_is_shown_without_its_password_or_other_options():
    assert describe_dsn(ROUTE.src_dsn) == "host=db1 port=5433 dbname=shop user=mover"
    assert describe_dsn("dbname=x sslmode=require options='-c x=1'") == "dbname=x"
    assert describe_dsn("") == "(libpq defaults)"
    assert where(ROUTE, "source") == "route r: source database (host=db1 port=5433 dbname=shop user=mover)"
    assert "s3cret" not in where(ROUTE, "source")


def test_one_database_is_one_database_whoever_logs_in_however_it_is_spelt():
    assert database_of("host=db1 dbname=shop user=a password=x") == database_of("dbname=shop host=db1 user=b")
    assert database_of("host=db1 dbname=shop") != database_of("host=db1 port=5433 dbname=shop")
    other = Route(name="o", consumer="o", src_dsn="dbname=shop port=5433 host=db1 user=other",
                  dst_dsn="host=db3 dbname=central", src_queue="events", dst_queue="central")
    assert [[r.name for r in group] for group in by_database([ROUTE, other], "source")] == [["r", "o"]]
    assert [[r.name for r in group] for group in by_database([ROUTE, other], "target")] == [["r"], ["o"]]


def test_a_driver_message_is_cut_to_its_first_line_without_its_prefix():
    assert first_line(driver_error(psycopg2.Error, "ERROR:  relation x does not exist\nLINE 1: ...")) == (
        "relation x does not exist")
    assert first_line(driver_error(psycopg2.Error, "")) == "Error"


@pytest.mark.parametrize(("kind", "text", "expected", "says"), [
    (psycopg2.OperationalError, "server closed the connection unexpectedly", TransientError,
     "route r: target database (host=db2 dbname=central): connection failed: server closed the connection"),
    (psycopg2.InterfaceError, "connection already closed", TransientError, "connection failed"),
    (psycopg2.errors.QueryCanceled, "canceling statement due to statement timeout", QmoverError,
     "a batch must fit in one statement: raise statement_timeout for qmover's role"),
    (psycopg2.errors.UntranslatableCharacter, "character with byte sequence 0xe2 has no equivalent", QmoverError,
     "create the target database with encoding UTF8"),
    (psycopg2.errors.UndefinedTable, "relation pgq.queue does not exist", QmoverError,
     "route r: target database (host=db2 dbname=central): relation pgq.queue does not exist"),
])
def test_a_driver_error_becomes_one_line_that_names_route_side_and_fix(kind, text, expected, says):
    error = translate(driver_error(kind, text), ROUTE, "target")
    assert type(error) is expected and error.side == "target"
    assert says in str(error) and "\n" not in str(error)


def test_a_timeout_is_not_a_connection_error_to_retry():
    assert not isinstance(translate(driver_error(psycopg2.errors.QueryCanceled, "x"), ROUTE, "source"),
                          TransientError)


def test_an_event_picks_its_queue_by_map_by_name_or_by_the_unknown_rule():
    mapped = Split("ev_extra1", (("orders", "orders_q"), ("pay", "pay_q")), "skip")
    assert mapped.queue_for("orders", set()) == "orders_q"
    assert mapped.queue_for("users", {"users"}) is None  # with a map, only mapped values are known
    assert mapped.known_queues == ("orders_q", "pay_q")
    by_name = Split("ev_type", (), "misc_q")
    assert by_name.queue_for("users", {"users"}) == "users"
    assert by_name.queue_for("nobody", {"users"}) == by_name.queue_for(None, {"users"}) == "misc_q"
    assert by_name.known_queues == ("misc_q",)
    with pytest.raises(LookupError):
        Split("ev_type").queue_for("nobody", set())


def test_log_levels_name_a_qmover_logger_and_a_level():
    assert logger_level(None, None, ("qmover.protocol.mover=warning", "qmover.pg=DEBUG")) == {  # type: ignore[arg-type]
        "qmover.protocol.mover": 30, "qmover.pg": 10}
    for wrong in ("qmover.pg", "celery=DEBUG", "qmover.pg=LOUD"):
        with pytest.raises(click.BadParameter, match="write a qmover logger and a level"):
            logger_level(None, None, (wrong,))  # type: ignore[arg-type]


def test_status_shows_a_dash_where_a_figure_is_unknown_and_each_error_on_a_line():
    rows = [{"route": "r", "lag_seconds": 1.25, "pending_events": 3, "source_last_tick": 7, "target_last_tick": 7,
             "current_batch": None, "events_moved": 10, "events_filtered": 0, "error": None,
             "held_seconds": 4.4, "held_too_long": None},
            {"route": "hung", "lag_seconds": 90.0, "pending_events": 3, "source_last_tick": 7, "target_last_tick": 6,
             "current_batch": 5, "events_moved": 10, "events_filtered": 0, "error": None,
             "held_seconds": 95.0, "held_too_long": "route hung: held by h pid 7 for 95 s, beyond ..."},
            {"route": "broken", "lag_seconds": None, "pending_events": None, "source_last_tick": None,
             "target_last_tick": None, "current_batch": None, "events_moved": None, "events_filtered": None,
             "error": "route broken: source database (dbname=x): cannot connect",
             "held_seconds": None, "held_too_long": None}]
    assert format_status(rows).splitlines() == [
        "route   lag_s  pending  src_tick  dst_tick  batch  moved  filtered  held_s",
        "r       1.2    3        7         7         -      10     0         4",
        "hung    90.0   3        7         6         5      10     0         95",
        "broken  -      -        -         -         -      -      -         -",
        "error: route broken: source database (dbname=x): cannot connect",
        "warning: route hung: held by h pid 7 for 95 s, beyond ..."]
