"""Statements name themselves once and are sent one of two ways; lock names
are written once.  Without a server: the text each way is what is checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qmover.pg import queries
from qmover.pg.queries import CONSUMER_LOCK, NEXT_LOCK, Lock, Statement

PACKAGE = Path(__file__).resolve().parents[2] / "qmover"
GROUPS = (queries.Session, queries.Transaction, queries.Checks, queries.Source, queries.Target, queries.Claims,
          queries.Status, queries.Ticker, queries.Admin)


def every_statement() -> list[Statement]:
    return [value for group in GROUPS for value in vars(group).values() if isinstance(value, Statement)]


class Example:
    PICK = Statement("select %(b)s::int + %(a)s::int, %(b)s::int, 'x%%'", prepared=True)
    PLAIN = Statement("select %(a)s")


def test_a_statement_is_named_by_its_attribute():
    assert (Example.PICK.name, Example.PLAIN.name) == ("qmover_pick", "qmover_plain")
    assert queries.Source.NEXT_BATCH.name == "qmover_next_batch"


def test_no_two_statements_share_a_name_and_every_one_has_one():
    names = [statement.name for statement in every_statement()]
    assert all(names) and len(names) == len(set(names))
    with pytest.raises(Exception) as raised:  # Python 3.11 wraps what __set_name__ raises in a RuntimeError
        type("Again", (), {"PICK": Statement("select 1")})
    assert "two statements named qmover_pick" in f"{raised.value} {raised.value.__cause__}"


def test_a_prepared_statement_numbers_its_parameters_in_order_of_first_use():
    assert Example.PICK.parameters == ("b", "a")
    assert Example.PICK.preparation == "prepare qmover_pick as select $1::int + $2::int, $1::int, 'x%'"
    assert Example.PICK.call == "execute qmover_pick(%(b)s, %(a)s)"


def test_a_statement_not_prepared_is_sent_as_its_text():
    assert Example.PLAIN.call == Example.PLAIN.text == "select %(a)s"


def test_every_parameter_of_a_prepared_statement_carries_its_type():
    for statement in every_statement():
        if statement.prepared:
            body = statement.preparation
            untyped = re.findall(r"\$\d+(?!\d|::)", body)
            assert not untyped, (statement.name, untyped)


def test_lock_names_are_the_earlier_releases_and_written_once():
    assert [lock.name for lock in (NEXT_LOCK, CONSUMER_LOCK)] == ["qmover-next:", "qmover:"]
    assert Lock("n:").key("c") == "hashtextextended('n:' || c, 0)"
    written = {lock.name: 0 for lock in (NEXT_LOCK, CONSUMER_LOCK)}
    for path in PACKAGE.rglob("*.py"):
        for name in written:
            written[name] += path.read_text().count(f'"{name}"') + path.read_text().count(f"'{name}'")
    assert written == dict.fromkeys(written, 1)  # in queries.py, each once


def test_the_statements_that_take_a_lock_use_its_key():
    assert queries.Claims.LIVE in queries.Claims.CLAIMED.text  # the sweep sees the claims a mover may not take
    assert queries.Claims.LIVE in queries.Claims.CLAIM.text and queries.Claims.LIVE in queries.Claims.TAKE_PLACE.text
    assert NEXT_LOCK.key("%(consumer)s::text") in queries.Source.NEXT_BATCH.text
    assert CONSUMER_LOCK.key("%(consumer)s::text") in queries.Target.LOCK.text


def test_maintenance_steps_are_quoted_identifiers():
    step = queries.maint_call("pgq.maint_rotate_tables_step1", "q")
    assert step.seq[1].strings == ("pgq", "maint_rotate_tables_step1") and "%(arg)s" in str(step.seq[2])
    vacuum = queries.maint_call("vacuum", "pgq.event_1")
    assert [type(part).__name__ for part in vacuum.seq] == ["SQL", "Identifier"]
    assert vacuum.seq[1].strings == ("pgq", "event_1")
    call = queries.maint_call("pgq.maint_retry_events", None)
    assert call.seq[1].strings == ("pgq", "maint_retry_events")
