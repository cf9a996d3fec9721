"""Every SQL statement qmover sends, and every advisory lock it takes, in one place.

A Statement is named once, by the attribute it is assigned to, and says how
it is sent: PREPAREd once per connection and then executed by name, or as
its text each time (qmover.pg.session sends both).  Values travel as
parameters (%(name)s); identifiers that come from outside (an event table,
a split field) are quoted with psycopg2.sql.  Statements are grouped by who
sends them: Checks, Source, Target, Claims, Status, Ticker, Admin.
"""

from __future__ import annotations

import re
from functools import cached_property
from textwrap import dedent

from psycopg2 import sql

from qmover.config.route import Route

_PARAMETER = re.compile(r"%\((\w+)\)s|%%")


class Statement:
    """One statement: its text, with %(name)s parameters, and how it is sent.

    prepared: PREPAREd once per connection (its parameters cast in the text,
    as PREPARE needs their types), then sent as `execute qmover_NAME(...)`:
    planning the hot statements once per connection saves a tenth of a
    small batch's time.
    """

    _names: set[str] = set()

    def __init__(self, text: str, prepared: bool = False):
        self.text = dedent(text).strip()
        self.prepared = prepared
        self.name = ""

    def __set_name__(self, owner: type, attribute: str) -> None:
        name = f"qmover_{attribute.lower()}"
        assert name not in Statement._names, f"two statements named {name}"
        Statement._names.add(name)
        self.name = name

    def __repr__(self) -> str:
        return f"<Statement {self.name}>"

    @cached_property
    def parameters(self) -> tuple[str, ...]:
        """The parameter names, in the order of their first use."""
        found = (match.group(1) for match in _PARAMETER.finditer(self.text) if match.group(1))
        return tuple(dict.fromkeys(found))

    @cached_property
    def preparation(self) -> str:
        """PREPARE qmover_NAME AS the text, each parameter as its $n."""
        numbers = {name: n for n, name in enumerate(self.parameters, 1)}
        body = _PARAMETER.sub(lambda m: f"${numbers[m.group(1)]}" if m.group(1) else "%", self.text)
        return f"prepare {self.name} as {body}"

    @cached_property
    def call(self) -> str:
        """What is sent to run it: its name with the parameters when it is PREPAREd, else its text."""
        if not self.prepared:
            return self.text
        return f"execute {self.name}({', '.join(f'%({name})s' for name in self.parameters)})"


class Lock:
    """An advisory lock's name: the lock of one thing is hashtextextended(name || thing, 0).

    The names are what earlier releases took: a mover of this release and
    one of an earlier release keep each other out."""

    def __init__(self, name: str):
        self.name = name

    def key(self, thing: str) -> str:
        """The bigint key of the lock of thing (an SQL expression: a column or a parameter)."""
        return f"hashtextextended('{self.name}' || {thing}, 0)"


# Callers of next_batch for one consumer, one at a time (transaction lock, on the source).
NEXT_LOCK = Lock("qmover-next:")
# Movers of one consumer, one at a time inside the target transaction (transaction lock).
CONSUMER_LOCK = Lock("qmover:")

