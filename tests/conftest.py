"""Shared fixtures: real broker processes on loopback, started and stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# One copy of the process helpers, shared with scripts/bench; re-exported here for the tests.
from tests.processes import (  # noqa: F401
    ROOT,
    BrokerProcess,
    child_env,
    free_port,
    free_port_pair,
    terminate,
    wait_until,
)

# A handle with no broker configured looks for a broker on tcp://127.0.0.1:7400; tests must not
# depend on whether one runs on this machine, so they (and their children, see
# tests/processes.py child_env) default to the embedded broker. Tests of the lookup itself
# unset this in their child processes.
os.environ["SHAREDMEM_BROKER"] = "embedded"


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
