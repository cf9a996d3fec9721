"""The fourth layer: operating routes.  install and status (admin), ticking
without pgqd (ticker), the route counters and their /metrics exporter
(metrics), and Flower's arguments (flower_access)."""