# The columns a consumer can see, in COPY order.  ev_id and ev_txid are
# assigned by the target queue, as skytools' queue_mover did.
EVENT_COLUMNS = ("ev_time", "ev_type", "ev_data", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4")
# The pgq_writer path's and the split path's temporary table (see Target.CREATE_INCOMING).
INCOMING = "qmover_incoming"
# A pgq_ext schema qmover made (pgq_ext.sql sets this comment): install may bring it up to date.
PGQ_EXT_COMMENT = "pgq_ext-compatible position tracking, installed by qmover"
# The tick wake on a source (wake.sql): its trigger on pgq.tick, the
# trigger's function, and the channel it NOTIFYs.
WAKE_TRIGGER = "qmover_wake"
WAKE_FUNCTION = ("qmover", "notify_tick")
WAKE_CHANNEL = "qmover_tick"
_HAS_WAKE = f"""
    exists (select 1 from pg_catalog.pg_trigger
             where tgrelid = to_regclass('pgq.tick') and tgname = '{WAKE_TRIGGER}' and tgenabled <> 'D')
"""
_HAS_TICK_API = """
    to_regprocedure('pgq_ext.get_last_tick(text)') is not null
    and to_regprocedure('pgq_ext.set_last_tick(text, bigint)') is not null
"""


class Session:
    """Every connection, once, when it opens."""

    # Text COPY carries timestamps and text: both ends must agree on their spelling.
    SETUP = Statement("set datestyle to iso, ymd")
    # The server's end of db.DEAD_PEER (over a Unix socket the server ignores them).
    DEAD_PEER = Statement("""
        select set_config('tcp_keepalives_idle', %(keepalives_idle)s, false),
               set_config('tcp_keepalives_interval', %(keepalives_interval)s, false),
               set_config('tcp_keepalives_count', %(keepalives_count)s, false),
               set_config('tcp_user_timeout', %(tcp_user_timeout)s, false)
    """)
    PING = Statement("select 1")


class Transaction:
    """The target transaction is spelt out, so that each of its steps is one round trip."""

    BEGIN = Statement("begin")
    COMMIT = Statement("commit")
    ROLLBACK = Statement("rollback")
    # The finish alone: if a source crash loses its commit, the batch comes back
    # and is skipped, since the target recorded its end tick.
    NO_FLUSH_WAIT = Statement("set local synchronous_commit to off")


class Checks:
    """What must hold before a route moves (qmover.pg.checks)."""

    HAS_SCHEMA = Statement("select exists (select 1 from pg_catalog.pg_namespace where nspname = %(schema)s)")
    HAS_QUEUE = Statement("select exists (select 1 from pgq.queue where queue_name = %(queue)s)")
    HAS_TICK_API = Statement(f"select {_HAS_TICK_API}")
    # Plain tables, not pgq.get_consumer_info(): that one counts pending events,
    # 4 ms a call on a busy source, and every worker process asks it per route.
    IS_REGISTERED = Statement("""
        select exists (select 1 from pgq.subscription s
                         join pgq.queue q on q.queue_id = s.sub_queue
                         join pgq.consumer c on c.co_id = s.sub_consumer
                        where q.queue_name = %(queue)s and c.co_name = %(consumer)s)
    """)
    # Which server and database a connection reached, whatever its DSN says
    # (pg_control_system() is open to every role).
    BACKEND = Statement("select pg_backend_pid()")
    SERVER_IDENTITY = Statement("select system_identifier::text, current_database() from pg_control_system()")
    # COPY into the event table needs INSERT on it and USAGE on the queue's event
    # id sequence (pgq_admin has both); a role with only pgq_writer cannot.
    CAN_COPY_INTO_QUEUE = Statement("""
        select has_table_privilege(pgq.current_event_table(q.queue_name), 'INSERT')
           and has_sequence_privilege(q.queue_event_seq, 'USAGE')
          from pgq.queue q where q.queue_name = %(queue)s
    """)
    IS_QUEUE_WRITER = Statement("""
        select has_function_privilege('pgq.current_event_table(text)', 'EXECUTE')
           and has_function_privilege('pgq.insert_event(text, text, text, text, text, text, text)', 'EXECUTE')
    """)


class Source:
    """The source side of a move, and beat's readiness sweep."""

    # One round trip: take the next batch and the SELECT over its events.  The
    # assignment is committed (autocommit), so a crash later gets the same batch.
    # Callers for one consumer queue up on NEXT_LOCK, taken while the
    # queue-name argument is computed, before next_batch_custom runs: otherwise
    # two callers can both see "no batch", and the later one replaces the batch
    # the earlier one was handed.  keep_lag and min_interval are seconds.
    # more: a tick past the batch's end, so a task asks again at once; without
    # one it moves on to its other routes and sends the finish alone.
    # merge: with a number of events, the ticks waiting past the consumer's
    # position, when there are several, are taken as one batch of up to about
    # that many events (PgQ's batch collection, asked for the span from the
    # position to the latest tick: pgq.find_tick_helper then takes the latest
    # tick, or the first that reaches merge events); one tick waiting takes
    # PgQ's plain path.  Without merge: one tick's events, or what min_count /
    # min_interval collect.  The span is read in the statement's snapshot,
    # which may predate the lock: a mover that finished a batch meanwhile makes
    # it too long, and this call then finds no batch, never a wrong one.
    NEXT_BATCH = Statement(f"""
        with serialize as materialized (
            select pg_advisory_xact_lock({NEXT_LOCK.key("%(consumer)s::text")})),
        waiting as materialized (
            select latest.tick_time - last.tick_time as span
              from serialize, pgq.queue q
              join pgq.subscription s on s.sub_queue = q.queue_id
              join pgq.consumer c on c.co_id = s.sub_consumer
              join pgq.tick last on last.tick_queue = q.queue_id and last.tick_id = s.sub_last_tick
              cross join lateral (select t.tick_time from pgq.tick t where t.tick_queue = q.queue_id
                                   order by t.tick_id desc limit 1) latest
             where %(merge)s::int4 is not null and q.queue_name = %(queue)s::text and c.co_name = %(consumer)s::text
               and (select count(*) from (select from pgq.tick t where t.tick_queue = q.queue_id
                                             and t.tick_id > s.sub_last_tick limit 2) two) = 2)
        select b.batch_id, b.prev_tick_id, b.cur_tick_id,
               case when b.batch_id is not null then pgq.batch_event_sql(b.batch_id) end,
               b.cur_tick_event_seq - b.prev_tick_event_seq, b.cur_tick_event_seq,
               b.batch_id is not null and exists (
                   select 1 from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue
                    where q.queue_name = %(queue)s::text and t.tick_id > b.cur_tick_id)
          from pgq.next_batch_custom((select %(queue)s::text from serialize), %(consumer)s::text,
                                     %(keep_lag)s::float8 * interval '1 second',
                                     coalesce(%(min_count)s::int4, (select %(merge)s::int4 from waiting)),
                                     coalesce(%(min_interval)s::float8 * interval '1 second',
                                              (select span from waiting))) b
    """, prepared=True)
    # Sent before NEXT_BATCH in its round trip, for the batch moved before: its
    # commit is flushed anyway, and a rollback leaves the batch to come back and
    # be skipped.  Finishing a batch that is no longer active only warns.
    FINISH = Statement("select pgq.finish_batch(%(finish)s::int8)", prepared=True)
    ACTIVE_BATCH = Statement("select current_batch from pgq.get_consumer_info(%(queue)s, %(consumer)s)")
    # The readiness sweep, once per source database: where each consumer of
    # queues[i], consumers[i] stands.  batch_age: seconds since its open batch
    # was taken (none open: null); waiting: seconds since the first tick past
    # its position (none: null); events_ahead and seconds_ahead: from its
    # position to the queue's latest tick, what pgq_batch_collect_events /
    # _interval compare.  A consumer missing here counts as ready, a broken one
    # too, so that its mover says what is wrong.  Last, whether the tick wake's
    # trigger is there, on every row and on a row of nulls when no consumer is
    # found: a listening sweep learns it with no round trip of its own.
    SWEEP_STATE = Statement(f"""
        select st.*, w.wake
          from (select {_HAS_WAKE} as wake) w
          left join lateral (
            select q.queue_name, c.co_name,
                   case when s.sub_batch is not null then extract(epoch from now() - s.sub_active)::float8 end,
                   extract(epoch from now() - nxt.tick_time)::float8,
                   latest.tick_event_seq - last.tick_event_seq,
                   extract(epoch from latest.tick_time - last.tick_time)::float8
              from unnest(%(queues)s::text[], %(consumers)s::text[]) r(queue, consumer)
              join pgq.queue q on q.queue_name = r.queue
              join pgq.consumer c on c.co_name = r.consumer
              join pgq.subscription s on s.sub_queue = q.queue_id and s.sub_consumer = c.co_id
              join pgq.tick last on last.tick_queue = s.sub_queue and last.tick_id = s.sub_last_tick
              left join lateral (select t.tick_time from pgq.tick t
                                  where t.tick_queue = s.sub_queue and t.tick_id > s.sub_last_tick
                                  order by t.tick_id limit 1) nxt on true
              left join lateral (select t.tick_time, t.tick_event_seq from pgq.tick t
                                  where t.tick_queue = s.sub_queue order by t.tick_id desc limit 1) latest on true
          ) st on true
    """, prepared=True)
    # Beat's sweep connection listens for the tick wake, once per connection,
    # before its first read of the state (a tick after that read is heard).
    LISTEN = Statement(f"listen {WAKE_CHANNEL}")


class Target:
    """The target transaction of a move: three round trips."""

    # CONSUMER_LOCK serializes movers of one consumer; the position is read by
    # the next statement, whose snapshot is taken after the lock is held.
    # txid_current() takes the transaction's id before the event table is chosen:
    # PgQ's readers stop reading a queue's previous event table for ids above its
    # rotation's second step, and a transaction gets its id at its first write,
    # too late when a rotation ran between the choice of table and the COPY.
    LOCK = Statement(f"select pg_advisory_xact_lock({CONSUMER_LOCK.key('%(consumer)s::text')}), txid_current()",
                     prepared=True)
    # queue: null for a split route, whose events pick their queues.
    POSITION = Statement("""
        select pgq_ext.get_last_tick(%(consumer)s::text),
               case when %(queue)s::text is not null then pgq.current_event_table(%(queue)s::text) end
    """, prepared=True)
    RECORD = Statement("select pgq_ext.set_last_tick(%(consumer)s::text, %(tick)s::int8)", prepared=True)
    # Kept event ids bypass the target's event sequence; moving it past them
    # (forward only) lets the target's ticker see the new events.  Every id of a
    # batch is at most the source sequence's value at the batch's end tick.
    ADVANCE_EVENT_SEQ = Statement(
        "select pgq.seq_setval(queue_event_seq, %(last_event_seq)s) from pgq.queue where queue_name = %(queue)s")
    # The pgq_writer path and the split path: COPY into this session's
    # temporary table (made once per connection, outside any transaction),
    # then on to the queue, server-side, in the same transaction.
    CREATE_INCOMING = Statement(f"""
        create temporary table if not exists {INCOMING} (
            ev_time timestamptz, ev_type text, ev_data text,
            ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text
        ) on commit delete rows
    """)
    INCOMING_TO_QUEUE = Statement(f"""
        select count(pgq.insert_event(%(queue)s, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4))
          from {INCOMING}
    """)
    # Which of the candidate names are queues, with the table each writes to now.
    QUEUE_TABLES = Statement(
        "select queue_name, pgq.current_event_table(queue_name) from pgq.queue where queue_name = any(%(names)s)")


class Claims:
    """The route claim (qmover.protocol.claim): leases in qmover.claim on the
    target (claims.sql), each taken by one session and renewed by it."""

    # A claim whose deadline passed, or whose session ended, may be taken over.
    LIVE = "c.until > now() and c.backend in (select pid from pg_stat_activity)"
    _TAKE = f"""
        on conflict (kind, name) do update
           set holder = excluded.holder, backend = excluded.backend, since = excluded.since, until = excluded.until
         where not ({LIVE})
    """
    # The consumers of these routes that this session now holds.
    CLAIM = Statement(f"""
        insert into qmover.claim as c (kind, name, holder, backend, since, until)
        select 'route', consumer, %(holder)s, pg_backend_pid(), now(), now() + %(lease)s * interval '1 second'
          from (select distinct unnest(%(consumers)s::text[])) r(consumer)
        {_TAKE}
        returning c.name
    """)
    # The first free place among a capped source database's `places` mover
    # connections: a row when it was taken.  Two movers that pick the same
    # free place at once: one gets it, the other none this time.
    TAKE_PLACE = Statement(f"""
        insert into qmover.claim as c (kind, name, holder, backend, since, until)
        select 'place', %(source)s || ' ' || place, %(holder)s, pg_backend_pid(), now(),
               now() + %(lease)s * interval '1 second'
          from generate_series(0, %(places)s - 1) place
         where not exists (select 1 from qmover.claim c where c.kind = 'place'
                              and c.name = %(source)s || ' ' || place and {LIVE})
         limit 1
        {_TAKE}
        returning c.name
    """)
    # Every claim of this session gets a new deadline; the routes it still holds.
    RENEW = Statement("""
        update qmover.claim c set until = now() + %(lease)s * interval '1 second'
         where c.backend = pg_backend_pid()
        returning c.kind, c.name
    """)
    # Giving back keeps the row, with no session and its deadline passed: when a
    # route was last taken tells the sweep whether the task it sent has run.
    # Each returns what it gave back, as every claim statement returns rows.
    _GIVE_BACK = "update qmover.claim set backend = 0, until = now() where backend = pg_backend_pid()"
    RELEASE = Statement(f"{_GIVE_BACK} and kind = 'route' and name = any(%(consumers)s) returning name")
    RELEASE_ALL = Statement(f"{_GIVE_BACK} returning kind, name")
    # The sweep and status, once per target database, for each of these
    # consumers: who holds it now, for how many seconds, and when a mover last
    # took it (epoch seconds, or null), with the server's clock.
    CLAIMED = Statement(f"""
        select r.consumer, case when {LIVE} then c.holder end, extract(epoch from now() - c.since)::float8,
               extract(epoch from c.since)::float8, extract(epoch from now())::float8
          from unnest(%(consumers)s::text[]) r(consumer)
          left join qmover.claim c on c.kind = 'route' and c.name = r.consumer
    """, prepared=True)


class Status:
    """`qmover status` and the metrics' gauges: each database asked once."""

    # Once per source database: every queue, with each of its consumers.
    SOURCE = Statement("""
        select q.queue_name, i.consumer_name,
               extract(epoch from i.lag)::float8, extract(epoch from i.last_seen)::float8,
               i.last_tick, i.current_batch, i.pending_events
          from pgq.queue q left join pgq.get_consumer_info() i on i.queue_name = q.queue_name
    """)
    # Once per target database: what is installed, then queues and positions.
    TARGET_SCHEMAS = Statement(f"""
        select to_regnamespace('pgq') is not null, to_regnamespace('pgq_ext') is not null, ({_HAS_TICK_API}),
               to_regclass('qmover.claim') is not null
    """)
    QUEUE_NAMES = Statement("select queue_name from pgq.queue")
    LAST_TICKS = Statement(
        "select consumer, pgq_ext.get_last_tick(consumer) from unnest(%(consumers)s::text[]) consumer")


class Ticker:
    """Ticks and maintenance for databases without pgqd."""

    TICK_ALL_QUEUES = Statement("select pgq.ticker()")
    MAINT_OPERATIONS = Statement("select func_name, func_arg from pgq.maint_operations()")


class Admin:
    """install, rewind, reset, unregister."""

    HAS_CLAIMS = Statement("select to_regclass('qmover.claim') is not null")
    HAS_WAKE = Statement(f"select {_HAS_WAKE}")
    # The tick wake goes with the database's last consumer (unregister).
    OTHER_CONSUMERS = Statement("""
        select count(*) from pgq.subscription s
          join pgq.consumer c on c.co_id = s.sub_consumer
          join pgq.queue q on q.queue_id = s.sub_queue
         where not (q.queue_name = %(queue)s and c.co_name = %(consumer)s)
    """)
    DROP_WAKE = Statement(f"""
        drop trigger if exists {WAKE_TRIGGER} on pgq.tick;
        drop function if exists {".".join(WAKE_FUNCTION)}()
    """)
    PGQ_EXT_MADE_BY_QMOVER = Statement("select obj_description('pgq_ext'::regnamespace, 'pg_namespace') = %(comment)s")
    REGISTER = Statement("select pgq.register_consumer(%(queue)s, %(consumer)s)")
    REGISTER_AT = Statement("select pgq.register_consumer_at(%(queue)s, %(consumer)s, %(tick)s)")
    UNREGISTER = Statement("select pgq.unregister_consumer(%(queue)s, %(consumer)s)")
    GET_LAST_TICK = Statement("select pgq_ext.get_last_tick(%(consumer)s)")
    SET_LAST_TICK = Statement("select pgq_ext.set_last_tick(%(consumer)s, %(tick)s)")


def maint_call(func_name: str, func_arg: str | None) -> sql.Composed:
    """One step that pgq.maint_operations() asked for, the way pgqd runs it
    (its argument, if any, as %(arg)s).

    Names come from PgQ itself ('pgq.maint_rotate_tables_step1', 'vacuum', ...);
    they are still quoted as identifiers.
    """
    if func_name.lower() == "vacuum" and func_arg is not None:
        return sql.SQL("vacuum {}").format(sql.Identifier(*func_arg.split(".")))
    function = sql.Identifier(*func_name.split("."))
    if func_arg is None:
        return sql.SQL("select {}()").format(function)
    return sql.SQL("select {}(%(arg)s)").format(function)


def split_values(field: str) -> sql.Composed:
    """The split path: each value of the field among the incoming events, with its count."""
    return sql.SQL("select {}, count(*) from {} group by 1").format(sql.Identifier(field), sql.Identifier(INCOMING))


def split_insert(field: str, event_table: str) -> sql.Composed:
    """The incoming events whose field is one of %(values)s (or NULL, with %(with_null)s)."""
    schema, _, table = event_table.rpartition(".")
    columns = sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS))
    return sql.SQL("insert into {} ({}) select {} from {}"
                   " where {} = any(%(values)s) or (%(with_null)s and {} is null)").format(
        sql.Identifier(schema, table), columns, columns, sql.Identifier(INCOMING), sql.Identifier(field),
        sql.Identifier(field))


