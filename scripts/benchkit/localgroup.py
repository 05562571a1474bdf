"""A local broker group for trying it out and for the group benchmark rows: a 3-member etcd and
three ``python -m broker --group`` processes, all on loopback ports, each child's output in
``DIR/<name>.log``, stopped by PID (SIGTERM, then SIGKILL).

Used by ``scripts/group`` (scripts/group.py) and by the bench's group rows
(benchkit/workloads/group.py). etcd comes from tests/etcd_cluster.py (the harness the group
tests use); ``etcd`` must be on PATH (``shutil.which``): see ``ETCD_HINT``.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.protocol import Hello, HelloReply, Stats, StatsReply
from tests.etcd_cluster import EtcdCluster, etcd_binary
from tests.processes import ROOT, child_env, free_port_run, terminate
from tests.raw_client import raw_call

GROUP = "local"
ETCD_HINT = ("etcd is not on PATH: install it (Debian/Ubuntu: apt-get install etcd-server; "
             "as root, scripts/test does that through scripts/_etcd.sh) or put an etcd 3.4+ "
             "binary from https://github.com/etcd-io/etcd/releases on PATH")



def have_etcd() -> bool:
    return etcd_binary() is not None


@dataclass
class LocalMember:
    name: str
    port: int
    data_dir: Path
    proc: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


@dataclass
class LocalGroup:
    """``base``: where the data dirs and logs go. ``lease_ttl``: the members' --lease-ttl."""

    base: Path
    lease_ttl: int = 2
    extra: tuple[str, ...] = ()
    etcd: EtcdCluster | None = None
    members: list[LocalMember] = field(default_factory=list)

    @property
    def seeds(self) -> str:
        """The seed list for ``SHAREDMEM_BROKER`` / ``broker=``."""
        return ",".join(m.address for m in self.members)

    def pids(self) -> list[int]:
        out = [m.proc.pid for m in (self.etcd.members if self.etcd else []) if m.proc]
        return out + [m.proc.pid for m in self.members if m.proc]

    def start(self, timeout: float = 60.0) -> LocalGroup:
        """etcd, then the three brokers; returns once the group has a primary with both
        standbys in its sync set. On failure everything started is stopped again."""
        if not have_etcd():
            raise RuntimeError(ETCD_HINT)
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self.etcd = EtcdCluster(self.base / "etcd").start(timeout)
            for i in range(3):
                # requests, events, replication: three ports below the ephemeral range, so a
                # member's own reconnects never hold them (tests/processes.py)
                m = LocalMember(f"m{i}", free_port_run(3), self.base / f"m{i}")
                log = open(self.base / f"{m.name}.log", "a")  # noqa: SIM115 - child's stderr
                m.proc = subprocess.Popen(
                    [sys.executable, "-m", "broker", "--bind", m.address,
                     "--data-dir", str(m.data_dir), "--group", GROUP, "--member", m.name,
                     "--etcd", self.etcd.endpoint_string, "--lease-ttl", str(self.lease_ttl),
                     *self.extra],
                    cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=log, text=True)
                log.close()
                self.members.append(m)
            deadline = time.monotonic() + timeout
            for m in self.members:
                self._wait_ready(m, deadline)
            self.wait_formed(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, m: LocalMember, deadline: float) -> None:
        assert m.proc is not None and m.proc.stdout is not None
        ready = select.select([m.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
        line = m.proc.stdout.readline() if ready else ""
        if "ready" not in line:
            raise RuntimeError(f"broker {m.name} did not start: {line!r}; see "
                               f"{self.base / (m.name + '.log')}")

    def primary(self) -> tuple[LocalMember, StatsReply] | None:
        for m in self.members:
            s = raw_call(m.address, Stats(), 0.5)
            if isinstance(s, StatsReply) and s.counters.get("group_primary") == 1:
                return m, s
        return None

    def wait_formed(self, deadline: float) -> tuple[LocalMember, StatsReply]:
        while True:
            found = self.primary()
            if found is not None and found[1].counters.get("group_sync_set", 0) >= 2:
                hello = raw_call(found[0].address, Hello(b"localgroup"), 0.5)
                if isinstance(hello, HelloReply) and len(hello.members) == 3:
                    return found
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the group did not form; see the logs in {self.base}")
            time.sleep(0.05)  # poll

    def stop(self) -> None:
        """Every process this group started, by PID: brokers first, then etcd."""
        for m in self.members:  # all at once: no failover dance while they stop one by one
            if m.proc is not None and m.proc.poll() is None:
                m.proc.terminate()
        for m in self.members:
            if m.proc is not None:
                terminate(m.proc, 10.0)
                if m.proc.stdout is not None:
                    m.proc.stdout.close()
        if self.etcd is not None:
            self.etcd.stop_all()
