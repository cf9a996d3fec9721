-- qmover's pgq_ext-compatible schema.
--
-- Written from the pgq_ext 3.x API so that positions written by skytools'
-- consumers (SerialConsumer, queue_mover) and by qmover are one and the same:
-- same schema name, tables, function signatures and results.  `qmover install`
-- runs this file only on a target that has no pgq_ext schema, then
-- pgq_ext_rights.sql; a pgq_ext qmover did not create is never altered.  The
-- schema's comment marks it as qmover's (queries.PGQ_EXT_COMMENT).
--
-- Every position is keyed by (consumer_id, subconsumer_id); the 2-name
-- function forms use the subconsumer ''.

create schema pgq_ext;
comment on schema pgq_ext is 'pgq_ext-compatible position tracking, installed by qmover';
grant usage on schema pgq_ext to public;

-- Last tick a tick-tracking (serial) consumer has applied.
create table pgq_ext.completed_tick (
    consumer_id     text not null,
    subconsumer_id  text not null default '',
    last_tick_id    bigint not null,
    primary key (consumer_id, subconsumer_id)
);

-- Last batch a batch-tracking consumer has applied.
create table pgq_ext.completed_batch (
    consumer_id     text not null,
    subconsumer_id  text not null default '',
    last_batch_id   bigint not null,
    primary key (consumer_id, subconsumer_id)
);

-- Events applied so far of the batch named in partial_batch.
create table pgq_ext.completed_event (
    consumer_id     text not null,
    subconsumer_id  text not null default '',
    batch_id        bigint not null,
    event_id        bigint not null,
    primary key (consumer_id, subconsumer_id, batch_id, event_id)
);

-- The batch whose events completed_event currently tracks.
create table pgq_ext.partial_batch (
    consumer_id     text not null,
    subconsumer_id  text not null default '',
    cur_batch_id    bigint not null,
    primary key (consumer_id, subconsumer_id)
);

-- Tick tracking ---------------------------------------------------------

create function pgq_ext.get_last_tick(a_consumer text, a_subconsumer text)
returns bigint language sql stable security definer
set search_path = pg_catalog as $$
    -- NULL when the consumer has no position yet.
    select last_tick_id from pgq_ext.completed_tick
     where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
$$;

create function pgq_ext.get_last_tick(a_consumer text)
returns bigint language sql stable
set search_path = pg_catalog as $$
    select pgq_ext.get_last_tick(a_consumer, '');
$$;

create function pgq_ext.set_last_tick(a_consumer text, a_subconsumer text, a_tick_id bigint)
returns integer language plpgsql security definer
set search_path = pg_catalog as $$
begin
    -- A NULL tick forgets the position (skytools' --reset).
    if a_tick_id is null then
        delete from pgq_ext.completed_tick
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
        return 1;
    end if;
    insert into pgq_ext.completed_tick (consumer_id, subconsumer_id, last_tick_id)
    values (a_consumer, a_subconsumer, a_tick_id)
    on conflict (consumer_id, subconsumer_id)
    do update set last_tick_id = excluded.last_tick_id;
    return 1;
end;
$$;

create function pgq_ext.set_last_tick(a_consumer text, a_tick_id bigint)
returns integer language sql
set search_path = pg_catalog as $$
    select pgq_ext.set_last_tick(a_consumer, '', a_tick_id);
$$;

-- Batch tracking --------------------------------------------------------

create function pgq_ext.is_batch_done(a_consumer text, a_subconsumer text, a_batch_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog as $$
    select coalesce((select last_batch_id = a_batch_id
                       from pgq_ext.completed_batch
                      where consumer_id = a_consumer
                        and subconsumer_id = a_subconsumer), false);
$$;

create function pgq_ext.is_batch_done(a_consumer text, a_batch_id bigint)
returns boolean language sql stable
set search_path = pg_catalog as $$
    select pgq_ext.is_batch_done(a_consumer, '', a_batch_id);
$$;

create function pgq_ext.set_batch_done(a_consumer text, a_subconsumer text, a_batch_id bigint)
returns boolean language plpgsql security definer
set search_path = pg_catalog as $$
begin
    -- false tells the caller the batch had been recorded already.
    if pgq_ext.is_batch_done(a_consumer, a_subconsumer, a_batch_id) then
        return false;
    end if;
    insert into pgq_ext.completed_batch (consumer_id, subconsumer_id, last_batch_id)
    values (a_consumer, a_subconsumer, a_batch_id)
    on conflict (consumer_id, subconsumer_id)
    do update set last_batch_id = excluded.last_batch_id;
    return true;
end;
$$;

create function pgq_ext.set_batch_done(a_consumer text, a_batch_id bigint)
returns boolean language sql
set search_path = pg_catalog as $$
    select pgq_ext.set_batch_done(a_consumer, '', a_batch_id);
$$;

-- Event tracking --------------------------------------------------------

create function pgq_ext.is_event_done(a_consumer text, a_subconsumer text,
                                      a_batch_id bigint, a_event_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog as $$
    select exists (select 1 from pgq_ext.completed_event
                    where consumer_id = a_consumer
                      and subconsumer_id = a_subconsumer
                      and batch_id = a_batch_id
                      and event_id = a_event_id);
$$;

create function pgq_ext.is_event_done(a_consumer text, a_batch_id bigint, a_event_id bigint)
returns boolean language sql stable
set search_path = pg_catalog as $$
    select pgq_ext.is_event_done(a_consumer, '', a_batch_id, a_event_id);
$$;

create function pgq_ext.set_event_done(a_consumer text, a_subconsumer text,
                                       a_batch_id bigint, a_event_id bigint)
returns boolean language plpgsql security definer
set search_path = pg_catalog as $$
declare
    tracked_batch bigint;
begin
    if pgq_ext.is_event_done(a_consumer, a_subconsumer, a_batch_id, a_event_id) then
        return false;
    end if;
    -- A new batch id means the previous one is finished on the queue side,
    -- so its event marks are no longer needed.
    select cur_batch_id into tracked_batch
      from pgq_ext.partial_batch
     where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
    if not found then
        insert into pgq_ext.partial_batch (consumer_id, subconsumer_id, cur_batch_id)
        values (a_consumer, a_subconsumer, a_batch_id);
    elsif tracked_batch <> a_batch_id then
        delete from pgq_ext.completed_event
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer
           and batch_id = tracked_batch;
        update pgq_ext.partial_batch set cur_batch_id = a_batch_id
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
    end if;
    insert into pgq_ext.completed_event (consumer_id, subconsumer_id, batch_id, event_id)
    values (a_consumer, a_subconsumer, a_batch_id, a_event_id);
    return true;
end;
$$;

create function pgq_ext.set_event_done(a_consumer text, a_batch_id bigint, a_event_id bigint)
returns boolean language sql
set search_path = pg_catalog as $$
    select pgq_ext.set_event_done(a_consumer, '', a_batch_id, a_event_id);
$$;

create function pgq_ext.version()
returns text language sql immutable as $$
    select '3.1'::text;
$$;