def copy_batch_out(route: Route) -> tuple[sql.Composed, sql.Composed]:
    """COPY of the batch's visible columns that pass the route's filters, as
    the text before and after the batch's SELECT (pgq.batch_event_sql(), made
    by the source server for each batch).

    Binary, as copy_events_in() reads it: the servers neither print nor parse
    timestamps and text (0.25 ms less for 100 events, about 8 % of the batch),
    and each converts text through its connection's client encoding.  COPY
    takes no parameters, so the filter values are literals quoted by the driver.
    """
    return (sql.SQL("copy (select {} from (").format(_columns(route)),
            sql.SQL(") as batch where {}) to stdout (format binary)").format(event_filter(route)))


def count_batch(batch_event_sql: str) -> sql.Composed:
    """All events of the batch, filtered or not: what a filter left out is the difference."""
    return sql.SQL("select count(*) from ({}) as batch").format(sql.SQL(batch_event_sql))


def event_filter(route: Route) -> sql.Composable:
    """type_filter as LIKE patterns on ev_type; table_filter on ev_extra1, an
    unqualified name there meaning public.name (skytools' rule)."""
    conditions: list[sql.Composable] = []
    if route.type_filter:
        patterns = [name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
                    for name in route.type_filter]
        conditions.append(sql.SQL("batch.ev_type like any ({})").format(sql.Literal(patterns)))
    if route.table_filter:
        conditions.append(sql.SQL(
            "(case when strpos(batch.ev_extra1, '.') > 0 then batch.ev_extra1"
            " else 'public.' || batch.ev_extra1 end) = any ({})").format(sql.Literal(list(route.table_filter))))
    return sql.SQL(" and ").join(conditions) if conditions else sql.SQL("true")


def copy_events_in(event_table: str, route: Route) -> sql.Composed:
    """COPY into 'schema.table' (pgq.current_event_table()) or a plain table name."""
    schema, _, table = event_table.rpartition(".")
    target = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    return sql.SQL("copy {} ({}) from stdin (format binary)").format(target, _columns(route))


def _columns(route: Route) -> sql.Composable:
    """The columns a batch carries: ev_id too when the route keeps event ids."""
    names = ("ev_id", *EVENT_COLUMNS) if route.keep_event_id else EVENT_COLUMNS
    return sql.SQL(", ").join(map(sql.Identifier, names))
