-- The tick wake on a source database (qmover.protocol.wake): PgQ tells no
-- one when it ticks, so this trigger does.  Every statement that inserts
-- into pgq.tick (pgq.ticker(), pgqd's ticks, pgq.force_tick's next tick)
-- sends one NOTIFY on {channel}, delivered when the ticker's transaction
-- commits; several ticks in one transaction make one notification.  Beat's
-- sweep LISTENs on the connection it keeps to the database and sweeps it as
-- soon as the notification comes, instead of once a move_interval.
--
-- `qmover install` runs this where a route sets wake_on_tick = 1 and the
-- trigger is missing; `qmover unregister` drops the trigger and its function
-- when the database's last consumer goes.  A PgQ update (ALTER EXTENSION pgq
-- UPDATE) keeps the trigger; pg_dump leaves it out (pgq.tick is the
-- extension's table), so after a restore run `qmover install` again: until
-- then beat polls that database, and says so.
create or replace function {function}() returns trigger language plpgsql as $$
begin
    perform pg_notify({channel}, '');
    return null;
end $$;

create trigger {trigger} after insert on pgq.tick for each statement execute function {function}();
