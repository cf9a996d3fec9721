"""Read the skytools-compatible INI file into routes.

Every section with ``src_db`` is a route; ``[qmover]`` holds the broker
settings.  Errors name file, section and key, and nothing here touches a
database, so a bad file fails before anything moves.
"""

from __future__ import annotations

import configparser
import difflib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg2

from qmover.config.route import SPLIT_FIELDS, Route, Split, database_of
from qmover.errors import ConfigError

Number = TypeVar("Number", int, float)

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
GLOBAL_SECTION = "qmover"

ROUTE_KEYS = frozenset({
    "job_name", "consumer_name", "src_db", "dst_db",
    "pgq_queue_name", "queue_name", "dst_queue_name",
    "pgq_batch_collect_events", "pgq_batch_collect_interval", "pgq_keep_lag",
    "loop_delay", "move_interval", "move_budget", "ticker", "ticker_interval",
    "type_filter", "table_filter", "keep_event_id", "split_field", "split_map", "split_unknown",
    "partitions", "max_source_connections", "merge_ticks", "queue_field", "pgq_consumer_id", "wake_on_tick",
})
# skytools' queue_splitter reads its config from a section of its own name:
# each event goes to the target queue its queue_field (default extra1) names.
SPLITTER_SECTIONS = frozenset({"queue_splitter", "queue_splitter3"})
QUEUE_FIELDS = {"type": "ev_type", "extra1": "ev_extra1", "extra2": "ev_extra2", "extra3": "ev_extra3",
                "extra4": "ev_extra4"}
TICKER_SIDES = {"off": (), "source": ("source",), "target": ("target",), "both": ("source", "target")}
# Keys skytools scripts understand that have no meaning for qmover.
SKYTOOLS_IGNORED_KEYS = frozenset({
    "pidfile", "logfile", "log_size", "log_count", "log_level",
    "use_skylog", "skylog_locations", "use_syslog", "syslog", "syslog_name",
    "syslog_ident", "exception_sleep", "exception_reset", "stats_period",
    "connection_lifetime", "keepalive", "tcp_keepalive", "tcp_keepidle",
    "tcp_keepintvl", "tcp_keepcnt", "pgq_lazy_fetch", "pgq_autocommit",
    "service_name", "config_dir", "config_file",
})
GLOBAL_KEYS = frozenset({"broker_url", "result_backend", "metrics_url", "celery_queue", "max_idle_connections",
                         "routes_per_task"})

