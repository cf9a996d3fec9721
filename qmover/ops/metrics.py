"""Per-route metrics for Prometheus, exposed through prometheus_client.

Counters (events, batches, errors, last success) live in Redis, the broker
qmover already has, so that every worker and `qmover run` adds to the same
numbers and they survive restarts.  Gauges (lag, pending events) are read
from the source at scrape time, as `qmover status` reads them.  Recording
never stops a move: when Redis is away, the numbers are skipped with one
warning per process.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qmover.config.route import Route
from qmover.ops import admin
from qmover.pg.connector import Connector
from qmover.pg.db import QUICK_CONNECT_TIMEOUT
from qmover.protocol.mover import Outcome

log = logging.getLogger(__name__)
KEY_TTL = 30 * 24 * 3600  # counters of a route that stopped moving fade out after a month


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    field: str = ""  # the Redis hash field of a stored metric


COUNTERS = (
    Metric("qmover_events_moved_total", "counter", "Events written into the target queue.", "events"),
    Metric("qmover_events_filtered_total", "counter", "Events left out by the route's type_filter/table_filter.",
           "filtered"),
    Metric("qmover_batches_moved_total", "counter", "Source batches applied on the target.", "batches"),
    Metric("qmover_batches_skipped_total", "counter",
           "Source batches found already applied on the target (after a crash or by another mover).", "skipped"),
    Metric("qmover_errors_total", "counter", "Failed moves (the cause is in the log).", "errors"),
    Metric("qmover_last_success_timestamp_seconds", "gauge", "Unix time of the last move that succeeded.",
           "last_success"),
)
GAUGES = (
    Metric("qmover_source_lag_seconds", "gauge", "Age of the last tick the consumer finished on the source."),
    Metric("qmover_pending_events", "gauge", "Events ticked on the source and not yet moved."),
    Metric("qmover_route_up", "gauge", "1 when both databases answer and the route is set up, else 0."),
    Metric("qmover_route_held_seconds", "gauge",
           "Seconds since the mover that holds the route's claim took it (no sample while none holds it)."),
)


@lru_cache(maxsize=4096)  # every task asks it for each of its routes
def _key(route: Route) -> str:
    """One hash per route; the digest keeps two configs' same-named routes apart."""
    where = "\0".join((route.src_display, route.src_queue, route.consumer, route.dst_display,
                      route.dst_queue or ""))  # a split route has none: "", the key it always had
    return f"qmover:metrics:{route.name}:{hashlib.sha1(where.encode()).hexdigest()[:12]}"


# The counters a move adds to, in the order _ADD reads their amounts.
ADDED = tuple(metric.field for metric in COUNTERS if metric.kind == "counter")
# One call per task: for each route's hash (KEYS), its amounts and whether it
# succeeded, as one string of numbers (ARGV[3]); the time of its success
# (ARGV[2]) and the hash's lifetime (ARGV[1]).  One command with one string
# costs the worker a third of a pipeline of four commands a route.
_ADD = f"""
local fields = {{{", ".join(f"'{field}'" for field in ADDED)}}}
local i = 0
for numbers in string.gmatch(ARGV[3], '[^;]+') do
  i = i + 1
  local amounts = {{}}
  for amount in string.gmatch(numbers, '%d+') do amounts[#amounts + 1] = amount end
  for f, field in ipairs(fields) do
    if amounts[f] ~= '0' then redis.call('HINCRBY', KEYS[i], field, amounts[f]) end
  end
  if amounts[#fields + 1] == '1' then redis.call('HSET', KEYS[i], 'last_success', ARGV[2]) end
  redis.call('EXPIRE', KEYS[i], ARGV[1])
end
"""

def added(outcome: Outcome) -> dict[str, int]:
    """What one move loop adds to each of a route's counters."""
    return {"events": outcome.events, "filtered": outcome.filtered, "batches": outcome.batches,
            "skipped": outcome.skipped, "errors": int(outcome.error is not None)}


OFF_NOTICE = ("metrics counters are off: the broker is not Redis and [qmover] metrics_url is not set; "
              "set metrics_url = redis://HOST:PORT/DB (or QMOVER_METRICS_URL) to count events, batches and errors")


def say_if_off(url: str | None) -> None:
    """The one line at start (worker, run, metrics) when the counters are off."""
    if url is None:
        log.warning("%s", OFF_NOTICE)


