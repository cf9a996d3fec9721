"""The third layer: the move protocol, over connections the pg layer lends.

batch moves one batch exactly once; split sends a batch's events to several
queues; claim keeps one mover per route; preflight checks a route before its
first batch; mover holds the one move loop and what a process keeps for it;
readiness says which routes have a batch ready; cycles refuses routes that
feed a queue back into itself.  Knows nothing of Celery.
"""
