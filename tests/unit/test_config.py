"""The INI format: skytools' files work unchanged; errors name file, section, key."""

from __future__ import annotations

import importlib.metadata

import pytest

from qmover.config import DEFAULT_BROKER, Config, Route, load_config, parse_seconds
from qmover.errors import ConfigError

from conftest import run_qmover

MANUAL_EXAMPLE = """\
[queue_mover3]
job_name = eventlog_to_target_mover
src_db = dbname=sourcedb
dst_db = dbname=targetdb
pgq_queue_name = eventlog
dst_queue_name = copy_of_eventlog
pidfile = log/%(job_name)s.pid
logfile = pid/%(job_name)s.log
"""


def write(tmp_path, text: str):
    path = tmp_path / "mover.ini"
    path.write_text(text)
    return path


def test_a_key_left_out_keeps_the_default_written_in_route_and_config(tmp_path):
    config = load_config(write(tmp_path, "[r]\nsrc_db = dbname=a\ndst_db = dbname=b\npgq_queue_name = q\n"))
    assert config.routes["r"] == Route(name="r", consumer="r", src_dsn="dbname=a", dst_dsn="dbname=b", src_queue="q",
                                       dst_queue="q")
    defaults = Config(path=config.path, routes=config.routes)
    assert (config.celery_queue, config.routes_per_task, config.max_idle_connections) == (
        defaults.celery_queue, defaults.routes_per_task, defaults.max_idle_connections)


def test_every_key_given_reaches_the_route(tmp_path):
    config = load_config(write(tmp_path, "[r]\nsrc_db = dbname=a\ndst_db = dbname=b\npgq_queue_name = q\n"
                                         "loop_delay = 0\nmove_interval = 2 s\nmove_budget = 3\nticker = both\n"
                                         "ticker_interval = 4\nkeep_event_id = yes\nmerge_ticks = off\n"
                                         "max_source_connections = 2\npgq_keep_lag = 5\n"))
    route = config.routes["r"]
    assert (route.loop_delay, route.move_interval, route.move_budget, route.ticker, route.ticker_interval) == (
        0.0, 2.0, 3.0, ("source", "target"), 4.0)
    assert (route.keep_event_id, route.merge_ticks, route.max_source_connections, route.keep_lag) == (
        True, False, 2, 5.0)


def test_manual_example_verbatim(tmp_path):
    config = load_config(write(tmp_path, MANUAL_EXAMPLE))
    [route] = config.select()
    assert route.name == "eventlog_to_target_mover"
    assert route.consumer == "eventlog_to_target_mover"
    assert (route.src_dsn, route.dst_dsn) == ("dbname=sourcedb", "dbname=targetdb")
    assert (route.src_queue, route.dst_queue) == ("eventlog", "copy_of_eventlog")
    assert (route.min_count, route.min_interval, route.keep_lag, route.loop_delay) == (None, None, None, 1.0)
    assert config.broker_url == config.result_backend == DEFAULT_BROKER


@pytest.mark.parametrize("keys, consumer", [
    ("pgq_consumer_id = legacy\n", "legacy"),
    ("pgq_consumer_id = legacy\nconsumer_name = newer\n", "legacy"),  # python-pgq reads pgq_consumer_id first
    ("consumer_name = newer\n", "newer"),
])
def test_the_consumer_name_is_read_as_python_pgq_reads_it(tmp_path, keys, consumer):
    [route] = load_config(write(tmp_path, MANUAL_EXAMPLE + keys)).select()
    assert route.consumer == consumer


def test_several_routes_defaults_and_aliases(tmp_path, monkeypatch):
    monkeypatch.delenv("QMOVER_BROKER_URL", raising=False)
    monkeypatch.setenv("QMOVER_RESULT_BACKEND", "redis://127.0.0.1:6379/9")
    config = load_config(write(tmp_path, MANUAL_EXAMPLE + """
[partition_2]
src_db = dbname=part2 password=%(job_name)s-secret
dst_db = dbname=central
queue_name = eventlog
consumer_name = mover_p2
pgq_batch_collect_events = 500
pgq_batch_collect_interval = 5 seconds
pgq_keep_lag = 00:01:30
loop_delay = 0.25

[qmover]
broker_url = redis://127.0.0.1:6379/3

[some_other_section]
anything = goes
"""))
    assert list(config.routes) == ["eventlog_to_target_mover", "partition_2"]
    route = config.routes["partition_2"]
    assert route.consumer == "mover_p2"
    assert route.src_dsn == "dbname=part2 password=partition_2-secret"
    assert route.dst_queue == route.src_queue == "eventlog" and route.kind == "queue"
    assert (route.min_count, route.min_interval, route.keep_lag, route.loop_delay) == (500, 5.0, 90.0, 0.25)
    assert config.broker_url == "redis://127.0.0.1:6379/3"
    assert config.result_backend == "redis://127.0.0.1:6379/9"
    assert [r.name for r in config.select(["partition_2"])] == ["partition_2"]
    assert load_config(write(tmp_path, MANUAL_EXAMPLE + "[fan_out]\nsrc_db = dbname=sourcedb\n"
                             "dst_db = dbname=other\npgq_queue_name = eventlog\n")).routes  # own consumer: fine
    assert route.src_display == "dbname=part2"  # never the password