class Counters:
    """The routes' counters in Redis (url None: counters off, nothing recorded).

    A failing store never fails a move: after any failure, recording pauses
    for PAUSE seconds, with one warning the first time, so an unreachable
    Redis costs a move at most one timeout."""

    PAUSE = 30.0

    def __init__(self, url: str | None):
        self.client = None if url is None else redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._add = None if self.client is None else self.client.register_script(_ADD)
        self._paused_until = 0.0
        self._warned = False

    def record(self, outcomes: Iterable[Outcome]) -> None:
        """Add what a move loop did for each route (a route another mover held
        counts nothing), in one round trip; a route without an error also
        stamps the time of its last success."""
        counted = [outcome for outcome in outcomes if not outcome.busy]
        if self.client is None or time.monotonic() < self._paused_until or not counted:
            return
        now = time.time()
        amounts = [(_key(outcome.route), [added(outcome)[field] for field in ADDED], outcome.error is None)
                   for outcome in counted]
        try:
            if self._add is not None:
                try:
                    self._add(keys=[key for key, _, _ in amounts], args=[KEY_TTL, now, ";".join(
                        " ".join(map(str, (*numbers, int(ok)))) for _, numbers, ok in amounts)])
                    return
                except redis.ResponseError as exc:  # scripts refused (an ACL, say): a command per count
                    self._add = None
                    log.info("metrics counted without a Lua script from now on: %s", exc)
            pipe = self.client.pipeline(transaction=False)
            for key, numbers, ok in amounts:
                for field, amount in zip(ADDED, numbers, strict=True):
                    if amount:
                        pipe.hincrby(key, field, amount)
                if ok:
                    pipe.hset(key, "last_success", now)
                pipe.expire(key, KEY_TTL)
            pipe.execute()
        except Exception as exc:  # whatever the store does, the move it counts has happened
            self._paused_until = time.monotonic() + self.PAUSE
            self._warn_once(exc)

    def read(self, routes: list[Route]) -> list[dict[str, float]] | list[None]:
        """Each route's stored numbers, in one round trip; Nones when the counters are off or did not answer."""
        if self.client is None:
            return [None] * len(routes)
        try:
            pipe = self.client.pipeline(transaction=False)
            for route in routes:
                pipe.hgetall(_key(route))
            found = pipe.execute()
        except Exception as exc:
            self._warn_once(exc)
            return [None] * len(routes)
        return [{field.decode(): float(value) for field, value in raw.items()} for raw in found]

    def _warn_once(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("metrics not recorded: the Redis of metrics_url failed (%s); moving goes on", exc)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> Counters:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class RouteCollector(Collector):
    """Every route's counters (from Redis, one round trip) and gauges (from the
    databases, each asked once: admin.statuses), read afresh at each collect."""

    def __init__(self, routes: list[Route], counters: Counters, connector: Connector | None = None) -> None:
        self.routes = routes
        self.counters = counters
        self.connector = connector  # kept connections between scrapes

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        families = {metric.name: (CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily)(
                        metric.name, metric.help, labels=["route"]) for metric in (*COUNTERS, *GAUGES)}
        routes = self.routes
        for route, stored, found in zip(routes, self.counters.read(routes),
                                        admin.statuses(routes, self.connector), strict=True):
            if stored is not None:  # off or unreachable: no counter rather than a false 0
                for metric in COUNTERS:
                    value = stored.get(metric.field)
                    if value is not None or metric.kind == "counter":
                        families[metric.name].add_metric([route.name], value or 0)
            gauges = {"qmover_source_lag_seconds": found["lag_seconds"],
                      "qmover_pending_events": found["pending_events"],
                      "qmover_route_up": 0 if found["error"] else 1,
                      "qmover_route_held_seconds": found["held_seconds"]}
            for name, value in gauges.items():
                if value is not None:
                    families[name].add_metric([route.name], value)
        yield from families.values()


def registry(routes: list[Route], counters: Counters, connector: Connector | None = None) -> CollectorRegistry:
    """A registry of qmover's metrics alone (no process or Python metrics of the scraping process)."""
    found = CollectorRegistry()
    found.register(RouteCollector(routes, counters, connector))
    return found


def render(routes: list[Route], counters: Counters) -> str:
    """The Prometheus text exposition of every route's counters and gauges."""
    return generate_latest(registry(routes, counters)).decode()


def serve(routes: list[Route], counters: Counters, port: int, address: str = "127.0.0.1") -> WSGIServer:
    """Serve the metrics from a daemon thread (prometheus_client: the text format,
    or OpenMetrics when the scraper asks for it); returns the server (shutdown() stops it).

    Its connections are kept between scrapes, one per database.
    """
    connector = Connector(connect_timeout=QUICK_CONNECT_TIMEOUT)
    server, _thread = start_http_server(port, address, registry(routes, counters, connector))
    return server
