"""Every SQL statement qmover sends, in one place.

Values travel as query parameters; the only identifier that comes from
outside (the target event table) is quoted with psycopg2.sql.Identifier.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg2 import sql
from psycopg2.extensions import connection

from qmover.config.route import Route

# The columns a consumer can see, in COPY order.  ev_id and ev_txid are
# assigned by the target queue, as skytools' queue_mover did.
EVENT_COLUMNS = ("ev_time", "ev_type", "ev_data", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4")

SESSION_SETUP = "set datestyle to iso, ymd"

# --- checks -------------------------------------------------------------
HAS_SCHEMA = "select exists (select 1 from pg_catalog.pg_namespace where nspname = %s)"
# A pgq_ext schema qmover made (pgq_ext.sql sets this comment): install may bring it up to date.
PGQ_EXT_MADE_BY_QMOVER = "select obj_description('pgq_ext'::regnamespace, 'pg_namespace') = %s"
PGQ_EXT_COMMENT = "pgq_ext-compatible position tracking, installed by qmover"
HAS_QUEUE = "select exists (select 1 from pgq.queue where queue_name = %s)"
HAS_TICK_API = """
    select to_regprocedure('pgq_ext.get_last_tick(text)') is not null
       and to_regprocedure('pgq_ext.set_last_tick(text, bigint)') is not null
"""
# Plain tables, not pgq.get_consumer_info(): that one counts pending events,
# 4 ms a call on a busy source, and every worker process asks it per route.
IS_REGISTERED = """
    select exists (select 1 from pgq.subscription s
                     join pgq.queue q on q.queue_id = s.sub_queue
                     join pgq.consumer c on c.co_id = s.sub_consumer
                    where q.queue_name = %s and c.co_name = %s)
"""
# Which server and database a connection reached, whatever its DSN says
# (pg_control_system() is open to every role).
SERVER_IDENTITY = "select system_identifier::text, current_database() from pg_control_system()"

# --- source side --------------------------------------------------------
# One round trip: take the next batch and the SELECT over its events.  The
# assignment is committed (autocommit), so a crash later gets the same batch.
# Callers for one consumer queue up on an advisory lock, taken while the
# queue-name argument is computed, before next_batch_custom runs: otherwise
# two callers can both see "no batch", and the later one replaces the batch
# the earlier one was handed.
# PREPAREd once per source connection (db.prepare_once): planning it for each
# batch cost 0.13 ms of a 100-event batch's 2.5 ms.  $3 and $5 are seconds.
NEXT_BATCH_STATEMENT = "qmover_next_batch"
# more: a tick past the batch's end, so a task asks again at once; without
# one it moves on to its other routes and sends the finish alone.
# $6, merge: with a number of events, the ticks waiting past the consumer's
# position, when there are several, are taken as one batch of up to about
# that many events (PgQ's batch collection, asked for the span from the
# position to the latest tick: pgq.find_tick_helper then takes the latest
# tick, or the first that reaches $6 events); one tick waiting takes PgQ's
# plain path.  Without $6: one tick's events, or what $4/$5 collect.  The
# span is read in the statement's snapshot, which may predate the lock: a
# mover that finished a batch meanwhile makes it too long, and this call
# then finds no batch, never a wrong one.
NEXT_BATCH_SELECT = """
    with serialize as materialized (
        select pg_advisory_xact_lock(hashtextextended('qmover-next:' || $2::text, 0))),
    waiting as materialized (
        select latest.tick_time - last.tick_time as span
          from serialize, pgq.queue q
          join pgq.subscription s on s.sub_queue = q.queue_id
          join pgq.consumer c on c.co_id = s.sub_consumer
          join pgq.tick last on last.tick_queue = q.queue_id and last.tick_id = s.sub_last_tick
          cross join lateral (select t.tick_time from pgq.tick t where t.tick_queue = q.queue_id
                               order by t.tick_id desc limit 1) latest
         where $6::int4 is not null and q.queue_name = $1::text and c.co_name = $2::text
           and (select count(*) from (select from pgq.tick t where t.tick_queue = q.queue_id
                                         and t.tick_id > s.sub_last_tick limit 2) two) = 2)
    select b.batch_id, b.prev_tick_id, b.cur_tick_id,
           case when b.batch_id is not null then pgq.batch_event_sql(b.batch_id) end,
           b.cur_tick_event_seq - b.prev_tick_event_seq, b.cur_tick_event_seq,
           b.batch_id is not null and exists (
               select 1 from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue
                where q.queue_name = $1::text and t.tick_id > b.cur_tick_id)
      from pgq.next_batch_custom((select $1::text from serialize), $2::text, $3::float8 * interval '1 second',
                                 coalesce($4::int4, (select $6::int4 from waiting)),
                                 coalesce($5::float8 * interval '1 second', (select span from waiting))) b
