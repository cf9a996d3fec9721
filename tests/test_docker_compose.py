"""docker-compose.yml: parses, has every service, and runs only real command lines.

No Docker engine runs here, so the file is checked, not started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from psycopg2.extensions import parse_dsn

from qmover.cli import main as qmover_cli
from qmover.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KNOWN_ENV = {"QMOVER_BROKER_URL", "QMOVER_RESULT_BACKEND", "PGHOST", "PGUSER", "PGPASSWORD", "POSTGRES_PASSWORD"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_images():
    services = compose()["services"]
    assert {"postgres", "redis", "worker", "beat", "flower"} <= set(services)
    pg_build = ROOT / services["postgres"]["build"] / "Dockerfile"
    dockerfile = pg_build.read_text()
    assert "FROM postgres:15" in dockerfile and "postgresql-15-pgq3" in dockerfile
    assert services["redis"]["image"].startswith("redis:")
    assert "5555:5555" in services["flower"]["ports"]
    assert "9187:9187" in services["metrics"]["ports"]
    for name in ("worker", "beat", "flower", "install", "metrics"):
        assert services[name]["build"] == "."
        assert set(services[name]["environment"]) <= KNOWN_ENV


def test_mounted_config_is_valid_and_holds_no_secret():
    config = load_config(ROOT / "docker" / "qmover.ini")
    assert list(config.routes) == ["part1_to_central", "part2_to_central"]
    for route in config.routes.values():
        for dsn in (route.src_dsn, route.dst_dsn):
            assert "password" not in parse_dsn(dsn)
    mount = compose()["services"]["worker"]["volumes"][0]
    assert mount.endswith(":/etc/qmover/qmover.ini:ro") and "docker/qmover.ini" in mount


def test_every_command_is_a_real_command_line(tmp_path):
    config = tmp_path / "qmover.ini"
    shutil.copy(ROOT / "docker" / "qmover.ini", config)
    checked = 0
    for name, service in compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "qmover":
            continue
        subcommand, path, *celery_args = command[1:]
        assert subcommand in qmover_cli.commands, name
        assert path == "/etc/qmover/qmover.ini"
        if subcommand in ("worker", "beat"):
            # what `qmover worker CONFIG ARGS` execs; celery rejects unknown options even with --help
            result = subprocess.run([sys.executable, "-m", "celery", "-A", "qmover.tasks", subcommand,
                                     *celery_args, "--help"], capture_output=True, text=True,
                                    env={**os.environ, "QMOVER_CONFIG": str(config)}, timeout=60)
            assert result.returncode == 0, f"{name}: {result.stderr}"
        elif subcommand == "flower":
            from flower.options import options  # Flower passes its options to tornado
            for arg in celery_args:
                assert arg.startswith("--") and arg[2:].split("=")[0] in options, arg
        else:  # parsed by the command itself, without running it
            qmover_cli.commands[subcommand].make_context(subcommand, [str(config), *celery_args])
        checked += 1
    assert checked == 5
