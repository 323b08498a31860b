"""Hosts on one machine: network namespaces on one bridge, made and removed by whoever asks.

Each host is a namespace with one veth into a bridge in the root namespace and an address on a
private /24; the bridge itself takes the .254 address, so a process in the root namespace can
talk to every host. Only these addresses (and loopback) are ever used. `rate` caps every host's
link in both directions with a token bucket (``tc tbf``), to model a slower network. Needs root and
iproute2; without them :func:`hosts` raises rather than pretending.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_serials = itertools.count()


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    interface: str  # its end of the veth, inside the namespace

    def command(self, *args: str) -> list[str]:
        """`args` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]


@dataclass(frozen=True)
class Network:
    hosts: list[Host]
    root_address: str  # the bridge's address: the root namespace on this network


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")


@contextmanager
def hosts(n: int, *, rate: str | None = None) -> Iterator[Network]:
    """`n` namespaced hosts on a fresh bridge; `rate` (e.g. ``"1gbit"``) caps each host's link."""
    if os.geteuid() != 0 or shutil.which("ip") is None or (rate and shutil.which("tc") is None):
        raise RuntimeError("namespaced hosts need root and iproute2 (`ip netns`, and `tc` for a rate cap)")
    serial = next(_serials)  # names unique per call: a namespace kept alive by a process outlives its name
    tag = f"{os.getpid() % 10000}{serial % 10}"
    subnet = f"10.{200 + os.getpid() % 50}.{(os.getpid() + serial) % 250}"
    bridge = f"tbr{tag}"
    made: list[Host] = []
    try:
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{subnet}.254/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for i in range(n):
            outside, inside = f"tv{tag}h{i}", f"tv{tag}n{i}"
            host = Host(f"tempo-{tag}-{i}", f"{subnet}.{i + 1}", inside)
            _run("ip", "netns", "add", host.namespace)
            made.append(host)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            _run("ip", "link", "set", outside, "master", bridge, "up")
            _run("ip", "link", "set", inside, "netns", host.namespace)
            for args in (("addr", "add", f"{host.address}/24", "dev", inside), ("link", "set", inside, "up"),
                         ("link", "set", "lo", "up")):
                _run("ip", "-n", host.namespace, *args)
            if rate:
                tbf = ("root", "tbf", "rate", rate, "burst", "1mb", "latency", "50ms")
                _run("tc", "qdisc", "add", "dev", outside, *tbf)
                _run(*host.command("tc", "qdisc", "add", "dev", inside, *tbf))
        yield Network(made, f"{subnet}.254")
    finally:
        for i, host in enumerate(made):
            subprocess.run(["ip", "link", "del", f"tv{tag}h{i}"], capture_output=True)  # both veth ends
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