_UNITS = {
    "": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*$")
_CLOCK = re.compile(r"^\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)\s*$")


@dataclass(frozen=True)
class Config:
    """The parsed file: routes in file order plus broker settings."""

    path: Path
    routes: dict[str, Route]
    broker_url: str = DEFAULT_BROKER
    result_backend: str | None = DEFAULT_BROKER  # None: no result backend
    metrics_url: str | None = DEFAULT_BROKER  # the Redis that keeps the counters of qmover.ops.metrics; None: off
    celery_queue: str = "qmover"  # the Celery queue qmover's tasks go to
    # per worker process, beyond them the least recently used close; None:
    # one kept per database used (the bounds come from the pool's size)
    max_idle_connections: int | None = None
    # Routes a sweep hands to one move task: a task costs Celery a message, its
    # events and a pool hand-off, shared by this many routes' batches.
    routes_per_task: int = 50

    def select(self, names: tuple[str, ...] | list[str] = ()) -> list[Route]:
        """The named routes (all when none are named); unknown names are an error."""
        if not names:
            return list(self.routes.values())
        unknown = [name for name in names if name not in self.routes]
        if unknown:
            known = ", ".join(self.routes) or "none"
            raise ConfigError(
                f"{self.path}: unknown route {unknown[0]!r}; routes in this file: {known}")
        return [self.routes[name] for name in dict.fromkeys(names)]


class _Section:
    """One section's values, with errors that name file, section and key.

    partition: one partition of a route template; %(partition)s is then
    its value in every key, and errors name it too.
    """

    def __init__(self, parser: configparser.ConfigParser, path: Path, name: str, partition: str | None = None):
        self.parser, self.path, self.name, self.partition = parser, path, name, partition

    @property
    def label(self) -> str:
        """How messages name this section: [name], or [name] partition P."""
        return f"[{self.name}]" + (f" partition {self.partition}" if self.partition is not None else "")

    def fail(self, key: str, problem: str) -> ConfigError:
        within = f" (partition {self.partition})" if self.partition is not None else ""
        return ConfigError(f"{self.path}: [{self.name}] {key}{within}: {problem}")

    def get(self, key: str) -> str | None:
        if not self.parser.has_option(self.name, key):
            return None
        try:
            value = self.parser.get(self.name, key,
                                    vars=None if self.partition is None else {"partition": self.partition})
        except configparser.InterpolationError as exc:
            raise self.fail(key, f"bad %(...)s reference ({exc.message.splitlines()[0]})") from None
        return value.strip()

    def require(self, *keys: str) -> str:
        for key in keys:
            value = self.get(key)
            if value:
                return value
        raise self.fail(keys[0], "missing; every route needs it")

    def dsn(self, key: str) -> str:
        value = self.require(key)
        try:
            psycopg2.extensions.parse_dsn(value)
        except psycopg2.ProgrammingError:
            # libpq's detail may quote part of the string, password included.
            raise self.fail(key, "not a valid libpq connection string; "
                                 "use key=value pairs or a postgresql:// URI") from None
        return value

    def number(self, key: str, kind: type[Number], minimum: float) -> Number | None:
        value = self.get(key)
        if value is None or value == "":
            return None
        try:
            number = kind(value)
        except ValueError:
            raise self.fail(key, f"{value!r} is not a {'whole ' if kind is int else ''}number") from None
        if number < minimum:
            raise self.fail(key, f"must be at least {minimum}")
        return number

    def seconds(self, key: str, positive: bool = False) -> float | None:
        value = self.get(key)
        if value is None or value == "":
            return None
        seconds = parse_seconds(value)
        if seconds is None:
            raise self.fail(key, f"{value!r} is not a duration; write e.g. '30', '5 minutes' or '00:05:00'")
        if positive and seconds <= 0:
            raise self.fail(key, "must be more than 0 seconds")
        return seconds

    def flag(self, key: str) -> bool | None:
        """1/0, true/false, yes/no, on/off; None when the key is left out."""
        value = self.get(key)
        if not value:
            return None
        if value.lower() not in _FLAGS:
            raise self.fail(key, f"{value!r} is not one of 1/0, true/false, yes/no, on/off")
        return _FLAGS[value.lower()]

    def names(self, key: str) -> tuple[str, ...]:
        """A comma-separated list; an empty entry is a typo, not a wildcard."""
        value = self.get(key)
        if not value:
            return ()
        names = tuple(name.strip() for name in value.split(","))
        if not all(names):
            raise self.fail(key, f"{value!r} has an empty entry; write names separated by commas")
        return names

    def check_keys(self, allowed: frozenset[str]) -> None:
        """Unknown keys are typos until proven otherwise; every %(...)s must resolve."""
        for key in self.parser.options(self.name):
            if key not in allowed and key not in self.parser.defaults():
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.fail(key, f"unknown key{suggestion}")
            self.get(key)


def parse_seconds(value: str) -> float | None:
    """'30', '1.5 s', '5 minutes', '2 hours', '00:05:00' -> seconds; None if unreadable."""
    text = value.strip().lower()
    clock = _CLOCK.match(text)
    if clock:
        hours, minutes, seconds = clock.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    amount = _AMOUNT.match(text)
    if amount and amount.group(2) in _UNITS:
        return float(amount.group(1)) * _UNITS[amount.group(2)]
    return None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Parse the file; raise ConfigError naming file, section and key."""
    path = Path(path)
    parser = configparser.ConfigParser(
        interpolation=configparser.BasicInterpolation(),
        defaults={"config_dir": str(path.parent.resolve()), "config_file": str(path.resolve())},
    )
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass the path of your qmover/skytools INI file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    except configparser.Error as exc:
        first = exc.message.splitlines()[0] if hasattr(exc, "message") else str(exc)
        raise ConfigError(f"{path}: not a valid INI file ({first})") from None

    routes: dict[str, Route] = {}
    sections: dict[str, str] = {}  # route name -> how messages name its section
    for name in parser.sections():
        if name == GLOBAL_SECTION or not parser.has_option(name, "src_db"):
            continue
        partitions = _partitions(_Section(parser, path, name))
        if not parser.has_option(name, "job_name"):
            # so %(job_name)s works as in skytools; a template's routes are named per partition
            parser.set(name, "job_name", name if partitions == [None] else f"{name}_%(partition)s")
        for partition in partitions:
            section = _Section(parser, path, name, partition)
            route = _read_route(section)
            if route.name in routes:
                hint = ("put %(partition)s in it" if sections[route.name].startswith(f"[{name}] partition")
                        else "give each route its own job_name")
                raise section.fail("job_name", f"route name {route.name!r} is also used by "
                                               f"{sections[route.name]}; {hint}")
            _check_consumer_is_free(path, section.label, route, routes, sections)
            _check_kept_ids_alone(path, section.label, route, routes, sections)
            routes[route.name] = route
            sections[route.name] = section.label

    settings = _Section(parser, path, GLOBAL_SECTION)
    if parser.has_section(GLOBAL_SECTION):
        settings.check_keys(GLOBAL_KEYS)
    broker = os.environ.get("QMOVER_BROKER_URL") or settings.get("broker_url") or DEFAULT_BROKER
    # A Redis broker doubles as result backend and counter store; any other
    # broker (RabbitMQ) gets neither unless asked: Flower reads results from
    # task events, and the counters need Redis.
    redis_broker = broker if is_redis_url(broker) else None
    backend = _setting(settings, "result_backend", redis_broker)
    metrics = _setting(settings, "metrics_url", redis_broker)
    if metrics is not None and not is_redis_url(metrics):
        where = "QMOVER_METRICS_URL" if os.environ.get("QMOVER_METRICS_URL") else f"[{GLOBAL_SECTION}] metrics_url"
        raise ConfigError(f"{path}: {where}: not a Redis URL; the counters live in Redis: give "
                          f"redis://HOST:PORT/DB (or rediss://), or 'none' to turn them off")
    given: dict[str, Any] = {"celery_queue": settings.get("celery_queue") or None,
             "max_idle_connections": settings.number("max_idle_connections", int, 0),
             "routes_per_task": settings.number("routes_per_task", int, 1)}
    return Config(path=path, routes=routes, broker_url=broker, result_backend=backend, metrics_url=metrics,
                  **{key: value for key, value in given.items() if value is not None})


def is_redis_url(url: str) -> bool:
    """A redis:// or rediss:// URL, the scheme in any case."""
    return url.split("://", 1)[0].lower() in ("redis", "rediss")


def _setting(settings: _Section, key: str, default: str | None) -> str | None:
    """A [qmover] URL, overridden by QMOVER_<KEY>; 'none' means none."""
    value = os.environ.get(f"QMOVER_{key.upper()}") or settings.get(key)
    if not value:
        return default
    return None if value.lower() == "none" else value


def _check_consumer_is_free(path: Path, section: str, route: Route, routes: dict[str, Route],
                            sections: dict[str, str]) -> None:
    """Two routes with one consumer on one source queue, or one target database,
    would share a PgQ subscription or a pgq_ext position and corrupt each other."""
    for other in routes.values():
        if other.consumer != route.consumer:
            continue
        same_source = (database_of(other.src_dsn), other.src_queue) == (database_of(route.src_dsn), route.src_queue)
        if same_source or database_of(other.dst_dsn) == database_of(route.dst_dsn):
            shared = "source queue" if same_source else "target database"
            raise ConfigError(
                f"{path}: {section} consumer_name: consumer {route.consumer!r} is also used by "
                f"{sections[other.name]} on the same {shared}; give each route its own consumer_name")


def _check_kept_ids_alone(path: Path, section: str, route: Route, routes: dict[str, Route],
                          sections: dict[str, str]) -> None:
    """Source event ids are unique in one source queue only: two routes into
    one target queue would write colliding ids."""
    for other in routes.values():
        if not (route.keep_event_id or other.keep_event_id):
            continue
        shared = set(route.target_queues) & set(other.target_queues)  # a split route's mapped queues too
        if shared and database_of(other.dst_dsn) == database_of(route.dst_dsn):
            keeper = section if route.keep_event_id else sections[other.name]
            raise ConfigError(
                f"{path}: {keeper} keep_event_id: {section} and {sections[other.name]} write to the "
                f"same target queue {min(shared)!r}, where kept event ids would collide; give the "
                f"route a target queue of its own or set keep_event_id = 0")


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def _partitions(section: _Section) -> list[str | None]:
    """A template's partitions ('0-63', '1,3,8-11', '00-15' keeps the width,
    'eu,us'); [None] for a section that is one route."""
    spec = section.get("partitions")
    if spec is None:
        return [None]
    values: list[str] = []
    for entry in spec.split(","):
        entry = entry.strip()
        bounds = _RANGE.match(entry)
        if bounds:
            first, last = bounds.groups()
            if int(last) < int(first):
                raise section.fail("partitions", f"{entry!r} runs backwards; write low-high, e.g. 0-63")
            width = len(first) if first.startswith("0") and len(first) > 1 else 0
            values += [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
        elif _NAME.match(entry):
            values.append(entry)
        else:
            raise section.fail("partitions", f"{entry!r} is not a partition; write ranges and names separated "
                                             f"by commas, e.g. 0-63 or 1,3,8-11")
    repeated = sorted(value for value, times in Counter(values).items() if times > 1)
    if repeated:
        raise section.fail("partitions", f"partition {repeated[0]!r} is listed twice")
    return list(values)


def _read_route(section: _Section) -> Route:
    """The route of a section; a key left out keeps Route's default, the one place defaults are written."""
    section.check_keys(ROUTE_KEYS | SKYTOOLS_IGNORED_KEYS)
    job_name = section.require("job_name")
    src_queue = section.require("pgq_queue_name", "queue_name")
    split = _split(section)
    given: dict[str, Any] = {
        "min_count": section.number("pgq_batch_collect_events", int, 1),
        "min_interval": section.seconds("pgq_batch_collect_interval"),
        "keep_lag": section.seconds("pgq_keep_lag"),
        "loop_delay": section.number("loop_delay", float, 0),
        "move_interval": section.seconds("move_interval", positive=True),
        "move_budget": section.seconds("move_budget", positive=True),
        "ticker": _ticker_sides(section),
        "ticker_interval": section.seconds("ticker_interval", positive=True),
        "type_filter": section.names("type_filter"),
        "table_filter": tuple(name if "." in name else f"public.{name}" for name in section.names("table_filter")),
        "keep_event_id": section.flag("keep_event_id"),
        "split": split,
        "max_source_connections": section.number("max_source_connections", int, 1),
        "merge_ticks": section.flag("merge_ticks"),
        "wake_on_tick": section.flag("wake_on_tick"),
    }
    return Route(
        name=job_name,
        # python-pgq's order: pgq_consumer_id, then consumer_name, then the job
        consumer=section.get("pgq_consumer_id") or section.get("consumer_name") or job_name,
        src_dsn=section.dsn("src_db"),
        dst_dsn=section.dsn("dst_db"),
        src_queue=src_queue,
        dst_queue=None if split else section.get("dst_queue_name") or src_queue,
        **{key: value for key, value in given.items() if value is not None},
    )


def _split(section: _Section) -> Split | None:
    """split_field (or a queue_splitter's queue_field), split_map and split_unknown; None for a one-queue route."""
    field = section.get("split_field")
    if section.name in SPLITTER_SECTIONS:
        if field:
            raise section.fail("split_field", f"not in a [{section.name}] section, which names its field as "
                                              f"skytools' queue_splitter does: queue_field = extra1")
        field = _queue_field(section)
    elif section.get("queue_field"):
        raise section.fail("queue_field", "only a [queue_splitter3] section reads it, as skytools' queue_splitter "
                                          "does; elsewhere write split_field = ev_extra1")
    if not field:
        for key in ("split_map", "split_unknown"):
            if section.get(key):
                raise section.fail(key, "only means something with split_field")
        return None
    if field not in SPLIT_FIELDS:
        raise section.fail("split_field", f"{field!r} is not one of {', '.join(SPLIT_FIELDS)}")
    if section.get("dst_queue_name"):
        raise section.fail("dst_queue_name", "not with split_field: the target queues come from the field "
                                             "(see split_map, split_unknown)")
    if section.flag("keep_event_id"):
        raise section.fail("keep_event_id", "not with split_field: qmover cannot tell whether split target "
                                            "queues are shared, where kept ids would collide")
    mapping = []
    for entry in section.names("split_map"):
        value, colon, queue = entry.partition(":")
        if not colon or not value.strip() or not queue.strip():
            raise section.fail("split_map", f"{entry!r} is not value:queue")
        mapping.append((value.strip(), queue.strip()))
    return Split(field, tuple(mapping), section.get("split_unknown") or "error")


def _queue_field(section: _Section) -> str:
    """queue_field as queue_splitter reads it (an event attribute: extra1, type, ...) -> the event column."""
    value = section.get("queue_field") or "extra1"
    field = QUEUE_FIELDS.get(value.removeprefix("ev_"))
    if field is None:
        raise section.fail("queue_field", f"{value!r} is not one of {', '.join(QUEUE_FIELDS)}")
    return field


def _ticker_sides(section: _Section) -> tuple[str, ...] | None:
    value = section.get("ticker")
    if not value:
        return None
    if value.lower() not in TICKER_SIDES:
        raise section.fail("ticker", f"{value.lower()!r} is not one of {', '.join(TICKER_SIDES)}")
    return TICKER_SIDES[value.lower()]