TEMPLATE = """\
[part]
partitions = {spec}
src_db = host=db%(partition)s dbname=part_%(partition)s password=secret
dst_db = dbname=central
pgq_queue_name = events
dst_queue_name = central_events
pidfile = %(job_name)s.pid
"""


def test_a_template_expands_into_one_route_per_partition(tmp_path):
    config = load_config(write(tmp_path, TEMPLATE.format(spec="00-02, 7,eu") + "move_interval = 0.5\n"))
    assert list(config.routes) == ["part_00", "part_01", "part_02", "part_7", "part_eu"]
    route = config.routes["part_7"]
    assert (route.consumer, route.src_dsn) == ("part_7", "host=db7 dbname=part_7 password=secret")
    assert (route.dst_queue, route.move_interval) == ("central_events", 0.5)
    named = load_config(write(tmp_path, TEMPLATE.format(spec="1-2") + "job_name = mover_%(partition)s\n"))
    assert [r.consumer for r in named.select()] == ["mover_1", "mover_2"]


@pytest.mark.parametrize("spec, extra, message", [
    ("", "", "[part] partitions: '' is not a partition"),
    ("5-3", "", "[part] partitions: '5-3' runs backwards"),
    ("1-", "", "[part] partitions: '1-' is not a partition"),
    ("1,,2", "", "[part] partitions: '' is not a partition"),
    ("1-3,2", "", "[part] partitions: partition '2' is listed twice"),
    ("1-3", "type_filter = t_%(partiton)s\n", "[part] type_filter (partition 1): bad %(...)s reference"),
    ("1-3", "job_name = mover\n", "[part] job_name (partition 2): route name 'mover' is also used by [part] "
                                   "partition 1; put %(partition)s in it"),
    ("1-3", "loop_delay = -%(partition)s\n", "[part] loop_delay (partition 1): must be at least 0"),
])
def test_template_errors_name_file_section_key_and_partition(tmp_path, spec, extra, message):
    path = write(tmp_path, TEMPLATE.format(spec=spec) + extra)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_status_lists_every_route_of_a_template(tmp_path):
    path = write(tmp_path, TEMPLATE.format(spec="1-3").replace("host=db%(partition)s", "host=127.0.0.1 port=1"))
    result = run_qmover("status", str(path))
    assert result.returncode == 1  # nothing answers on port 1
    assert [line.split()[0] for line in result.stdout.splitlines()[1:4]] == ["part_1", "part_2", "part_3"]


ROUTE_ONLY = "[r]\nsrc_db = dbname=a\ndst_db = dbname=b\nqueue_name = q\n"


