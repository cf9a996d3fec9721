"""The `qmover` command line: install, run, status, rewind, reset, unregister.

Expected failures print one line and exit 1 (2 for a bad config); only bugs
show a traceback.
"""

from __future__ import annotations

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
from qmover.protocol import cycles

log = logging.getLogger("qmover")

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


@click.group()
@click.version_option(package_name="qmover", message="qmover %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def main(verbose: bool) -> None:
    """Move PgQ events from source queues to target queues, exactly once."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")


@main.command()
@config_argument
@route_option
@click.option("--once", is_flag=True, help="Move until no batch is ready, then exit.")
@expected_errors
def run(config: str, route_names: tuple[str, ...], once: bool) -> None:
    """Move batches in a loop (SIGINT/SIGTERM stop after the batch in hand)."""
    loaded, routes = selected_routes(config, route_names)
    cycles.check_routes(loaded.select())  # every route of the file: a cycle may run through the others
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
    headers = ("route", "lag_s", "pending", "src_tick", "dst_tick", "batch", "moved", "filtered")
    table = [headers]
    for row in rows:
        lag = row["lag_seconds"]
        table.append((row["route"], "-" if lag is None else f"{lag:.1f}",
                      *("-" if row[key] is None else str(row[key]) for key in
                        ("pending_events", "source_last_tick", "target_last_tick", "current_batch",
                         "events_moved", "events_filtered"))))
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in table]
    lines += [f"error: {row['error']}" for row in rows if row["error"]]
    return "\n".join(lines)


def route_command(action: Callable[[Route], str], refuse_loops: bool = False) -> None:
    """Register an admin action as `qmover NAME CONFIG [--route NAME]...`; its docstring is the help.

    refuse_loops: first refuse a file whose routes feed a queue back into itself.
    """

    @main.command(name=action.__name__, help=action.__doc__)
    @config_argument
    @route_option
    @expected_errors
    def command(config: str, route_names: tuple[str, ...]) -> None:
        if refuse_loops:
            cycles.check_routes(load_config(config).select())
        for_each_route(config, route_names, action)


route_command(admin.install, refuse_loops=True)
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


def add_plugin_commands() -> None:
    """Commands that other packages declare (entry point group qmover.commands):
    `qmover bench` from qmover_lab, in a checkout; an image without it has none."""
    for entry in metadata.entry_points(group="qmover.commands"):
        try:
            main.add_command(entry.load(), entry.name)
        except ImportError:
            continue  # declared by the project, but its package is not installed


add_plugin_commands()