"""
NEXT_BATCH = (f"execute {NEXT_BATCH_STATEMENT}"
              "(%(queue)s, %(consumer)s, %(keep_lag)s, %(min_count)s, %(min_interval)s, %(merge)s)")
ACTIVE_BATCH = "select current_batch from pgq.get_consumer_info(%s, %s)"
# The readiness sweep, once per source database (PREPAREd; $1, $2: the routes'
# queues and consumers): where each consumer stands.  batch_age: seconds
# since its open batch was taken (none open: null); waiting: seconds since
# the first tick past its position (none: null); events_ahead and
# seconds_ahead: from its position to the queue's latest tick, what
# pgq_batch_collect_events/_interval compare.  A consumer missing here counts
# as ready, a broken one too, so that its mover says what is wrong.
SWEEP_STATE_STATEMENT = "qmover_sweep_state"
SWEEP_STATE_EXECUTE = f"execute {SWEEP_STATE_STATEMENT}(%s, %s)"
SWEEP_STATE = """
    select q.queue_name, c.co_name, s.sub_last_tick,
           case when s.sub_batch is not null then extract(epoch from now() - s.sub_active)::float8 end,
           extract(epoch from now() - nxt.tick_time)::float8,
           latest.tick_event_seq - last.tick_event_seq,
           extract(epoch from latest.tick_time - last.tick_time)::float8
      from unnest($1::text[], $2::text[]) r(queue, consumer)
      join pgq.queue q on q.queue_name = r.queue
      join pgq.consumer c on c.co_name = r.consumer
      join pgq.subscription s on s.sub_queue = q.queue_id and s.sub_consumer = c.co_id
      join pgq.tick last on last.tick_queue = s.sub_queue and last.tick_id = s.sub_last_tick
      left join lateral (select t.tick_time from pgq.tick t
                          where t.tick_queue = s.sub_queue and t.tick_id > s.sub_last_tick
                          order by t.tick_id limit 1) nxt on true
      left join lateral (select t.tick_time, t.tick_event_seq from pgq.tick t
                          where t.tick_queue = s.sub_queue order by t.tick_id desc limit 1) latest on true
"""
# Without waiting for the flush: if a source crash loses this commit, the
# batch comes back and is skipped, since the target recorded its end tick.
FINISH_STATEMENT = "qmover_finish"
FINISH = "select pgq.finish_batch($1::int8)"
FINISH_BATCH = f"begin; set local synchronous_commit to off; execute {FINISH_STATEMENT}(%(finish)s); commit"
# The batch moved before, finished in the transaction that takes the next one:
# its commit is flushed anyway, and a rollback leaves the batch to come back
# and be skipped.  Finishing a batch that is no longer active only warns.
FINISH_AND_NEXT_BATCH = f"execute {FINISH_STATEMENT}(%(finish)s);" + NEXT_BATCH
REGISTER = "select pgq.register_consumer(%s, %s)"
REGISTER_AT = "select pgq.register_consumer_at(%s, %s, %s)"
UNREGISTER = "select pgq.unregister_consumer(%s, %s)"
# status, once per source database: every queue, with each of its consumers.
SOURCE_STATE = """
    select q.queue_name, i.consumer_name,
           extract(epoch from i.lag)::float8, extract(epoch from i.last_seen)::float8,
           i.last_tick, i.current_batch, i.pending_events
      from pgq.queue q left join pgq.get_consumer_info() i on i.queue_name = q.queue_name
"""
# status, once per target database: what is installed, then queues and positions.
TARGET_SCHEMAS = f"""
    select to_regnamespace('pgq') is not null, to_regnamespace('pgq_ext') is not null, ({HAS_TICK_API})
