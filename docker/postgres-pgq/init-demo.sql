-- Two partition databases and a central one, each with PgQ and its queue,
-- for the routes in docker/qmover.ini.  Runs once, on an empty data directory.
create database part1;
create database part2;
create database central;

\connect part1
create extension pgq;
select pgq.create_queue('events');

\connect part2
create extension pgq;
select pgq.create_queue('events');

\connect central
create extension pgq;
select pgq.create_queue('central_events');
