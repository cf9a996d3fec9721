"""Across hosts: a worker the network cuts off never stops a route for long.

Worker A runs on a host of its own (a network namespace behind a router
namespace, qmover_lab.hosts); beat, worker B and the servers (PostgreSQL
clusters and Redis, each with a password, listening on loopback and the
test network's address) on this machine.  Every partition commits events
and ticks all along.  A cut drops A's packets in the router, so nobody sees
a reset.  Each test waits for progress, and prints how long it took: the
routes A held move again through B while the cut lasts, A moves again after
the heal, and in the end every event is in the central queue exactly once.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from qmover_lab.hosts import Host, Network, Relay, cannot_make_hosts
from qmover_lab.sandbox import Cluster

from celery_helpers import Processes, RabbitVhost, wait_until
from conftest import PRODUCE_SERIES, ROUTE, PgqDatabase, live_claims, positions, run_qmover
from servers import RedisServer

pytestmark = pytest.mark.hosts

PASSWORD = "hosts-secret"
MOVE_INTERVAL = 0.5
CUT_AT_LEAST = 5.0  # seconds a cut lasts, however soon the routes move again


class Across:
    """Servers on this machine, worker A on host A, beat and worker B here."""

    def __init__(self, tmp_path: Path, partitions: int, partition_servers: int = 1, broker: str = "redis"):
        self.net = Network()
        self.host_a: Host = self.net.host("a")
        self.clusters: list[Cluster] = []
        self.central = self._database(self._cluster(), "central_events")
        servers = [self._cluster() for _ in range(partition_servers)]
        self.parts = [self._database(servers[n % partition_servers], "events") for n in range(partitions)]
        self.redis = RedisServer(address=self.net.server, password=PASSWORD)
        self.broker_url, self.broker_port = self.redis.url_at(self.net.server), self.redis.port
        self.rabbit: tuple[RabbitVhost, Relay] | None = None
        if broker == "rabbitmq":  # the machine's RabbitMQ listens on loopback: the hosts reach it through a relay
            self.rabbit = RabbitVhost(), Relay(self.net.server, 5672)
            self.broker_url = self.rabbit[0].url.replace("127.0.0.1:5672", f"{self.net.server}:{self.rabbit[1].port}")
            self.broker_port = self.rabbit[1].port
        self.config = tmp_path / "hosts.ini"
        self.config.write_text("".join(
            ROUTE.format(n=n, src=self.reached(part), dst=self.reached(self.central), interval=MOVE_INTERVAL,
                         extra="") for n, part in enumerate(self.parts))
            + f"\n[qmover]\nbroker_url = {self.broker_url}\n")
        run_qmover("install", str(self.config), check=True)
        logs = tmp_path / "logs"
        logs.mkdir()
        self.here = Processes(self.config, logs)
        self.there = Processes(self.config, logs, prefix=self.host_a.prefix)
        self._stop = threading.Event()
        self._producer: threading.Thread | None = None
        self.produced = 0

    def _cluster(self) -> Cluster:
        cluster = Cluster(auth="scram", password=PASSWORD, network=(self.net.server, str(self.net.subnet)))
        self.clusters.append(cluster)
        return cluster

    def _database(self, cluster: Cluster, queue: str) -> PgqDatabase:
        name = f"qmh_{uuid.uuid4().hex[:12]}"
        cluster.execute("postgres", f"create database {name}")
        database = PgqDatabase(name, server=f"host=127.0.0.1 port={cluster.port} user=postgres password={PASSWORD}")
        database.execute("create extension pgq")
        database.create_queue(queue)
        return database

    def reached(self, database: PgqDatabase) -> str:
        """The database's DSN as every host reaches it: at the bridge address."""
        return database.dsn.replace("host=127.0.0.1", f"host={self.net.server}")

    def port_of(self, database: PgqDatabase) -> int:
        return int(re.search(r"port=(\d+)", database.server)[1])

    # --- the load -------------------------------------------------------------
    def start_load(self, per_tick: int = 20, every: float = 0.3) -> None:
        """Each partition commits per_tick events and ticks, every `every` seconds, until stop_load()."""
        def produce() -> None:
            conns = [part.connect() for part in self.parts]
            round_no = 0
            while not self._stop.is_set():
                for n, conn in enumerate(conns):
                    with conn.cursor() as cur:
                        cur.execute(PRODUCE_SERIES, ("events", f"p{n}r{round_no}-", 40, per_tick))
                        cur.execute("select pgq.force_tick('events')")
                        cur.execute("select pgq.ticker('events')")
                    self.produced += per_tick
                round_no += 1
                self._stop.wait(every)
            for conn in conns:
                conn.close()

        self._producer = threading.Thread(target=produce, daemon=True)
        self._producer.start()

    def stop_load(self) -> None:
        self._stop.set()
        if self._producer is not None:
            self._producer.join()

    # --- what the movers do ---------------------------------------------------
    def held_on_a(self, since: float = 0.0) -> list[str]:
        pids = self.host_a.pids()
        return sorted(route for route, pid in live_claims(self.central, since).items() if pid in pids)

    def cut_while_a_holds_routes(self, port: int | None) -> list[str]:
        """Cut host A (from port, or from everything) at a moment it holds routes;
        the routes it held then.  A task holds its routes for a moment only, so
        a cut that came just after it let them go is healed and made again."""
        for _ in range(20):
            seen: list[str] = []
            wait_until(lambda found=seen: found.extend(self.held_on_a()) or found, 60, "worker A to hold a route",
                       every=0.01)
            self.host_a.cut(port)
            if port == self.broker_port:
                return seen  # A still reaches central: it lets them go itself
            held = self.held_on_a()  # A cannot let these go any more
            if held:
                return held
            self.host_a.heal()
        raise AssertionError("worker A never held a route at the moment of the cut")

    def heal_and_see_a_move(self) -> None:
        """Heal host A; it takes a route again (a claim taken after the heal).

        Worker A runs as under a supervisor that restarts it when it exits:
        on RabbitMQ, Celery's worker may stop when it reconnects while the
        broker still holds its old connection (its pidbox queue is locked)."""
        healed_at, started, restarts = self.clock(), time.monotonic(), 0

        def moves() -> bool:
            nonlocal restarts
            if self.there.exited("a"):
                restarts += 1
                self.there.worker("a", concurrency=1)
            return bool(self.held_on_a(healed_at))

        self.host_a.heal()
        wait_until(moves, 90, "worker A to move again after the heal", every=0.05)
        print(f"healed: worker A took a route again after {time.monotonic() - started:.1f} s"
              + (f" ({restarts} restarts by its supervisor)" if restarts else ""))

    def clock(self) -> float:
        """Now, by the central server's clock."""
        return float(self.central.value("select extract(epoch from now())"))

    def ticks(self) -> dict[str, int]:
        return positions(self.central)

    def moved_since(self, before: dict[str, int], routes: list[str]) -> bool:
        now = self.ticks()
        return all(now.get(route, 0) > before.get(route, 0) for route in routes)

    def drained_exactly_once(self, timeout: float = 120) -> None:
        """After stop_load(): every event in the central queue, once."""
        source = Counter(event for part in self.parts for event in part.events("events"))
        wait_until(lambda: len(self.central.events("central_events")) >= sum(source.values()), timeout,
                   f"{sum(source.values())} events in the central queue")
        time.sleep(2 * MOVE_INTERVAL + 1)  # a straggler doubling an event would show now
        assert Counter(self.central.events("central_events")) == source

    def close(self) -> None:
        self.stop_load()
        self.there.stop()
        self.here.stop()
        self.net.close()
        self.redis.close()
        if self.rabbit is not None:
            self.rabbit[1].close()
            self.rabbit[0].close()
        for cluster in self.clusters:
            cluster.close()


