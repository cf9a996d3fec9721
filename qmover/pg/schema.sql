-- qmover's own schema: route claims on a target (claims.sql), the tick wake
-- on a source (wake.sql).  `qmover install` runs this before either.
create schema if not exists qmover;
grant usage on schema qmover to public;
