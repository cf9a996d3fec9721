"""A real Prometheus scrapes `qmover metrics` and evaluates the shipped alert rules
and the Grafana dashboard's expressions.

Prometheus (Debian's package, installed by scripts/setup.sh) runs on loopback
from a temporary directory, scraping every second; the rules are the shipped
ones with their `for:` shortened to seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from qmover.ops import metrics
from qmover_lab.sandbox import free_port

from celery_helpers import wait_until
from conftest import claim_as_another_mover

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "qmover-rules.yml"
DASHBOARD = json.loads((DEPLOY / "grafana" / "qmover.json").read_text())
PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
scrape_configs:
  - job_name: qmover
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"""


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


def route_down_alerts(port: int, route: str) -> list[str]:
    """The states of QmoverRouteDown for the route: [], ["pending"] or ["firing"]."""
    return [alert["state"] for alert in api(port, "alerts")["alerts"]
            if alert["labels"]["alertname"] == "QmoverRouteDown" and alert["labels"]["route"] == route]


@pytest.fixture
def scraped(route, redis_db, tmp_path):
    """The example route with its counters in redis_db, `qmover metrics` serving it,
    and Prometheus scraping that, while a mover holds the route (so that its
    held-seconds gauge has a sample); yields Prometheus's port."""
    route.config.write_text(route.config.read_text() + f"\n[qmover]\nmetrics_url = {redis_db.url}\n")
    route.src.produce_series(route.src_queue, 10)
    route.src.tick(route.src_queue)
    route.qmover("run", "--once", check=True)  # counters to scrape
    holder = route.dst.connect()
    with holder.cursor() as cur:
        claim_as_another_mover(cur, route.name)

    metrics_port, prometheus_port = free_port(), free_port()
    (tmp_path / "rules.yml").write_text(re.sub(r"for: \d+m", "for: 2s", RULES.read_text()))
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(metrics_port=metrics_port))
    served = subprocess.Popen([sys.executable, "-m", "qmover", "metrics", str(route.config),
                               "--port", str(metrics_port)], stderr=subprocess.DEVNULL)
    prometheus = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                                  stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        yield prometheus_port
    finally:
        for process in (prometheus, served):
            process.terminate()
            process.wait(30)
        holder.close()


def test_prometheus_holds_every_series_of_each_route(route, scraped):
    def series() -> set[str]:
        try:
            return {found["__name__"] for found in api(scraped, "series", **{"match[]": f'{{route="{route.name}"}}'})}
        except OSError:
            return set()

    expected = {metric.name for metric in (*metrics.COUNTERS, *metrics.GAUGES)}
    wait_until(lambda: series() >= expected, 60, "Prometheus to scrape every series")
    moved = api(scraped, "query", query=f'qmover_events_moved_total{{route="{route.name}"}}')["result"]
    assert [sample["value"][1] for sample in moved] == ["10"]


def test_route_down_fires_when_the_source_queue_goes_and_resolves_when_it_is_back(route, scraped):
    def up() -> list[str]:
        try:
            return [sample["value"][1] for sample in
                    api(scraped, "query", query=f'qmover_route_up{{route="{route.name}"}}')["result"]]
        except OSError:
            return []

    wait_until(lambda: up() == ["1"], 60, "the route to be up in Prometheus")
    assert route_down_alerts(scraped, route.name) == []

    route.src.execute("select pgq.drop_queue(%s, true)", (route.src_queue,))
    wait_until(lambda: route_down_alerts(scraped, route.name) == ["firing"], 60, "QmoverRouteDown to fire")

    route.src.create_queue(route.src_queue)
    route.qmover("install", check=True)  # registers the consumer on the new queue
    wait_until(lambda: route_down_alerts(scraped, route.name) == [], 60, "QmoverRouteDown to resolve")
    assert up() == ["1"]


def panel_expressions() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def test_dashboard_expressions_answer_for_the_route(route, scraped):
    """Each panel's query, as Grafana would send it for this route, is valid PromQL with a series."""
    def answers(expression: str) -> bool:
        query = expression.replace("$route", route.name).replace("$__rate_interval", "1m")
        try:
            return any(sample["metric"].get("route") == route.name
                       for sample in api(scraped, "query", query=query)["result"])
        except OSError:
            return False

    for expression in panel_expressions():
        wait_until(lambda expression=expression: answers(expression), 60, f"an answer to {expression}")
    assert route.name in api(scraped, "label/route/values", **{"match[]": "qmover_route_up"})