@pytest.fixture
def across(tmp_path):
    reason = cannot_make_hosts()
    if reason:
        pytest.skip(reason)
    made: list[Across] = []

    def build(partitions: int = 8, partition_servers: int = 1, broker: str = "redis") -> Across:
        made.append(Across(tmp_path, partitions, partition_servers, broker))
        return made[-1]

    yield build
    for scene in made:
        scene.close()


def routes_moved_after_a_cut(scene: Across, cut_port: int | None, drain: bool = True) -> None:
    """Both workers move under the load; A is cut (from cut_port, or from
    everything) while it holds routes; they move again through B while the cut
    lasts; after the heal A moves again, and (drain) every event arrives once."""
    scene.there.worker("a", concurrency=1)
    scene.here.worker("b", concurrency=1)
    scene.here.beat()
    scene.start_load()
    held = scene.cut_while_a_holds_routes(cut_port)
    cut_at = time.monotonic()
    wait_until(lambda: not set(held) & set(scene.held_on_a()), 90, f"worker A to let go of {held}")
    before = scene.ticks()
    wait_until(lambda: scene.moved_since(before, held), 90, f"{held} to move again while A is cut off")
    print(f"cut from {cut_port or 'everything'}: {held} moved again after {time.monotonic() - cut_at:.1f} s")
    time.sleep(max(0.0, cut_at + CUT_AT_LEAST - time.monotonic()))  # the fault's length, not a wait for a result
    scene.heal_and_see_a_move()
    if drain:
        scene.stop_load()
        scene.drained_exactly_once()


def test_a_worker_cut_from_central_between_batches_gives_its_routes_up(across):
    scene = across()
    routes_moved_after_a_cut(scene, scene.port_of(scene.central))


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_worker_cut_from_the_broker_lets_its_routes_go(across, broker):
    scene = across(broker=broker)
    routes_moved_after_a_cut(scene, scene.broker_port)


def copying(database: PgqDatabase, host: Host) -> bool:
    """A COPY from the host runs in the database now."""
    return bool(database.value("select count(*) from pg_stat_activity where client_addr = %s and query ilike 'copy %%'",
                               (host.address,)))


