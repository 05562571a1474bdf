"""Issue 4, criterion 1: multi-host replication over real network stacks.

Topology (all inside network namespaces this test creates and deletes; nothing is reachable
from, or routed to, the root namespace):

    <tag>b  (broker, 192.168.250.1) --eth0==pb--+
    <tag>n1 (node,   192.168.250.11) --eth0==pn1-+-- br0 in <tag>sw (a switch, no address)
    <tag>n2 (writer, 192.168.250.12) --eth0==pn2-+

The broker runs in its namespace, bound to its own address; each node is a separate Python
process in its own namespace, reaching the broker over TCP through the bridge. n1's link is cut
(``ip link set ... down``) for 5 s while n2 writes 1000 keys; after the link comes back, n1 must
converge (same seq and digest as the broker) within 5 s, and its ``status()`` must have shown
it disconnected during the cut.

Two ways to cut a link are exercised: downing the host's own interface (the node's kernel
knows: its routes go away, sends fail locally) and downing the switch port (a pulled cable as
the host sees it: carrier lost, routes stay, packets vanish).

Skips, with the reason, only when not root or ``ip netns`` is unusable. Installs nothing.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

from tests.conftest import ROOT, child_env, terminate, wait_until
from tests.netlab import NetLab, lab

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SUBNET = "192.168.250"  # private, and only ever configured inside this test's namespaces
BROKER_IP = f"{SUBNET}.1"
HOST_IPS = {"b": BROKER_IP, "n1": f"{SUBNET}.11", "n2": f"{SUBNET}.12"}
BROKER_PORT = 7400  # the broker's namespace is fresh: nothing else can hold the port
KEYS = 1000
CUT_SECONDS = 5.0
CONVERGE_SECONDS = 5.0

# One script for both node processes. Role "watch" (the node whose link is cut) reports its
# status every ~50 ms; role "write" writes when told. Both answer commands on stdin.
NODE_CODE = r"""
import json, sys, threading, time
from node import SharedMemory, SharedMemoryConfig

role, broker = sys.argv[1], sys.argv[2]
shm = SharedMemory(SharedMemoryConfig(
    namespace="mh", broker=broker, max_keys=0, ttl=0, retry_interval=0.25,
    request_timeout=20.0, connect_timeout=20.0))
out = threading.Lock()
stop = threading.Event()

def emit(**fields):
    line = json.dumps(fields)
    with out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def report():
    while not stop.is_set():
        st = shm.status()
        seq, digest = shm.local_digest()
        emit(kind="status", t=time.monotonic(), connected=st.connected, seq=seq, digest=digest,
             sync=st.namespace.sync, heard=st.namespace.last_heard_age)
        stop.wait(0.05)

reporter = threading.Thread(target=report, daemon=True)
if role == "watch":
    reporter.start()
emit(kind="ready", seq=shm.seq)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "seed":
        emit(kind="seeded", seq=shm.set("seed", {"role": role}))
    elif cmd[0] == "write":
        t0 = time.monotonic()
        for i in range(int(cmd[1])):
            shm.set(f"key{i:05d}", {"i": i, "pad": "x" * 40})
        t1 = time.monotonic()
        emit(kind="written", t0=t0, t1=t1, local=list(shm.local_digest()),
             broker=list(shm.broker_digest()))
    elif cmd[0] == "quit":
        break
stop.set()
if reporter.is_alive():
    reporter.join(5)
