"""Hosts on one machine: network namespaces behind a router namespace, whose
links a test cuts and heals.

This machine (the root namespace) plays the servers' host: its end of a
veth pair to the router holds the servers' address, and the servers a test
starts listen there beside loopback.  Each Host is a namespace with one veth
to the router and no route beyond the test's /24.  A cut drops packets in
the router as they pass (iptables FORWARD), both ways, as a failed switch or
a firewall does: neither end sees a reset or an error, and a new connection
waits for its timeout.  (Dropping in a host's own OUTPUT chain would not do:
the kernel tells the sender at once.)  Addresses come from 198.18.0.0/15
(set aside for network tests), a /24 per Network, chosen under a lock so
that test runs side by side never share one.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

RANGE = ipaddress.ip_network("198.18.0.0/15")
LOCK_FILE = "/run/qmover-hosts.lock"
CHAIN = "QMOVER_CUT"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def cannot_make_hosts() -> str | None:
    """Why this machine cannot play hosts (one line), or None when it can."""
    if os.geteuid() != 0:
        return "the across-hosts tests make network namespaces and need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the across-hosts tests need {tool} (scripts/setup.sh installs it)"
    probe = f"qmover-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
        subprocess.run(["ip", "netns", "exec", probe, "iptables", "-w", "-S"], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        return f"this machine cannot make a network namespace with iptables in it: {exc.stderr.decode().strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@contextmanager
def _allocation_lock() -> Iterator[None]:
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_left_behind() -> None:
    """The namespaces and links of test runs that died before they removed them (their pid is gone)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    shown = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    links = [line.split()[1].split("@")[0].rstrip(":") for line in shown.splitlines()]
    for name in names + links:
        owner = name.removeprefix("qmover-").split("-")[0]
        if not owner.startswith("qmb") or not owner[3:].isdigit() or os.path.exists(f"/proc/{owner[3:]}"):
            continue
        if name in links:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        else:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of RANGE that no interface of this machine has an address in."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], check=True, capture_output=True, text=True).stdout
    used = [ipaddress.ip_interface(word).network for line in shown.splitlines() for word in line.split()
            if "/" in word and word[0].isdigit()]
    for subnet in RANGE.subnets(new_prefix=24):
        if not any(subnet.overlaps(other) for other in used):
            return subnet  # type: ignore[return-value]
    raise RuntimeError(f"every /24 of {RANGE} is in use on this machine")


@dataclass
class Host:
    """A namespace with one address, joined to the servers' host through the
    router; cut() drops its packets to and from the servers' host there."""

    network: Network
    name: str
    namespace: str
    address: str
    cuts: list[str] = field(default_factory=list)  # what is cut now, for the test's messages

    @property
    def prefix(self) -> list[str]:
        """The command line prefix that runs a program on this host."""
        return ["ip", "netns", "exec", self.namespace]

    def cut(self, port: int | None = None) -> None:
        """Drop every packet between this host and the servers' host, or only
        those of one server's port; until heal()."""
        server = self.network.server
        to_port = [] if port is None else ["-p", "tcp", "--dport", str(port)]
        from_port = [] if port is None else ["-p", "tcp", "--sport", str(port)]
        self.network.drop(self, "-s", self.address, "-d", server, *to_port)
        self.network.drop(self, "-s", server, "-d", self.address, *from_port)
        self.cuts.append("everything" if port is None else f"port {port}")

    def lossy(self, probability: float) -> None:
        """Drop each packet to or from this host with this probability; until heal()."""
        for way in ("-s", "-d"):
            self.network.drop(self, way, self.address, "-m", "statistic", "--mode", "random",
                              "--probability", str(probability))
        self.cuts.append(f"{probability:.0%} of packets")

    def heal(self) -> None:
        """Every cut of this host ends."""
        self.network.router("iptables", "-w", "-F", self.chain)
        self.cuts.clear()

    @property
    def chain(self) -> str:
        return f"{CHAIN}_{self.name.upper()}"

    def pids(self) -> set[int]:
        """The processes running in this host's namespace."""
        shown = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True).stdout
        return {int(pid) for pid in shown.split()}


