"""docker-compose.yml: parses, has every service, and runs only real command lines.

No Docker engine runs here, so the file is checked, not started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from psycopg2.extensions import parse_dsn

from qmover.cli import main as qmover_cli
from qmover.config import load_config

ROOT = Path(__file__).resolve().parents[2]
KNOWN_ENV = {"QMOVER_BROKER_URL", "QMOVER_RESULT_BACKEND", "PGHOST", "PGUSER", "PGPASSWORD", "POSTGRES_PASSWORD",
             "FLOWER_BASIC_AUTH"}
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "FLOWER_BASIC_AUTH": "ops:flower-secret"}


class Refused(Exception):
    """What compose prints when a required variable is unset."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} (unset or empty alike)."""
    def value(match: re.Match) -> str:
        name, kind, word = match.group(1), match.group(2), match.group(3) or ""
        if env.get(name):
            return env[name]
        if kind == "?":
            raise Refused(f"{name}: {word}")
        return word

    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", value, text)


def compose(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), SECRETS if env is None else env))


@pytest.mark.parametrize("unset", sorted(SECRETS))
def test_no_default_secret_compose_refuses_without_it(unset):
    env = {name: value for name, value in SECRETS.items() if name != unset}
    with pytest.raises(Refused) as refused:
        compose(env)
    assert str(refused.value).startswith(f"{unset}: set {unset}")
    assert "change-me" not in (ROOT / "docker-compose.yml").read_text()


def test_published_ports_bind_to_loopback_unless_an_address_is_set():
    published = [port for service in compose()["services"].values() for port in service.get("ports", [])]
    assert sorted(published) == ["127.0.0.1:5555:5555", "127.0.0.1:9187:9187"]
    wider = compose({**SECRETS, "QMOVER_FLOWER_ADDRESS": "192.0.2.7"})["services"]["flower"]["ports"]
    assert wider == ["192.0.2.7:5555:5555"]


def test_flower_in_compose_asks_for_a_login(tmp_path):
    """The container's Flower listens on every address, so `qmover flower` there
    must find the login the compose file passes, and refuse without it."""
    flower = compose()["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    config = tmp_path / "qmover.ini"
    shutil.copy(ROOT / "docker" / "qmover.ini", config)
    args = [str(config) if arg == "/etc/qmover/qmover.ini" else arg for arg in flower["command"][1:]]
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLOWER_")}
    refused = subprocess.run([sys.executable, "-m", "qmover", *args], capture_output=True, text=True, env=env,
                             timeout=60)
    assert refused.returncode == 2 and "without a login" in refused.stderr
    checked = subprocess.run([sys.executable, "-c", "import sys; from qmover.ops.flower_access import flower_args; "
                              "flower_args(sys.argv[1:])", *args[2:]], capture_output=True, text=True,
                             env={**env, "FLOWER_BASIC_AUTH": flower["environment"]["FLOWER_BASIC_AUTH"]}, timeout=60)
    assert checked.returncode == 0, checked.stderr


def test_services_and_images():
    services = compose()["services"]
    assert {"postgres", "redis", "worker", "beat", "flower"} <= set(services)
    pg_build = ROOT / services["postgres"]["build"] / "Dockerfile"
    dockerfile = pg_build.read_text()
    assert "FROM postgres:15" in dockerfile and "postgresql-15-pgq3" in dockerfile
    assert services["redis"]["image"].startswith("redis:")
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


def test_the_image_leaves_the_lab_out():
    """The image copies the product package only: no benchmarks, demo or sandbox (and its default password)."""
    copied = [part for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY")
              for part in line.split()[1:-1]]
    assert "qmover" in copied
    assert not [part for part in copied if part in (".", "./") or part.startswith("qmover_lab")], copied


def test_without_the_lab_the_command_line_works_and_has_no_bench():
    """As in the image: qmover_lab's entry point is declared, but its package cannot be imported."""
    script = ("import sys; sys.modules['qmover_lab'] = None; from qmover.cli import main; "
              "main(['--help'], prog_name='qmover')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert " run " in out.stdout and " bench " not in out.stdout


def test_the_labs_command_is_listed_and_imported_only_when_it_runs():
    """`qmover --help` (and every other command) never imports qmover_lab; `qmover bench` does."""
    script = ("import sys; from qmover.cli import main\n"
              "try:\n    main(sys.argv[1:], prog_name='qmover')\nexcept SystemExit:\n    pass\n"
              "print('imported:', 'qmover_lab' in sys.modules)")
    listed = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=60)
    assert " bench " in listed.stdout and listed.stdout.endswith("imported: False\n"), listed.stdout
    run = subprocess.run([sys.executable, "-c", script, "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert run.stdout.endswith("imported: True\n"), run.stdout + run.stderr
