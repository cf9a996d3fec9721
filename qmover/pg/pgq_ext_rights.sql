-- Rights on qmover's pgq_ext as upstream pgq_ext grants them, and
-- upgrade_schema().  `qmover install` runs this after creating the schema,
-- and again on a pgq_ext it created earlier (the schema's comment says so),
-- so that one is brought to these rights too; a pgq_ext qmover did not
-- create is never altered.  Safe to run again.
--
-- Upstream: version() for everyone, every other function for pgq_writer only,
-- so that a role that can merely connect cannot read or move a position.

-- Adds subconsumer_id to any of the four tables made before it existed (as
-- '' for the rows there, and into the primary key), and gives it the default
-- ''; returns how many changes it made (0 on a schema that needs none).
create or replace function pgq_ext.upgrade_schema()
returns int4 language plpgsql
set search_path = pg_catalog as $$
declare
    changes int4 := 0;
    target record;
begin
    for target in
        select t.name, t.key
          from (values ('completed_tick', 'consumer_id, subconsumer_id'),
                       ('completed_batch', 'consumer_id, subconsumer_id'),
                       ('partial_batch', 'consumer_id, subconsumer_id'),
                       ('completed_event', 'consumer_id, subconsumer_id, batch_id, event_id')) t (name, key)
    loop
        if not exists (select 1 from information_schema.columns c
                        where c.table_schema = 'pgq_ext' and c.table_name = target.name
                          and c.column_name = 'subconsumer_id') then
            execute format('alter table pgq_ext.%I add column subconsumer_id text not null default %L',
                           target.name, '');
            execute format('alter table pgq_ext.%I drop constraint if exists %I',
                           target.name, target.name || '_pkey');
            execute format('alter table pgq_ext.%I add constraint %I primary key (%s)',
                           target.name, target.name || '_pkey', target.key);
            changes := changes + 1;
        elsif exists (select 1 from information_schema.columns c
                       where c.table_schema = 'pgq_ext' and c.table_name = target.name
                         and c.column_name = 'subconsumer_id' and c.column_default is null) then
            execute format('alter table pgq_ext.%I alter column subconsumer_id set default %L', target.name, '');
            changes := changes + 1;
        end if;
    end loop;
    return changes;
end;
$$;

revoke all on all functions in schema pgq_ext from public;
grant execute on all functions in schema pgq_ext to pgq_writer;
grant execute on function pgq_ext.version() to public;
