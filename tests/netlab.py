"""Hosts of our own for multi-host tests: network namespaces wired to one bridge, as a LAN.

Why a module: the multi-host test and the broker-group partition test both need "a few hosts on
a switch whose cables can be pulled", and one copy of that keeps them honest about the same
network. Root only: ``lab(...)`` skips the test with the reason where namespaces cannot be made.
Everything created is deleted on teardown; nothing is created in the root namespace.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)


def must(*argv: str) -> None:
    proc = run(*argv)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


@dataclass
class NetLab:
    """Namespaces ``<tag>sw`` (a bridge) and one per host in ``hosts`` (name -> IPv4 address,
    on a /24), each host's ``eth0`` a veth whose peer ``p<host>`` is a port of the bridge."""

    tag: str
    hosts: dict[str, str]
    created: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}{host}"

    def ip(self, host: str, *args: str) -> None:
        must("ip", "-n", self.ns(host), *args)

    def build(self) -> None:
        for host in ("sw", *self.hosts):
            must("ip", "netns", "add", self.ns(host))
            self.created.append(self.ns(host))
            self.ip(host, "link", "set", "lo", "up")
        self.ip("sw", "link", "add", "br0", "type", "bridge")
        self.ip("sw", "link", "set", "br0", "up")
        for host, addr in self.hosts.items():
            # Both ends are created directly inside their namespaces: nothing in the root one.
            must("ip", "link", "add", "eth0", "netns", self.ns(host), "type", "veth",
                 "peer", "name", f"p{host}", "netns", self.ns("sw"))
            self.ip("sw", "link", "set", f"p{host}", "master", "br0")
            self.ip("sw", "link", "set", f"p{host}", "up")
            self.ip(host, "addr", "add", f"{addr}/24", "dev", "eth0")
            self.ip(host, "link", "set", "eth0", "up")

    def cut(self, host: str, side: str, up: bool) -> None:
        """Take ``host``'s link down (or back up): on its own interface (``side="host"``) or at
        the switch (a pulled cable: packets vanish, no error on either end)."""
        state = "up" if up else "down"
        if side == "host":
            self.ip(host, "link", "set", "eth0", state)
        else:
            self.ip("sw", "link", "set", f"p{host}", state)

    def exec_argv(self, host: str, *argv: str) -> list[str]:
        # ``ip netns exec`` execs the command: the child's PID is the command's own.
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def teardown(self) -> None:
        for name in reversed(self.created):
            run("ip", "netns", "del", name)
        self.created.clear()


@contextmanager
def lab(prefix: str, hosts: dict[str, str], what: str) -> Iterator[NetLab]:
    """A built ``NetLab`` for the ``with`` block, torn down after it; skips the calling test
    (saying ``what`` needs it) where root, ``ip`` or network namespaces are missing."""
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root to create network namespaces (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip(f"{what} needs iproute2's 'ip' command, which is not installed")
    probe = run("ip", "netns", "list")
    if probe.returncode != 0:
        pytest.skip(f"'ip netns' is unavailable here: {probe.stderr.strip()}")
    # Namespace names are files under /run/netns, not interface names: no 15-character limit,
    # so the tag can be unique per run. Interface names (eth0, p<host>, br0) are per namespace.
    net = NetLab(tag=f"{prefix}{os.getpid()}x{secrets.token_hex(2)}", hosts=hosts)
    try:
        try:
            net.build()
        except RuntimeError as exc:
            pytest.skip(f"cannot build network namespaces with 'ip netns': {exc}")
        yield net
    finally:
        net.teardown()
