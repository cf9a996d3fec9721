"""The second layer: PostgreSQL.  Every statement (queries, the pgq_ext SQL
files), connecting and error translation (db), the connections a process
keeps and lends (connector), and the checks a route passes before it moves."""
