-- qmover's route claims on a target database (qmover.protocol.claim):
-- which mover holds a route, or a place among a capped source's mover
-- connections, and until when.  `qmover install` runs this on every target;
-- safe to run again.
--
-- A claim is a lease, not a session lock: it ends when its deadline passes
-- unless its mover renews it, or at once when the session that took it ends.
-- A worker the network cuts off therefore gives its routes up within the
-- lease, whether or not the server ever notices that its client is gone, and
-- a pooler that keeps the server session open cannot keep a claim alive.
-- A claim given back keeps its row, with no session (backend 0): its `since`
-- tells beat's sweep that a mover took the route after the task it sent.
--
-- Unlogged: a claim is only worth the sessions that hold it, and a server
-- crash ends them all, so it is written without WAL or a flush.
create unlogged table if not exists qmover.claim (
    kind text not null,          -- 'route' (name: the consumer) or 'place' (name: source database and place)
    name text not null,
    holder text not null,        -- the mover: host and process, for status and the log
    backend int4 not null,       -- the session that took it: the claim ends with it (0: given back)
    since timestamptz not null,  -- taken
    until timestamptz not null,  -- ends unless renewed
    primary key (kind, name)
);

-- Anyone who can connect may see who holds what (beat's sweep, status);
-- taking, renewing and giving back is for roles that may write the queues.
grant select on qmover.claim to public;
grant insert, update, delete on qmover.claim to pgq_writer;
