"""A test host of its own: a network namespace joined to this machine by a veth pair.

A client run inside it (``host.popen([...])``) reaches the machine only through the
veth link, so a test can take the link down (its packets silently stop, as on a train
going into a tunnel) or move it to a new address (Wi-Fi to cellular), for real. All
addresses are on the pair's own /24 (``10.213.<n>.0/24``); nothing leaves the machine.
Needs root and iproute2 (``ip``), which the test machines have.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest


def ip(*args: str, netns: str | None = None) -> None:
    """One ``ip`` command (in ``netns`` if given); raises with its stderr if it fails."""
    command = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=15)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")


@dataclass
class NetnsHost:
    name: str
    host_if: str
    ns_if: str
    subnet: int
    address: str
    """The namespace's current address."""

    @property
    def gateway(self) -> str:
        """This machine's address on the link: what a client in the namespace connects to."""
        return f"10.213.{self.subnet}.1"

    def link_down(self) -> None:
        """The link goes away under the client: no error, its packets just stop."""
        ip("link", "set", self.host_if, "down")

    def link_up(self) -> None:
        ip("link", "set", self.host_if, "up")
        ip("route", "replace", "default", "via", self.gateway, netns=self.name)

    def change_address(self) -> str:
        """A new address for the namespace, the old one removed (a network change)."""
        last = int(self.address.rsplit(".", 1)[1])
        new = f"10.213.{self.subnet}.{last + 1}"
        ip("addr", "add", f"{new}/24", "dev", self.ns_if, netns=self.name)
        ip("addr", "del", f"{self.address}/24", "dev", self.ns_if, netns=self.name)
        ip("route", "replace", "default", "via", self.gateway, "src", new, netns=self.name)
        self.address = new
        return new

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kwargs)


def require_netns() -> None:
    """Network-namespace tests fail (never skip) where they cannot run."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.fail("network namespace tests need root and iproute2 (`ip`)")


@contextmanager
def netns_host() -> Iterator[NetnsHost]:
    require_netns()
    tag = secrets.token_hex(3)
    subnet = int(tag[:2], 16) % 250 + 2
    host = NetnsHost(
        name=f"dmc{tag}",
        host_if=f"vdh{tag}",
        ns_if=f"vdn{tag}",
        subnet=subnet,
        address=f"10.213.{subnet}.2",
    )
    ip("netns", "add", host.name)
    try:
        ip("link", "add", host.host_if, "type", "veth", "peer", "name", host.ns_if)
        ip("link", "set", host.ns_if, "netns", host.name)
        ip("addr", "add", f"{host.gateway}/24", "dev", host.host_if)
        ip("link", "set", host.host_if, "up")
        ip("addr", "add", f"{host.address}/24", "dev", host.ns_if, netns=host.name)
        ip("link", "set", host.ns_if, "up", netns=host.name)
        # the new address of change_address outlives the old one (by default removing a
        # primary address removes its secondaries too)
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                host.name,
                "sh",
                "-c",
                f"echo 1 > /proc/sys/net/ipv4/conf/{host.ns_if}/promote_secondaries",
            ],
            check=True,
            timeout=15,
        )
        ip("link", "set", "lo", "up", netns=host.name)
        ip("route", "add", "default", "via", host.gateway, netns=host.name)
        yield host
    finally:
        subprocess.run(["ip", "link", "del", host.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", host.name], capture_output=True, check=False)