@pytest.mark.parametrize("settings, backend, metrics", [
    ("", DEFAULT_BROKER, DEFAULT_BROKER),  # a Redis broker doubles as both
    ("broker_url = rediss://r:6380/2\n", "rediss://r:6380/2", "rediss://r:6380/2"),
    ("broker_url = amqp://guest:guest@127.0.0.1:5672//\n", None, None),  # RabbitMQ alone: neither
    ("broker_url = amqp://h//\nresult_backend = rpc://\nmetrics_url = redis://m/1\n", "rpc://", "redis://m/1"),
    ("result_backend = none\nmetrics_url = none\n", None, None),
])
def test_result_backend_and_metrics_follow_the_broker_only_when_it_is_redis(tmp_path, monkeypatch, settings,
                                                                           backend, metrics):
    for name in ("QMOVER_BROKER_URL", "QMOVER_RESULT_BACKEND", "QMOVER_METRICS_URL"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(write(tmp_path, ROUTE_ONLY + "[qmover]\n" + settings))
    assert (config.result_backend, config.metrics_url) == (backend, metrics)

    from qmover.tasks.schedule import celery_settings
    assert celery_settings(config)["result_backend"] == backend


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QMOVER_BROKER_URL", "amqp://h//")
    monkeypatch.setenv("QMOVER_METRICS_URL", "redis://m/3")
    monkeypatch.delenv("QMOVER_RESULT_BACKEND", raising=False)
    config = load_config(write(tmp_path, ROUTE_ONLY + "[qmover]\nbroker_url = redis://r/1\n"))
    assert (config.broker_url, config.result_backend, config.metrics_url) == ("amqp://h//", None, "redis://m/3")
    monkeypatch.setenv("QMOVER_METRICS_URL", "http://m/3")
    with pytest.raises(ConfigError, match="QMOVER_METRICS_URL: not a Redis URL"):
        load_config(write(tmp_path, ROUTE_ONLY))


@pytest.mark.parametrize("text, seconds", [
    ("30", 30.0), ("1.5", 1.5), ("2 s", 2.0), ("5 minutes", 300.0), ("1 hour", 3600.0),
    ("2 days", 172800.0), ("00:05:00", 300.0), ("1:00:00.5", 3600.5), ("soon", None), ("5 parsecs", None),
])
def test_durations(text, seconds):
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("[r]\nsrc_db = dbname=a\nqueue_name = q\n", "[r] dst_db: missing"),
    ("[r]\nsrc_db = dbname=a\ndst_db = dbname=b\n", "[r] pgq_queue_name: missing"),
    ("[r]\nsrc_db = dbname=a\ndst_db = dbname=b\nqueue_name = q\nlogfile = %(nope)s.log\n",
     "[r] logfile: bad %(...)s reference"),
    ("[r]\nsrc_db = dbname=a\ndst_db = dbname=b\nqueue_name = q\npgq_batch_collect_events = lots\n",
     "[r] pgq_batch_collect_events: 'lots' is not a whole number"),
    ("[r]\nsrc_db = dbname=a\ndst_db = dbname=b\nqueue_name = q\npgq_keep_lag = a while\n",
     "[r] pgq_keep_lag: 'a while' is not a duration"),
    ("[r]\nsrc_db = dbname=a\ndst_db = dbname=b\nqueue_name = q\nloop_delay = -1\n",
     "[r] loop_delay: must be at least 0"),
    ("[r]\nsrc_db = dbname=a password=hunter2 oops\ndst_db = dbname=b\nqueue_name = q\n",
     "[r] src_db: not a valid libpq connection string"),
    ("[a]\njob_name = same\nsrc_db = dbname=a\ndst_db = dbname=b\nqueue_name = q\n"
     "[b]\njob_name = same\nsrc_db = dbname=a\ndst_db = dbname=b\nqueue_name = q\n",
     "[b] job_name: route name 'same' is also used by [a]"),
    ("[a]\nsrc_db = dbname=a\ndst_db = dbname=t\nqueue_name = q\nconsumer_name = c\n"
     "[b]\nsrc_db = dbname=b\ndst_db = dbname=t\nqueue_name = q\nconsumer_name = c\n",
     "[b] consumer_name: consumer 'c' is also used by [a] on the same target database"),
    ("[a]\nsrc_db = dbname=a\ndst_db = dbname=t1\nqueue_name = q\nconsumer_name = c\n"
     "[b]\nsrc_db = dbname=a\ndst_db = dbname=t2\nqueue_name = q\nconsumer_name = c\n",
     "[b] consumer_name: consumer 'c' is also used by [a] on the same source queue"),
    ("[qmover]\nbroker = redis://x\n", "[qmover] broker: unknown key; did you mean 'broker_url'?"),
    ("[qmover]\nbroker_url = amqp://guest:hunter2@h//\nmetrics_url = amqp://guest:hunter2@h//\n",
     "[qmover] metrics_url: not a Redis URL"),
    ("src_db = dbname=a\n", "not a valid INI file"),
    ("[r]\nsrc_db = dbname=a\n[r]\n", "not a valid INI file"),
])
def test_errors_name_file_section_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_config_error_exits_2_before_touching_any_database(tmp_path):
    # The source is unreachable: a connection attempt would say so instead.
    path = write(tmp_path, "[r]\nsrc_db = host=127.0.0.1 port=1 dbname=x\nqueue_name = q\n")
    for command in ("install", "run", "status", "rewind", "reset", "unregister"):
        result = run_qmover(command, str(path))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"qmover: error: {path}: [r] dst_db: missing; every route needs it"]


def test_a_route_side_is_source_or_target_and_nothing_else(tmp_path):
    [route] = load_config(write(tmp_path, MANUAL_EXAMPLE)).select()
    assert (route.dsn("source"), route.dsn("target")) == ("dbname=sourcedb", "dbname=targetdb")
    with pytest.raises(ValueError, match="not 'targte'"):
        route.dsn("targte")  # once, any word but "source" meant the target


def test_qmover_says_its_version():
    result = run_qmover("--version", check=True)
    assert result.stdout.strip() == f"qmover {importlib.metadata.version('qmover')}"


def test_routes_are_equal_when_every_field_is_and_hash_alike_then():
    made = {"name": "r", "consumer": "r", "src_dsn": "dbname=a", "dst_dsn": "dbname=b", "src_queue": "q",
            "dst_queue": "t"}
    route = Route(**made)
    assert route == Route(**made) and hash(route) == hash(Route(**made))
    assert route != Route(**{**made, "consumer": "other"}) and route != Route(**{**made, "keep_lag": 1.0})
    assert route != ("r",) and {route: 1}[Route(**made)] == 1
