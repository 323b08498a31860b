"""Hosts for multi-host tests: network namespaces on one bridge, made and removed by the tests.

Each host is a namespace with one veth into a bridge in the root namespace and an address on a
private /24; only these addresses (and loopback) are used. Needs root and `ip`: without them the
tests fail, loudly, rather than skip, so that CI cannot pass without running them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str

    def command(self, *args: str) -> list[str]:
        """`args` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@contextmanager
def hosts(n: int) -> Iterator[list[Host]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("multi-host tests need root and iproute2 (`ip netns`) to make network namespaces")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    bridge = f"tbr{tag}"
    made: list[Host] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        for i in range(n):
            host = Host(f"tempo-{tag}-{i}", f"{subnet}.{i + 1}")
            outside, inside = f"tv{tag}h{i}", f"tv{tag}n{i}"
            _ip("netns", "add", host.namespace)
            made.append(host)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", bridge, "up")
            _ip("link", "set", inside, "netns", host.namespace)
            for args in (("addr", "add", f"{host.address}/24", "dev", inside), ("link", "set", inside, "up"),
                         ("link", "set", "lo", "up")):
                _ip("-n", host.namespace, *args)
        yield made
    finally:
        for host in made:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