shm.close()
emit(kind="bye")
"""


# ---------------------------------------------------------------------- namespaces


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    with lab("smh", HOST_IPS, "multi-host test") as net:
        yield net


# ---------------------------------------------------------------------- child processes


class Child:
    """A process inside a namespace; stdout lines are collected by a thread (never blocks)."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.stderr_file: IO[str] = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr_file, text=True,
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.records: list[dict[str, Any]] = []  # every JSON line, in order
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            self.lines.put((now, line.rstrip("\n")))
            try:
                record = json.loads(line)
            except ValueError:
                continue
            record["_seen"] = now
            with self._lock:
                self.records.append(record)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r.get("kind") == kind]

    def latest(self, kind: str) -> dict[str, Any] | None:
        with self._lock:
            for r in reversed(self.records):
                if r.get("kind") == kind:
                    return r
        return None

    def wait_for(self, kind: str, timeout: float, after: int = 0) -> dict[str, Any]:
        """The first record of ``kind`` beyond the first ``after`` ones."""
        def seen() -> list[dict[str, Any]]:
            exited = self.proc.poll() is not None  # before reading: its last lines may follow
            found = self.of_kind(kind)[after:]
            if not found and exited:
                self._reader.join(5)
                found = self.of_kind(kind)[after:]
                if not found:
                    self.alive_or_fail()
            return found

        found = wait_until(seen, timeout, interval=0.02, message=f"{self.name}: {kind!r}")
        assert isinstance(found, list)
        return found[0]

    def alive_or_fail(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.stderr()}")
        return True

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read()[-4000:]

    def stop(self) -> None:
        terminate(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._reader.join(5)
        self.stderr_file.close()


def start_broker(lab: NetLab) -> Child:
    # --insecure: a non-loopback bind without CURVE; this address exists only inside the
    # test's own namespaces, so nothing outside them can reach it.
    broker = Child("broker", lab.exec_argv(
        "b", sys.executable, "-m", "broker", "--bind", f"tcp://{BROKER_IP}:{BROKER_PORT}",
        "--insecure", "--log-level", "WARNING"))
    try:
        _, line = broker.lines.get(timeout=30)
    except queue.Empty:
        line = ""
    if "ready" not in line:
        exit_code = broker.proc.poll()
        err = broker.stderr()
        broker.stop()
        raise AssertionError(f"broker did not start (exit code {exit_code}): {line!r}\n{err}")
    return broker


# ---------------------------------------------------------------------- the test


@pytest.mark.parametrize("side", ["host", "switch"])
def test_cut_node_converges_after_link_heals(netlab: NetLab, side: str) -> None:
    address = f"tcp://{BROKER_IP}:{BROKER_PORT}"
    children: list[Child] = []
    try:
        children.append(start_broker(netlab))
        n1 = Child("n1", netlab.exec_argv("n1", sys.executable, "-c", NODE_CODE, "watch",
                                          address))
        children.append(n1)
        n2 = Child("n2", netlab.exec_argv("n2", sys.executable, "-c", NODE_CODE, "write",
                                          address))
        children.append(n2)
        n1.wait_for("ready", 30)
        n2.wait_for("ready", 30)

        # Both synced over the LAN: n1 sees n2's write, and reports itself connected.
        n2.send("seed")
        seed_seq = n2.wait_for("seeded", 20)["seq"]
        wait_until(lambda: _status_is(n1, seq=seed_seq, connected=True), 10,
                   message="n1 to see the seed write before the cut")

        netlab.cut("n1", side, up=False)
        t_cut = time.monotonic()
        n2.send(f"write {KEYS}")
        written = n2.wait_for("written", CUT_SECONDS)
        final_seq, final_digest = written["broker"]
        assert written["local"] == written["broker"], "the writer's own replica lags the broker"
        assert final_seq == seed_seq + KEYS
        assert written["t1"] < t_cut + CUT_SECONDS, "the writes did not finish during the cut"

        # Keep the link down for the full cut, watching n1 meanwhile.
        while time.monotonic() < t_cut + CUT_SECONDS:
            n1.alive_or_fail()
            time.sleep(0.05)  # poll
        during = [r for r in n1.of_kind("status") if t_cut <= r["t"]]
        netlab.cut("n1", side, up=True)
        t_heal = time.monotonic()

        assert during, "n1 reported no status during the cut"
        assert any(not r["connected"] for r in during), (
            f"n1's status() never showed it disconnected during a {CUT_SECONDS:g} s cut: "
            f"{[(round(r['t'] - t_cut, 2), r['connected']) for r in during[::10]]}")
        assert all(r["seq"] < final_seq for r in during), (
            "n1 received the writes through a cut link: the cut did not cut")

        try:
            wait_until(lambda: _status_is(n1, seq=final_seq, digest=final_digest),
                       CONVERGE_SECONDS, interval=0.02,
                       message=f"n1 to converge within {CONVERGE_SECONDS}s of the heal")
        finally:
            _print_timeline(n1, t_cut, t_heal)
        converged = next(r for r in n1.of_kind("status")
                         if r["seq"] == final_seq and r["t"] >= t_heal)
        assert converged["digest"] == final_digest
        assert converged["t"] - t_heal <= CONVERGE_SECONDS
        wait_until(lambda: _status_is(n1, connected=True), 2,
                   message="n1 to report connected again once converged")
        print(f"[{side}] writes took {written['t1'] - written['t0']:.2f}s; n1 converged "
              f"{converged['t'] - t_heal:.2f}s after the heal")

        for child in (n1, n2):
            child.send("quit")
        for child in (n1, n2):
            child.wait_for("bye", 10)
    finally:
        for child in reversed(children):
            child.stop()


def _status_is(child: Child, **expected: object) -> bool:
    status = child.latest("status")
    return status is not None and all(status[k] == v for k, v in expected.items())


def _print_timeline(n1: Child, t_cut: float, t_heal: float) -> None:
    """n1's state changes relative to the cut (shown with -s, or on failure)."""
    last: tuple[object, ...] | None = None
    for r in n1.of_kind("status"):
        if r["t"] < t_cut - 0.2:
            continue
        key = (r["connected"], r["sync"], r["seq"])
        if key != last:
            print(f"t={r['t'] - t_cut:+6.2f}s (heal at +{t_heal - t_cut:.2f}) "
                  f"connected={r['connected']} sync={r['sync']} seq={r['seq']}")
            last = key
