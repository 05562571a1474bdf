"""A real 3-member etcd cluster on loopback for the broker-group tests (docs/groups.md).

Each member is an ``etcd`` child process with its own temp data dir and free loopback ports,
short raft timers (heartbeat 50 ms, election 500 ms, so a 1 s lease is possible and a lost
leader is replaced within about a second), stopped by PID: SIGTERM, then SIGKILL. Health and
the current leader come from etcd's own HTTP API (``/health``, ``/v3/maintenance/status``), not
from the client under test, so the harness cannot share its bugs.

Where the ``etcd`` binary is missing, ``require_etcd()`` skips the test saying so.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest

from tests.processes import free_port_run

HEARTBEAT_MS = 50
ELECTION_MS = 500


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def require_etcd() -> str:
    """The path of ``etcd``, or skip the test with the reason."""
    path = etcd_binary()
    if path is None:
        pytest.skip("etcd binary not found on PATH: broker-group tests need a real etcd "
                    "(scripts/test installs Debian's etcd-server with apt when run as root)")
    pytest.importorskip("etcd3gw", reason="etcd3gw missing: install the 'group' extra")
    return path


def free_ports(n: int) -> list[int]:
    """``n`` consecutive loopback ports free right now, from this xdist worker's slice below
    the ephemeral range (tests/processes.py free_port_run)."""
    base = free_port_run(n)
    return list(range(base, base + n))


def _http_json(url: str, payload: dict[str, Any] | None = None,
               timeout: float = 0.5) -> dict[str, Any]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait(condition: Callable[[], object], timeout: float, message: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.02)  # poll


@dataclass
class EtcdMember:
    """One etcd member: its ports, data dir and (while running) its process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: TextIO | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """True when this member answers ``/health`` with a leader (etcd's own check)."""
        try:
            return _http_json(self.client_url + "/health").get("health") == "true"
        except (OSError, ValueError):
            return False

    def status(self) -> dict[str, Any]:
        """``/v3/maintenance/status`` of this member (raises OSError if it does not answer)."""
        return _http_json(self.client_url + "/v3/maintenance/status", {})

    def log_tail(self, lines: int = 20) -> str:
        path = self.data_dir.parent / f"{self.name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class EtcdCluster:
    """``size`` etcd members on loopback, started together as one new cluster."""

    base_dir: Path
    size: int = 3
    members: list[EtcdMember] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.size)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.token = f"sharedmem-test-{ports[0]}"
        self.members = [
            EtcdMember(f"etcd{i}", ports[2 * i], ports[2 * i + 1], self.base_dir / f"etcd{i}")
            for i in range(self.size)
        ]

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of every member, in order (also of stopped ones)."""
        return [m.client_url for m in self.members]

    @property
    def endpoint_string(self) -> str:
        """The ``--etcd`` form: ``http://H:P,http://H2:P2,...``."""
        return ",".join(self.endpoints)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for member in self.members:
            self.start_member(member, new_cluster=True)
        self.wait_healthy(timeout=timeout)
        return self

    def start_member(self, member: EtcdMember, new_cluster: bool = False) -> None:
        """Start (or restart, with its data dir kept) one member's process."""
        binary = etcd_binary()
        assert binary is not None, "etcd binary vanished"
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.log = open(self.base_dir / f"{member.name}.log", "a")  # noqa: SIM115
        member.proc = subprocess.Popen(
            [binary, "--name", member.name, "--data-dir", str(member.data_dir),
             "--listen-client-urls", member.client_url,
             "--advertise-client-urls", member.client_url,
             "--listen-peer-urls", member.peer_url,
             "--initial-advertise-peer-urls", member.peer_url,
             "--initial-cluster", initial,
             "--initial-cluster-token", self.token,
             "--initial-cluster-state", "new" if new_cluster else "existing",
             "--heartbeat-interval", str(HEARTBEAT_MS),
             "--election-timeout", str(ELECTION_MS),
             "--log-level", "warn"],
            stdout=member.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def alive_members(self) -> list[EtcdMember]:
        return [m for m in self.members if m.alive]

    def wait_healthy(self, members: list[EtcdMember] | None = None,
                     timeout: float = 30.0) -> None:
        """Wait until every given member (default: every running one) reports a leader."""
        targets = members if members is not None else self.alive_members()

        def ready() -> bool:
            for m in targets:
                if not m.alive:
                    raise AssertionError(f"etcd member {m.name} exited "
                                         f"({m.proc and m.proc.returncode}):\n{m.log_tail()}")
            return all(m.healthy() for m in targets)

        try:
            _wait(ready, timeout, "etcd members healthy")
        except AssertionError as exc:
            tails = "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in targets)
            raise AssertionError(f"{exc}\n{tails}") from None

    def leader(self, timeout: float = 10.0) -> EtcdMember:
        """The member that is raft leader now, as the running members report it."""

        def find() -> EtcdMember | None:
            ids: dict[str, EtcdMember] = {}
            leader_id = None
            for m in self.alive_members():
                try:
                    status = m.status()
                except (OSError, ValueError):
                    continue
                ids[str(status["header"]["member_id"])] = m
                if status.get("leader") and str(status["leader"]) != "0":
                    leader_id = str(status["leader"])
            return ids.get(leader_id) if leader_id is not None else None

        found = _wait(find, timeout, "an etcd leader")
        assert isinstance(found, EtcdMember)
        return found

    def kill(self, member: EtcdMember) -> None:
        """SIGKILL one member, as a crash would, and reap it."""
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(10)
        self._close_log(member)

    def stop(self, member: EtcdMember) -> None:
        """SIGTERM one member by PID, SIGKILL after 10 s."""
        if member.proc is not None and member.proc.poll() is None:
            member.proc.terminate()
            try:
                member.proc.wait(10)
            except subprocess.TimeoutExpired:
                member.proc.kill()
                member.proc.wait(10)
        self._close_log(member)

    def stop_all(self) -> None:
        for member in self.members:
            self.stop(member)

    @staticmethod
    def _close_log(member: EtcdMember) -> None:
        if member.log is not None:
            member.log.close()
            member.log = None
