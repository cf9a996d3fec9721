"""The `qmover` command line: install, run, status, rewind, reset, unregister.

Expected failures print one line and exit 1 (2 for a bad config); only bugs
show a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from qmover import runner
from qmover.config import Config, load_config
from qmover.config.route import Route
from qmover.errors import QmoverError
from qmover.ops import admin, metrics
from qmover.ops.flower_access import flower_args
from qmover.protocol import preflight

log = logging.getLogger(__name__)

config_argument = click.argument("config", type=click.Path(dir_okay=False))
route_option = click.option(
    "--route", "route_names", multiple=True, metavar="NAME",
    help="Only this route (repeatable; default: every route in CONFIG).")


def fail(message: str, code: int) -> None:
    click.echo(f"qmover: error: {message}", err=True)
    sys.exit(code)


def expected_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print QmoverErrors as one line with their exit code, no traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except QmoverError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper


def selected_routes(config_path: str, route_names: tuple[str, ...]) -> tuple[Config, list[Route]]:
    config = load_config(config_path)
    routes = config.select(route_names)
    if not routes:
        raise QmoverError(f"{config_path}: no routes (a route is a section with src_db)")
    return config, routes


def for_each_route(config_path: str, route_names: tuple[str, ...],
                   action: Callable[[Route], str]) -> None:
    """Run an admin action on every route; report each, exit 1 if any failed."""
    _, routes = selected_routes(config_path, route_names)
    failures = 0
    for route in routes:
        try:
            click.echo(action(route))
        except QmoverError as exc:
            failures += 1
            click.echo(f"qmover: error: {exc}", err=True)
    if failures:
        sys.exit(1)


class Commands(click.Group):
    """qmover's commands, and those other packages declare (entry point group
    qmover.commands): `qmover bench` from qmover_lab, in a checkout; an image
    without it has none.  A declared command is imported only when it runs,
    so no other command, `--help` included, pays for its imports."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *declared()])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = declared().get(name)
        if name in self.commands or entry is None:
            return super().get_command(ctx, name)
        command = entry.load()
        self.add_command(command, name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click lists commands, a declared one without importing it."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        entries = declared()
        rows = [(name, self.commands[name].get_short_help_str(limit) if name in self.commands
                 else f"From {entries[name].value.split('.')[0]}: see `qmover {name} --help`.") for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def declared() -> dict[str, metadata.EntryPoint]:
    """The commands other packages declare whose package is installed."""
    found = {}
    for entry in metadata.entry_points(group="qmover.commands"):
        try:
            installed = importlib.util.find_spec(entry.value.split(".")[0]) is not None
        except ValueError:  # set aside in sys.modules: not importable
            installed = False
        if installed:
            found[entry.name] = entry
    return found


def logger_level(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, int]:
    """--log NAME=LEVEL, checked: one logger (and those below it) at one level."""
    levels = {}
    for value in values:
        name, _, level = value.partition("=")
        number = logging.getLevelName(level.upper())
        if not name.startswith("qmover") or not isinstance(number, int):
            raise click.BadParameter(f"{value!r}: write a qmover logger and a level, e.g. "
                                     f"qmover.protocol.mover=WARNING or qmover.pg=DEBUG", param_hint="--log")
        levels[name] = number
    return levels


@click.group(cls=Commands)
@click.version_option(package_name="qmover", message="qmover %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
@click.option("--log", "levels", multiple=True, metavar="LOGGER=LEVEL", callback=logger_level,
              help="One logger's level (repeatable): loggers are per module, e.g. qmover.protocol.mover=WARNING "
                   "leaves out the line per batch, qmover.pg.session=DEBUG says when a dead connection is replaced.")
def main(verbose: bool, levels: dict[str, int]) -> None:
    """Move PgQ events from source queues to target queues, exactly once."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@main.command()
@config_argument
@route_option
@click.option("--once", is_flag=True, help="Move until no batch is ready, then exit.")
@expected_errors
def run(config: str, route_names: tuple[str, ...], once: bool) -> None:
    """Move batches in a loop (SIGINT/SIGTERM stop after the batch in hand)."""
    loaded, routes = selected_routes(config, route_names)
    preflight.check_at_start(loaded.select())  # every route of the file: a cycle may run through the others
    stop = runner.Stop()
    metrics.say_if_off(loaded.metrics_url)
    try:
        with runner.stop_on_signals(stop), metrics.Counters(loaded.metrics_url) as counters:
            code = runner.run(routes, once=once, stop=stop, counters=counters)
    except KeyboardInterrupt:
        fail("interrupted twice: the batch in hand was rolled back and stays on the source", 130)
    sys.exit(code)


@main.command()
@config_argument
@route_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--prometheus", is_flag=True,
              help="Print every route's metrics in the Prometheus text format (exit 0; see qmover_route_up).")
@expected_errors
def status(config: str, route_names: tuple[str, ...], as_json: bool, prometheus: bool) -> None:
    """Per route: source lag, pending events, positions, current batch."""
    loaded, routes = selected_routes(config, route_names)
    with metrics.Counters(loaded.metrics_url) as counters:
        if prometheus:
            click.echo(metrics.render(routes, counters), nl=False)
            return
        counts = counters.read(routes)
    rows = []
    for found, counted in zip(admin.statuses(routes), counts, strict=True):  # counted None: shown as "-"
        rows.append({**found, **{key: None if counted is None else int(counted.get(field, 0))
                                 for key, field in (("events_moved", "events"), ("events_filtered", "filtered"))}})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_status(rows))
    if any(row["error"] for row in rows):
        sys.exit(1)


@main.command("metrics")
@config_argument
@route_option
@click.option("--port", default=9187, show_default=True, help="TCP port of the /metrics endpoint.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@expected_errors
def serve_metrics(config: str, route_names: tuple[str, ...], port: int, address: str) -> None:
    """Serve the routes' metrics at http://ADDRESS:PORT/metrics until stopped."""
    loaded, routes = selected_routes(config, route_names)
    metrics.say_if_off(loaded.metrics_url)
    server = metrics.serve(routes, metrics.Counters(loaded.metrics_url), port, address)
    log.info("metrics of %d route(s) at http://%s:%d/metrics", len(routes), address, server.server_port)
    try:
        while True:
            time.sleep(3600)  # the server runs in its thread; SIGTERM ends the process as it should
    except KeyboardInterrupt:
        server.shutdown()


def format_status(rows: list[dict[str, Any]]) -> str:
    headers = ("route", "lag_s", "pending", "src_tick", "dst_tick", "batch", "moved", "filtered", "held_s")
    table = [headers]
    for row in rows:
        lag, held = row["lag_seconds"], row["held_seconds"]
        table.append((row["route"], "-" if lag is None else f"{lag:.1f}",
                      *("-" if row[key] is None else str(row[key]) for key in
                        ("pending_events", "source_last_tick", "target_last_tick", "current_batch",
                         "events_moved", "events_filtered")),
                      "-" if held is None else f"{held:.0f}"))
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in table]
    lines += [f"error: {row['error']}" for row in rows if row["error"]]
    lines += [f"warning: {row[key]}" for row in rows for key in ("held_too_long", "wake_missing") if row.get(key)]
    return "\n".join(lines)


def route_command(action: Callable[[Route], str], check_first: bool = False) -> None:
    """Register an admin action as `qmover NAME CONFIG [--route NAME]...`; its docstring is the help.

    check_first: first refuse a file whose routes feed a queue back into itself,
    or that reaches a database through a transaction pooler (preflight.check_at_start).
    """

    @main.command(name=action.__name__, help=action.__doc__)
    @config_argument
    @route_option
    @expected_errors
    def command(config: str, route_names: tuple[str, ...]) -> None:
        if check_first:
            preflight.check_at_start(load_config(config).select())
        for_each_route(config, route_names, action)


route_command(admin.install, check_first=True)
for _action in (admin.rewind, admin.reset, admin.unregister):
    route_command(_action)


def celery_command(name: str, help_text: str,
                   checked_args: Callable[[list[str]], list[str]] = list) -> None:
    """Register `qmover NAME CONFIG [CELERY ARGS]...` as `celery -A qmover.tasks NAME ...`.

    checked_args: the extra arguments as they are to be passed on; raises to refuse them.
    """

    @main.command(name=name, help=help_text,
                  context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @config_argument
    @click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
    @expected_errors
    def command(config: str, celery_args: tuple[str, ...]) -> None:
        load_config(config)  # a bad file fails here with its one line, before Celery starts
        from qmover.tasks.app import settings_file, settings_in  # Celery is imported for these commands only

        if (path := settings_file()) is not None:
            settings_in(path)  # so does a bad Celery settings file
        args = checked_args(list(celery_args))
        os.environ["QMOVER_CONFIG"] = str(Path(config).resolve())
        argv = [sys.executable, "-m", "celery", "-A", "qmover.tasks", name, *args]
        os.execv(sys.executable, argv)


celery_command("worker", "Start a Celery worker for the routes of CONFIG (extra args go to celery).")
celery_command("beat", "Start Celery beat for the routes of CONFIG: readiness sweeps, and ticks where asked.")
celery_command("flower", "Start Flower for qmover's Celery app: on 127.0.0.1 unless --address is given, "
               "and on any other address only with --basic-auth (or FLOWER_BASIC_AUTH) or --auth.",
               flower_args)