"""
QUEUE_NAMES = "select queue_name from pgq.queue"
LAST_TICKS = "select consumer, pgq_ext.get_last_tick(consumer) from unnest(%s::text[]) consumer"
# --- ticker (for databases without pgqd) --------------------------------
TICK_ALL_QUEUES = "select pgq.ticker()"
MAINT_OPERATIONS = "select func_name, func_arg from pgq.maint_operations()"


def maint_call(func_name: str, func_arg: str | None) -> sql.Composable:
    """One step that pgq.maint_operations() asked for, the way pgqd runs it.

    Names come from PgQ itself ('pgq.maint_rotate_tables_step1', 'vacuum', ...);
    they are still quoted as identifiers, and the argument is a parameter.
    """
    if func_name.lower() == "vacuum" and func_arg is not None:
        return sql.SQL("vacuum {}").format(sql.Identifier(*func_arg.split(".")))
    function = sql.Identifier(*func_name.split("."))
    if func_arg is None:
        return sql.SQL("select {}()").format(function)
    return sql.SQL("select {}(%s)").format(function)


# --- target side: one transaction, three round trips ----------------------
# The advisory lock serializes movers of one consumer; the position is read
# by the next statement, whose snapshot is taken after the lock is held.
# txid_current() takes the transaction's id before the event table is chosen.
# PgQ's readers stop reading a queue's previous event table for ids above its
# rotation's second step, and a transaction gets its id at its first write:
# too late when a rotation ran between the choice of table and the COPY.
# Both statements are PREPAREd once per target connection ($1 consumer, $2
# queue: null for a split route), as is the record of the position.
LOCK_STATEMENT = "qmover_lock"
LOCK = "select pg_advisory_xact_lock(hashtextextended('qmover:' || $1::text, 0)), txid_current()"
POSITION_STATEMENT = "qmover_position"
POSITION = """
    select pgq_ext.get_last_tick($1::text),
           case when $2::text is not null then pgq.current_event_table($2::text) end
"""
BEGIN_AND_READ_POSITION = (f"begin; execute {LOCK_STATEMENT}(%(consumer)s); "
                           f"execute {POSITION_STATEMENT}(%(consumer)s, %(queue)s)")
# Kept event ids bypass the target's event sequence; moving it past them
# (forward only) lets the target's ticker see the new events.  Every id of a
# batch is at most the source sequence's value at the batch's end tick.
ADVANCE_EVENT_SEQ = "select pgq.seq_setval(queue_event_seq, %s) from pgq.queue where queue_name = %s"
RECORD_STATEMENT = "qmover_record"
RECORD = "select pgq_ext.set_last_tick($1::text, $2::int8)"
RECORD_POSITION_AND_COMMIT = f"execute {RECORD_STATEMENT}(%s, %s); commit"
TARGET_STATEMENTS = ((LOCK_STATEMENT, LOCK), (POSITION_STATEMENT, POSITION), (RECORD_STATEMENT, RECORD))
ROLLBACK = "rollback"

# COPY into the event table needs INSERT on it and USAGE on the queue's event
# id sequence (pgq_admin has both); a role with only pgq_writer cannot.
CAN_COPY_INTO_QUEUE = """
    select has_table_privilege(pgq.current_event_table(q.queue_name), 'INSERT')
       and has_sequence_privilege(q.queue_event_seq, 'USAGE')
      from pgq.queue q where q.queue_name = %s
"""
IS_QUEUE_WRITER = """
    select has_function_privilege('pgq.current_event_table(text)', 'EXECUTE')
       and has_function_privilege('pgq.insert_event(text, text, text, text, text, text, text)', 'EXECUTE')
"""
# The pgq_writer path: COPY into a session's temporary table, then one
# pgq.insert_event per row, server-side, in the same transaction.
INCOMING = "qmover_incoming"
CREATE_INCOMING = f"""
    create temporary table if not exists {INCOMING} (
        ev_time timestamptz, ev_type text, ev_data text,
        ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text
    ) on commit delete rows
"""
INCOMING_TO_QUEUE = f"""
    select count(pgq.insert_event(%s, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4))
      from {INCOMING}
"""

# The split path: the batch is COPYed into INCOMING, then each group of
# events goes on to the queue its field value names.
def split_values(field: str) -> sql.Composed:
    return sql.SQL("select {}, count(*) from {} group by 1").format(sql.Identifier(field), sql.Identifier(INCOMING))


# Which of the candidate names are queues, with the table each writes to now.
QUEUE_TABLES = "select queue_name, pgq.current_event_table(queue_name) from pgq.queue where queue_name = any(%s)"


def split_insert(field: str, event_table: str) -> sql.Composed:
    """The incoming events whose field is one of %(values)s (or NULL, with %(with_null)s)."""
    schema, _, table = event_table.rpartition(".")
    columns = sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS))
    return sql.SQL("insert into {} ({}) select {} from {}"
                   " where {} = any(%(values)s) or (%(with_null)s and {} is null)").format(
        sql.Identifier(schema, table), columns, columns, sql.Identifier(INCOMING), sql.Identifier(field),
        sql.Identifier(field))


# --- target side, other commands --------------------------------------------------------
# Session-level: one worker per route at a time; released when the
# connection ends, so a killed worker does not keep the route.  Many routes
# of one target at once ($1: their consumers): the ones this session now holds.
CLAIM_ROUTES = """
    select consumer from unnest(%s::text[]) consumer
     where pg_try_advisory_lock(hashtextextended('qmover-route:' || consumer, 0))
