"""Shared fixtures: real broker processes on loopback, started and stopped by PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.01, message: str = "condition") -> object:
    """Poll ``condition`` until truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)  # poll


def free_port_pair() -> int:
    """A port P on 127.0.0.1 such that P and P+1 are both free right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair found")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SHAREDMEM_BROKER", None)
    return env


def terminate(proc: subprocess.Popen) -> int:
    """SIGTERM our own child by PID, SIGKILL after 10 s; returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@dataclass
class BrokerProcess:
    """A ``python -m broker`` child process on a loopback port."""

    port: int
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[str] | None = None
    ready_line: str = ""

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def epoch(self) -> str:
        return self.ready_line.split("epoch=")[1].split()[0]

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        # stderr goes to a file: an undrained pipe would block the broker once it fills up
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "--bind", self.address, "--log-level", "WARNING",
             *self.extra_args],
            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=self.stderr_file, text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # blocks until the ready line or exit
        if "ready" not in line or time.monotonic() > deadline:
            self.proc.kill()
            self.stderr_file.seek(0)
            raise RuntimeError(f"broker did not start: {line!r} {self.stderr_file.read()}")
        self.ready_line = line.strip()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        terminate(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr_file.close()
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def broker_process() -> Iterator[BrokerProcess]:
    b = BrokerProcess(free_port_pair()).start()
    try:
        yield b
    finally:
        b.stop()


def run_agent(code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a separate Python process (another agent); raise on failure."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=child_env(),
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"agent failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_agent(code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``code`` in a separate Python process without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def secure_broker(directory: Path, alice_permissions: str) -> tuple[BrokerProcess, Path]:
    """A started ``python -m broker --config`` with CURVE keys for broker, alice, carol (admin
    of everything) and mallory (not listed). ``alice_permissions`` is a TOML inline table."""
    import zmq.auth

    keys = directory / "keys"
    keys.mkdir()
    for name in ("broker", "alice", "carol", "mallory"):
        zmq.auth.create_certificates(str(keys), name)
    (directory / "broker.toml").write_text(f"""
[broker]
secret_key_file = "keys/broker.key_secret"

[clients.alice]
public_key_file = "keys/alice.key"
permissions = {alice_permissions}

[clients.carol]
public_key_file = "keys/carol.key"
permissions = {{ "*" = ["admin"] }}
""")
    broker = BrokerProcess(free_port_pair(), ("--config", str(directory / "broker.toml")))
    return broker.start(), keys


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[object]:
    """A started 3-member etcd cluster on loopback (tests/etcd_cluster.py); skips without
    etcd. Stopped by PID afterwards."""
    from tests.etcd_cluster import EtcdCluster, require_etcd

    require_etcd()
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        yield cluster
    finally:
        cluster.stop_all()