def big_batch_moved_after_a_cut(scene: Across, cut_port: int, copying_in: PgqDatabase) -> None:
    """A large batch in partition 0; worker A alone starts copying it; A is cut
    (from cut_port) mid-COPY; then B takes the route over and the load goes on."""
    scene.parts[0].produce_series("events", 300_000, size=60, tag="big")
    scene.parts[0].tick("events")
    scene.there.worker("a", concurrency=1)
    scene.here.beat()
    wait_until(lambda: copying(copying_in, scene.host_a), 60, "worker A to copy the large batch", every=0.01)
    scene.host_a.cut(cut_port)
    cut_at = time.monotonic()
    scene.here.worker("b", concurrency=1)
    scene.start_load()
    wait_until(lambda: scene.ticks().get("partition_0", 0) > 1, 90, "the large batch to move while A is cut off")
    print(f"cut mid-COPY (port {cut_port}): the large batch moved after {time.monotonic() - cut_at:.1f} s")
    scene.heal_and_see_a_move()
    scene.stop_load()
    scene.drained_exactly_once()


def test_a_worker_cut_from_central_mid_copy_of_a_large_batch(across):
    scene = across()
    big_batch_moved_after_a_cut(scene, scene.port_of(scene.central), scene.central)


def test_a_worker_cut_from_one_partition_mid_copy(across):
    scene = across(partitions=4, partition_servers=2)
    big_batch_moved_after_a_cut(scene, scene.port_of(scene.parts[0]), scene.parts[0])


def test_a_worker_cut_from_everything_then_flapping_moves_every_event_once(across):
    """Cut from everything and healed; then down and up every 3 s for a minute,
    while every route keeps moving; then A moves again."""
    scene = across()
    routes_moved_after_a_cut(scene, None, drain=False)
    before, flapping_until = scene.ticks(), time.monotonic() + 60
    while time.monotonic() < flapping_until:
        scene.host_a.cut()
        time.sleep(3)
        scene.host_a.heal()
        time.sleep(3)
    assert scene.moved_since(before, [f"partition_{n}" for n in range(len(scene.parts))])
    scene.heal_and_see_a_move()
    scene.stop_load()
    scene.drained_exactly_once()


REDBEAT = ("beat", "-l", "info", "-S", "redbeat.RedBeatScheduler", "--max-interval", "1")
ACQUIRED = "beat: Acquired lock"


def test_the_active_beats_host_cut_off_the_standby_takes_over(across):
    """Beat under celery-redbeat on host A, a standby here: once A is cut from
    everything, the standby takes the lock and every route moves again."""
    scene = across(partitions=4)
    scene.there.start("beat_a", *REDBEAT)
    wait_until(lambda: ACQUIRED in scene.there.log("beat_a"), 30, "beat A to take the lock")
    scene.here.start("beat_b", *REDBEAT)
    scene.here.worker("b", concurrency=2)
    scene.start_load()
    routes = [f"partition_{n}" for n in range(len(scene.parts))]
    before = scene.ticks()
    wait_until(lambda: scene.moved_since(before, routes), 60, "every route to move under beat A")
    scene.host_a.cut()
    cut_at = time.monotonic()
    before = scene.ticks()
    wait_until(lambda: scene.moved_since(before, routes), 90, "every route to move again under the standby")
    print(f"beat's host cut off: every route moved again after {time.monotonic() - cut_at:.1f} s")
    assert ACQUIRED in scene.here.log("beat_b")
    # Beat A could not extend its lock: it stopped, for its supervisor to start it again as the standby.
    wait_until(lambda: scene.there.exited("beat_a"), 60, "beat A to stop")
    scene.host_a.heal()
    scene.there.start("beat_a", *REDBEAT)
    before = scene.ticks()
    wait_until(lambda: scene.moved_since(before, routes), 60, "every route to move after the heal")
    scene.stop_load()
    scene.drained_exactly_once()


def test_a_slow_lossy_link_to_every_server_moves_every_event_once(across, tmp_path):
    """Worker A alone, each of its database connections 200 ms longer (a
    delay line) and 1 % of its packets dropped: it keeps up with a load it can
    carry (4 partitions x 10 events/s: a batch takes 1.2 s over that link, six
    round trips), every event once."""
    scene = across(partitions=4)
    relays = {port: Relay(scene.net.server, port, delay=0.1)
              for port in {scene.port_of(scene.central), *(scene.port_of(part) for part in scene.parts)}}
    slow = tmp_path / "slow.ini"
    text = scene.config.read_text()
    for port, relay in relays.items():
        text = text.replace(f"port={port} ", f"port={relay.port} ")
    slow.write_text(text)
    try:
        a = Processes(slow, scene.there.logdir, prefix=scene.host_a.prefix)
        scene.host_a.lossy(0.01)
        a.worker("a", concurrency=4)  # a process per route: over this link a batch waits on round trips
        scene.here.beat()
        scene.start_load(per_tick=10, every=1.0)
        time.sleep(30)  # the load's length, not a wait for a result
        scene.stop_load()
        stopped = time.monotonic()
        scene.drained_exactly_once(timeout=120)
        print(f"slow lossy link: drained {time.monotonic() - stopped:.1f} s after the load stopped")
        a.stop()
    finally:
        for relay in relays.values():
            relay.close()