class Network:
    """The router, its link to this machine (the servers' host), and the hosts behind it.

    Each link is a /30 of the Network's /24: the first joins this machine
    (.1, the servers' address) to the router (.2); host n has .4n+2, the
    router .4n+1.  This machine reaches the /24 through the router (a route
    that goes with the link); a host reaches only the /24.
    """

    def __init__(self) -> None:
        with _allocation_lock():
            _remove_left_behind()
            self.subnet = _free_subnet()
            self.link = f"qmb{os.getpid()}"
            self.namespace = f"qmover-{self.link}-router"
            ip("netns", "add", self.namespace)
            ip("link", "add", self.link, "type", "veth", "peer", "name", "uplink", "netns", self.namespace)
            ip("addr", "add", f"{self.server}/30", "dev", self.link)
            ip("link", "set", self.link, "up")
        self.router("ip", "addr", "add", f"{self._address(2)}/30", "dev", "uplink")
        for device in ("uplink", "lo"):
            self.router("ip", "link", "set", device, "up")
        self.router("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        ip("route", "add", str(self.subnet), "via", self._address(2), "dev", self.link)
        self.hosts: list[Host] = []

    def _address(self, offset: int) -> str:
        return str(self.subnet.network_address + offset)

    @property
    def server(self) -> str:
        """The servers' host's address on this network."""
        return self._address(1)

    def router(self, *command: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.namespace, *command], check=True, capture_output=True)

    def drop(self, host: Host, *match: str) -> None:
        """Drop the packets to or from the host that match, as the router forwards them."""
        self.router("iptables", "-w", "-A", host.chain, *match, "-j", "DROP")

    def host(self, name: str) -> Host:
        """A new host behind the router, with nothing cut."""
        number = len(self.hosts) + 1
        namespace = f"qmover-{self.link}-{name}"
        host = Host(self, name, namespace, self._address(4 * number + 2))
        ip("netns", "add", namespace)
        ip("-n", self.namespace, "link", "add", f"h{number}", "type", "veth", "peer", "name", "eth0",
           "netns", namespace)
        self.router("ip", "addr", "add", f"{self._address(4 * number + 1)}/30", "dev", f"h{number}")
        self.router("ip", "link", "set", f"h{number}", "up")
        ip("-n", namespace, "addr", "add", f"{host.address}/30", "dev", "eth0")
        for device in ("eth0", "lo"):
            ip("-n", namespace, "link", "set", device, "up")
        ip("-n", namespace, "route", "add", str(self.subnet), "via", self._address(4 * number + 1))
        self.hosts.append(host)
        self.router("iptables", "-w", "-N", host.chain)
        self.router("iptables", "-w", "-A", "FORWARD", "-j", host.chain)
        return host

    def close(self) -> None:
        """Kill what runs on the hosts, then remove them, the router and its link."""
        for host in self.hosts:
            for pid in host.pids():
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.link], capture_output=True)
        self.hosts.clear()


class Relay:
    """A TCP relay on this machine: connections to (address, a free port) go on
    to a server on loopback, each byte `delay` seconds late each way.

    It gives the hosts a server that listens on loopback alone (the machine's
    RabbitMQ), or a slow link (a delay line: the kernel here has no netem).
    The server sees the relay's loopback address as its client.
    """

    def __init__(self, address: str, server_port: int, delay: float = 0.0):
        self.server_port = server_port
        self.delay = delay
        self.listener = socket.create_server((address, 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.server_port))
            except OSError:
                continue
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                line: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(source, line), daemon=True).start()
                threading.Thread(target=self._write, args=(line, sink), daemon=True).start()

    def _read(self, source: socket.socket, line: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            line.put((time.monotonic() + self.delay, data))
            if not data:
                return

    @staticmethod
    def _write(line: queue.Queue[tuple[float, bytes]], sink: socket.socket) -> None:
        while True:
            due, data = line.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