"""
RELEASE_ROUTES = "select count(pg_advisory_unlock(hashtextextended('qmover-route:' || c, 0))) from unnest(%s::text[]) c"
# A place among the first %(slots)s of a source database's mover connections
# (max_source_connections), held on the target session that claims its
# routes; null when every place is taken.
TAKE_SOURCE_SLOT = """
    select slot from generate_series(0, %(slots)s - 1) slot
     where pg_try_advisory_lock(hashtext('qmover-source:' || %(source)s), slot)
     limit 1
"""
RELEASE_SOURCE_SLOT = "select pg_advisory_unlock(hashtext('qmover-source:' || %(source)s), %(slot)s)"
PING = "select 1"
# The sweep, once per target database (PREPAREd: $1): which of these consumers a mover has
# claimed (CLAIM_ROUTES's lock, whose bigint key pg_locks splits in two halves).
CLAIMED_STATEMENT = "qmover_claimed_consumers"
CLAIMED_EXECUTE = f"execute {CLAIMED_STATEMENT}(%s)"
CLAIMED_CONSUMERS = """
    select consumer from unnest($1::text[]) consumer
     where exists (select 1 from pg_locks l
                    where l.locktype = 'advisory' and l.granted and l.objsubid = 1
                      and l.database = (select oid from pg_database where datname = current_database())
                      and (l.classid::bigint << 32 | l.objid::bigint)
                          = hashtextextended('qmover-route:' || consumer, 0))
"""
GET_LAST_TICK = "select pgq_ext.get_last_tick(%s)"
SET_LAST_TICK = "select pgq_ext.set_last_tick(%s, %s)"


def prepare(name: str, query: str) -> sql.Composed:
    """PREPARE of a statement qmover names itself, over one of the queries above."""
    return sql.SQL("prepare {} as {}").format(sql.Identifier(name), sql.SQL(query))


def copy_batch_out(batch_event_sql: str, route: Route, conn: connection) -> str:
    """COPY of the batch's visible columns that pass the route's filters.

    Binary, as copy_events_in() reads it: the servers neither print nor parse
    timestamps and text (0.25 ms less for 100 events, about 8 % of the batch),
    and each converts text through its connection's client encoding.

    batch_event_sql is the SELECT that pgq.batch_event_sql() generated on
    the source server for this batch.  COPY takes no parameters, so the
    filter values are embedded as literals quoted by the driver.
    """
    head, tail = _render(conn, ("copy out", route), lambda: sql.Composed([
        sql.SQL("copy (select {} from (").format(_columns(route)),
        sql.SQL(") as batch where {}) to stdout (format binary)").format(event_filter(route))]))
    return head + batch_event_sql + tail


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


def copy_events_in(event_table: str, route: Route, conn: connection) -> str:
    """COPY into 'schema.table' (pgq.current_event_table()) or a plain table name."""
    def build() -> sql.Composed:
        schema, _, table = event_table.rpartition(".")
        target = sql.Identifier(schema, table) if schema else sql.Identifier(table)
        return sql.Composed([sql.SQL("copy {} ({}) from stdin (format binary)").format(target, _columns(route))])
    return _render(conn, ("copy in", route, event_table), build)[0]


# Statements built from a route's config are the same for each of its
# batches: rendered once, the two COPY statements cost 2 instead of 45 us a
# batch.  The keys come from the config (a route, its queue's event tables).
_RENDERED: dict[tuple[object, ...], list[str]] = {}


def _render(conn: connection, key: tuple[object, ...], build: Callable[[], sql.Composed]) -> list[str]:
    """The parts of build()'s statement as text, rendered once per key and client encoding."""
    key = (*key, conn.encoding)
    parts = _RENDERED.get(key)
    if parts is None:
        parts = _RENDERED[key] = [part.as_string(conn) for part in build()]
    return parts


def _columns(route: Route) -> sql.Composable:
    """The columns a batch carries: ev_id too when the route keeps event ids."""
    names = ("ev_id", *EVENT_COLUMNS) if route.keep_event_id else EVENT_COLUMNS
    return sql.SQL(", ").join(map(sql.Identifier, names))
