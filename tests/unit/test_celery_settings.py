"""qmover's app and a shop's app keep their Celery settings apart, whichever
folder they start in: a shop's celeryconfig.py never reaches qmover's app,
and nothing of qmover's reaches a shop's.  Each check runs a new Python from
the folder a shop would run it in, without a server (no broker is reached)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmover.tasks.app import SOURCE_FOLDER, settings_file

ROUTES = """
[qmover]
broker_url = redis://127.0.0.1:6379/3

[orders]
src_db = dbname=shop
dst_db = dbname=central
pgq_queue_name = orders
"""
# A shop's settings, as Celery's first-steps guide writes them.
SHOP_SETTINGS = """
broker_url = "redis://127.0.0.1:6379/9"
task_acks_late = False
beat_schedule = {}
"""
SHOP_APP = """
from celery import Celery
app = Celery("shop")
app.config_from_object("celeryconfig", silent=True)
"""
SHOW = ("import json, sys; sys.path.insert(0, ''); from {module} import app; c = app.conf; "
        "print(json.dumps([c.broker_url, c.task_acks_late, sorted(c.beat_schedule or {{}}), c.task_default_queue]))")


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """A shop's project folder: its celeryconfig.py and app, and a routes file for qmover."""
    (tmp_path / "celeryconfig.py").write_text(SHOP_SETTINGS)
    (tmp_path / "shop.py").write_text(SHOP_APP)
    (tmp_path / "routes.ini").write_text(ROUTES)
    return tmp_path


def settings_seen(folder: Path, module: str, **env: str) -> list:
    """[broker_url, task_acks_late, beat entries, default queue] of module's app, started in folder."""
    result = subprocess.run([sys.executable, "-c", SHOW.format(module=module)], cwd=folder, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "QMOVER_CONFIG": "routes.ini", **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_qmover_app_started_in_a_shop_folder_has_qmover_settings(shop):
    broker, acks_late, entries, queue = settings_seen(shop, "qmover.tasks")
    assert (broker, acks_late, queue) == ("redis://127.0.0.1:6379/3", True, "qmover")
    assert entries == ["qmover sweep every 1s"]


def test_celery_minus_a_qmover_tasks_in_a_shop_folder_reports_qmover_settings(shop):
    """What `celery -A qmover.tasks worker|beat|flower` (and so `qmover worker|beat|flower`) configure from."""
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "qmover.tasks", "report"], cwd=shop,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "QMOVER_CONFIG": "routes.ini"})
    assert result.returncode == 0, result.stderr
    assert "broker_url: 'redis://:********@127.0.0.1:6379/3'" in result.stdout  # report masks it
    assert "task_acks_late: True" in result.stdout
    assert "qmover sweep every 1s" in result.stdout


def test_a_shop_app_never_gets_qmover_settings(shop, tmp_path_factory):
    assert settings_seen(shop, "shop") == ["redis://127.0.0.1:6379/9", False, [], "celery"]
    elsewhere = tmp_path_factory.mktemp("no_celeryconfig")
    (elsewhere / "shop.py").write_text(SHOP_APP)
    (elsewhere / "routes.ini").write_text(ROUTES)
    # Its own celeryconfig missing, the shop's app finds no other: Celery's defaults.
    assert settings_seen(elsewhere, "shop") == [None, False, [], "celery"]
    found = subprocess.run([sys.executable, "-c", "import celeryconfig"], cwd=elsewhere, capture_output=True,
                           text=True, timeout=60)
    assert "No module named 'celeryconfig'" in found.stderr


def test_attach_adds_qmover_tasks_and_beat_entries_and_leaves_the_shop_settings(shop):
    (shop / "attached.py").write_text(SHOP_APP + "import qmover.tasks\nqmover.tasks.attach(app, 'routes.ini')\n")
    assert settings_seen(shop, "attached") == ["redis://127.0.0.1:6379/9", False, ["qmover sweep every 1s"], "celery"]


def test_the_settings_file_goes_on_top_of_qmover_settings(shop, tmp_path_factory):
    settings = tmp_path_factory.mktemp("settings") / "qmover_celery.py"
    settings.write_text("import os\ntask_default_queue = 'moves'\n_private = 1\n")
    assert settings_seen(shop, "qmover.tasks", QMOVER_CELERY_SETTINGS=str(settings))[3] == "moves"


def test_by_default_the_settings_file_is_celeryconfig_of_qmover_source_folder(monkeypatch):
    monkeypatch.delenv("QMOVER_CELERY_SETTINGS", raising=False)
    assert settings_file() == SOURCE_FOLDER / "celeryconfig.py"


def test_a_broken_settings_file_is_one_line_before_celery_starts(shop):
    (shop / "broken.py").write_text("worker_concurrency = 1 +\n")
    result = subprocess.run([sys.executable, "-m", "qmover", "worker", "routes.ini"], cwd=shop, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "QMOVER_CELERY_SETTINGS": "broken.py"})
    assert result.returncode == 2
    assert result.stderr.startswith("qmover: error: broken.py: cannot read the Celery settings (SyntaxError: ")
    assert len(result.stderr.splitlines()) == 1
