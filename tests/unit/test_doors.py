"""What qmover opens to the outside, read without a server: Flower's door
(`qmover flower` refuses before Flower starts) and the metrics the shipped
alert rules and dashboard name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qmover.ops import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana" / "qmover.json").read_text())
EXPORTED = {metric.name for metric in (*metrics.COUNTERS, *metrics.GAUGES)}
CONFIG = """
[qmover]
broker_url = redis://127.0.0.1:1/0

[route]
src_db = host=127.0.0.1 dbname=nowhere_src
dst_db = host=127.0.0.1 dbname=nowhere_dst
pgq_queue_name = events
"""


def refusal(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The lines `qmover flower` printed when it refused to start (exit 2)."""
    config = tmp_path / "flower.ini"
    config.write_text(CONFIG)
    result = subprocess.run([sys.executable, "-m", "qmover", "flower", str(config), *args], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **(env or {})})
    assert result.returncode == 2, result.stdout + result.stderr
    return result.stderr.strip().splitlines()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_wider_address_without_a_login_is_refused(tmp_path, how):
    args, env = (["--address=0.0.0.0"], {}) if how == "argument" else ([], {"FLOWER_ADDRESS": "0.0.0.0"})
    assert refusal(tmp_path, "--port=5555", *args, env=env) == [
        "qmover: error: refusing to serve Flower on 0.0.0.0 without a login; add --basic-auth=USER:PASSWORD "
        "(or FLOWER_BASIC_AUTH in the environment), or listen on --address=127.0.0.1"]


def test_a_malformed_option_is_one_line(tmp_path):
    assert refusal(tmp_path, "--port=abc") == [
        "qmover: error: Flower's options: invalid literal for int() with base 10: 'abc'; "
        "see `celery flower --help`"]


def panel_expressions() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def test_dashboard_names_only_metrics_qmover_exports():
    variables = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
    expressions = [*panel_expressions(), variables["route"]["query"]["query"]]
    named = {name for expression in expressions for name in re.findall(r"\bqmover_[a-z_]+", expression)}
    assert named == EXPORTED  # every metric shown, and none that qmover does not export
    assert all('route=~"$route"' in expression for expression in panel_expressions())
    assert variables["route"]["query"]["query"] == "label_values(qmover_route_up, route)"
    assert variables["route"]["multi"] and variables["route"]["includeAll"]
    titles = {panel["title"] for panel in DASHBOARD["panels"]}
    assert {"Events moved per second", "Source lag", "Pending events", "Errors",
            "Time since the last successful move"} <= titles


def test_alert_rules_name_only_exported_metrics_and_say_what_to_check_first():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "qmover-rules.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        assert set(re.findall(r"\bqmover_[a-z_]+", rule["expr"])) <= EXPORTED, rule["alert"]
        assert "{{ $labels.route }}" in rule["annotations"]["summary"], rule["alert"]
        assert "first check" in rule["annotations"]["summary"], rule["alert"]
