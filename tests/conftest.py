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
    free_port_run,
    terminate,
    wait_until,
)

# A handle with no broker configured looks for a broker on tcp://127.0.0.1:7400; tests must not
# depend on whether one runs on this machine, so they (and their children, see
# tests/processes.py child_env) default to the embedded broker. Tests of the lookup itself
# unset this in their child processes.
os.environ["SHAREDMEM_BROKER"] = "embedded"

# scripts/test runs the suite on two pytest-xdist workers. These files run as one unit each on
# one worker, never split across the two: the etcd-backed group tests time leases of 1 s and
# must not compete with each other for the two cores (one of them at a time, beside ordinary
# tests on the other worker); the others share an expensive module fixture (the bench smoke
# run, the security fuzz broker, mypy's cache) that would otherwise run once per worker.
# Every other test is its own unit, so the two workers balance test by test.
XDIST_GROUPS = {
    "tests/integration/test_bench_smoke.py": "bench-smoke",
    "tests/integration/test_security.py": "security",
    "tests/integration/test_typing.py": "typing",
    # Its tests start a broker on, or need free, the fixed default port 7400.
    "tests/integration/test_defaults.py": "default-port",
    "tests/integration/test_etcd_coordination.py": "etcd",
    "tests/integration/test_etcd_tls.py": "etcd",
    "tests/integration/test_group.py": "etcd",
    "tests/integration/test_group_commit.py": "etcd",
    "tests/integration/test_group_nodes.py": "etcd",
    "tests/integration/test_group_ops.py": "etcd",
    "tests/integration/test_group_partition.py": "etcd",
    "tests/integration/test_group_security.py": "etcd",
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Schedule by XDIST_GROUPS. Our own hook, not ``@pytest.mark.xdist_group`` with
    ``--dist loadgroup``: under pytest 9.2 xdist does not see marks applied per module
    (pytest-dev/pytest-xdist#1386), and one table here is easier to read than marks in ten
    files. Largest units first (xdist's loadscope reorder), so the etcd unit starts at once."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return XDIST_GROUPS.get(nodeid.split("::", 1)[0], nodeid)

    return GroupScheduling(config, log)  # type: ignore[arg-type]


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
