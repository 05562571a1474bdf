"""Issue 10, acceptance 5: the primary's host cut off while writers on its side keep trying.

Topology (network namespaces this test creates and deletes, as tests/integration/
test_multihost.py does; nothing is reachable from, or routed to, the root namespace):

    <tag>a (192.168.251.1): broker m0, the primary; the writer process
    <tag>b (192.168.251.2): broker m1; the 3 etcd members (ports 2379, 2479, 2579)
    <tag>c (192.168.251.3): broker m2; a probe process
    all joined by br0 in <tag>sw (a switch, no address)

m0 is started first, so it is the first primary. Two raw writers in ``a`` write through the
group (they follow ``NotPrimary``, rotate on timeouts and retry with the same request ids).
Then a's switch port goes down (a pulled cable): m0 can reach neither etcd nor its standbys.
The test shows that m1 or m2 takes over in a new term, that m0 loses its lease and steps down
(its own ``Stats`` says standby, its log says why), and that the writers in ``a``, which keep
trying all along, get no ``WriteOk`` for anything the new term's log lacks. After the link
comes back the writers go on through the new primary, m0 rejoins as a standby, and everything
converges: the history checker over the new primary's whole log, and every member's data dir
(recovered offline) equal to that log.

Skips, with the reason, when not root, without ``ip netns``, or without the ``etcd`` binary.
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
from pathlib import Path
from typing import IO, Any

import msgspec
import pytest

from broker.core import BrokerCore
from broker.durable import DurableLog
from broker.protocol import DigestReply, Event
from tests.conftest import ROOT, child_env, terminate, wait_until
from tests.history import History, replay_digest
from tests.netlab import NetLab, lab

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SUBNET = "192.168.251"  # private, and only ever configured inside this test's namespaces
HOSTS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2", "c": f"{SUBNET}.3"}
MEMBER_HOST = {"m0": "a", "m1": "b", "m2": "c"}
PORT = 7400  # each namespace is fresh: nothing else holds its ports
ETCD_PORTS = (2379, 2479, 2579)  # client ports in b; the peer port is client + 1
NS = "grp"
LEASE_TTL = 1


def address(member: str) -> str:
    return f"tcp://{HOSTS[MEMBER_HOST[member]]}:{PORT}"


# One script for the writer and the probe, run inside a namespace: commands on stdin, JSON
# lines on stdout. "stats ADDR" -> the member's Stats counters (null: no answer); "fetch ADDR"
# -> the namespace's whole log; "write N" starts N raw group writers (tests/integration/
# test_group.py's Writer) whose attempts and acks are reported as they happen; "stop" stops
# them; "tries" -> how many requests of theirs timed out so far.
AGENT_CODE = r"""
import json, sys, threading, time
import msgspec
from broker.protocol import Fetch, FetchReply, Hello, HelloReply, Stats, StatsReply
from tests.integration.test_group import Writer, call

addresses = sys.argv[1].split(",")
out = threading.Lock()

def emit(**fields):
    with out:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

class Recorder:
    def attempt(self, writer, op, key, value=None):
        emit(kind="attempt", writer=writer, key=key, value=value, t=time.monotonic())
    def ack(self, writer, op, key, value, version):
        emit(kind="ack", writer=writer, key=key, value=value, seq=version, t=time.monotonic())

writers = []
emit(kind="ready")
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "stats":
        r = call(cmd[1], Stats(), 0.5)
        emit(kind="stats", addr=cmd[1], counters=r.counters if isinstance(r, StatsReply) else None)
    elif cmd[0] == "fetch":
        hello = call(cmd[1], Hello(b"checker"))
        events = []
        while isinstance(hello, HelloReply):
            r = call(cmd[1], Fetch("grp", hello.epoch, len(events) + 1, 1, 100_000), 5.0)
            if not isinstance(r, FetchReply) or not r.available:
                events = None
                break
            if not r.events:
                break
            events += r.events
        emit(kind="log", events=None if events is None else
             msgspec.json.encode(events).decode())
    elif cmd[0] == "write":
        for i in range(int(cmd[1])):
            writers.append(Writer(f"w{i}", addresses, Recorder()).start())
    elif cmd[0] == "tries":
        emit(kind="tries", timeouts=sum(w.timeouts for w in writers))
    elif cmd[0] == "stop":
        for w in writers:
            w.join()
        acks = [(at, seq, term) for w in writers for at, seq, term in w.acks]
        emit(kind="stopped", acks=acks)
    elif cmd[0] == "quit":
        break
"""


class Proc:
    """A process inside a namespace; stdout lines collected by a thread (never blocks)."""

    def __init__(self, name: str, argv: list[str], stdin: bool = False) -> None:
        self.name = name
        self.stderr_file: IO[str] = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=child_env(), stdin=subprocess.PIPE if stdin else
            subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr_file, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.records.append(record)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r.get("kind") == kind]

    def wait_line(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)  # poll: also notices an exit
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if needle in line:
                return line
        raise AssertionError(f"{self.name}: no {needle!r} line:\n{self.stderr()}")

    def ask(self, command: str, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        """Send ``command``; the next record of ``kind``."""
        before = len(self.of_kind(kind))
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        found = wait_until(lambda: self.of_kind(kind)[before:], timeout, 0.02,
                           f"{self.name}: {kind!r} after {command!r}")
        assert isinstance(found, list)
        return found[0]

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read()[-4000:]

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture
def net() -> Iterator[NetLab]:
    from tests.etcd_cluster import require_etcd

    require_etcd()
    with lab("sgp", HOSTS, "the partition test") as built:
        yield built


def start_etcd(net: NetLab, base: Path) -> list[Proc]:
    from tests.etcd_cluster import ELECTION_MS, HEARTBEAT_MS, etcd_binary

    binary = etcd_binary()
    assert binary is not None
    ip = HOSTS["b"]
    initial = ",".join(f"e{i}=http://{ip}:{p + 1}" for i, p in enumerate(ETCD_PORTS))
    procs = []
    for i, p in enumerate(ETCD_PORTS):
        procs.append(Proc(f"etcd{i}", net.exec_argv(
            "b", binary, "--name", f"e{i}", "--data-dir", str(base / f"e{i}"),
            "--listen-client-urls", f"http://{ip}:{p}",
            "--advertise-client-urls", f"http://{ip}:{p}",
            "--listen-peer-urls", f"http://{ip}:{p + 1}",
            "--initial-advertise-peer-urls", f"http://{ip}:{p + 1}",
            "--initial-cluster", initial, "--initial-cluster-token", f"sgp-{net.tag}",
            "--initial-cluster-state", "new", "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS), "--log-level", "warn")))
    return procs


def start_member(net: NetLab, base: Path, name: str) -> Proc:
    etcd = ",".join(f"http://{HOSTS['b']}:{p}" for p in ETCD_PORTS)
    p = Proc(name, net.exec_argv(
        MEMBER_HOST[name], sys.executable, "-m", "broker", "--bind", address(name),
        "--log-level", "WARNING", "--data-dir", str(base / name), "--group", "g",
        "--member", name, "--etcd", etcd, "--lease-ttl", str(LEASE_TTL), "--insecure"))
    p.wait_line("ready", 60)
    return p


def digest_of(data_dir: Path) -> tuple[int, str]:
    core = BrokerCore(log=DurableLog(data_dir))
    core.log.recover(core)
    try:
        d = core.digest(NS)
        assert isinstance(d, DigestReply), d
        return d.seq, d.digest
    finally:
        core.log.close()


def test_the_primarys_host_cut_off_acknowledges_nothing_the_new_term_lacks_and_converges(
        net: NetLab, tmp_path: Path) -> None:
    procs: list[Proc] = []
    members: dict[str, Proc] = {}
    try:
        procs += start_etcd(net, tmp_path)
        agent_argv = [sys.executable, "-c", AGENT_CODE, ",".join(map(address, MEMBER_HOST))]
        writer = Proc("writer", net.exec_argv("a", *agent_argv), stdin=True)
        probe = Proc("probe", net.exec_argv("c", *agent_argv), stdin=True)
        procs += [writer, probe]
        writer.wait_line("ready", 30)
        probe.wait_line("ready", 30)

        def stats(agent: Proc, member: str) -> dict[str, int] | None:
            return agent.ask(f"stats {address(member)}", "stats")["counters"]

        def diagnostics() -> str:
            return "\n".join(f"--- {n}:\n{p.stderr()}" for n, p in members.items()) + \
                f"\n--- probe: {probe.records[-3:]}\n{probe.stderr()}" + \
                f"\n--- writer: {writer.records[-3:]}\n{writer.stderr()}"

        members["m0"] = start_member(net, tmp_path, "m0")
        procs.append(members["m0"])
        # (A primary without --min-sync standbys answers nothing yet: its log says it won.)
        try:
            wait_until(lambda: "m0 is the primary of group g" in members["m0"].stderr(), 60,
                       0.1, "m0 to be the first primary")
        except AssertionError:
            raise AssertionError(diagnostics()) from None
        for name in ("m1", "m2"):
            members[name] = start_member(net, tmp_path, name)
            procs.append(members[name])
        wait_until(lambda: (stats(probe, "m0") or {}).get("group_sync_set") == 2, 60, 0.2,
                   "both standbys in m0's sync set")
        old_term = stats(probe, "m0")["group_term"]  # type: ignore[index]

        writer.ask("write 2", "attempt")
        wait_until(lambda: len(writer.of_kind("ack")) >= 100, 60, 0.05,
                   "writes through m0 before the cut")

        net.cut("a", "switch", up=False)
        cut_at_acks = len(writer.of_kind("ack"))
        tries_at_cut = writer.ask("tries", "tries")["timeouts"]

        # The other side elects a new primary in a higher term.
        def new_primary() -> str | None:
            for name in ("m1", "m2"):
                s = stats(probe, name)
                if s is not None and s["group_primary"] == 1 and s["group_term"] > old_term:
                    return name
            return None
        try:
            new = wait_until(new_primary, 60, 0.2, "m1 or m2 to take over")
        except AssertionError:
            raise AssertionError(diagnostics()) from None
        assert isinstance(new, str)
        new_term = stats(probe, new)["group_term"]  # type: ignore[index]

        # The cut primary loses its lease and steps down, as its own Stats (asked from its
        # side) and its log say; its writers kept trying all along.
        wait_until(lambda: (stats(writer, "m0") or {}).get("group_primary") == 0, 60, 0.2,
                   "the cut-off m0 to step down")
        assert "steps down from term" in members["m0"].stderr(), members["m0"].stderr()
        # ...and its writers are still trying (a count reached, not a count by a time: how
        # many timeouts fit before the step-down depends on the machine's load).
        wait_until(lambda: writer.ask("tries", "tries")["timeouts"] >= tries_at_cut + 4, 30,
                   0.2, "the cut-off writers to keep trying")
        acked_during_cut = len(writer.of_kind("ack")) - cut_at_acks

        net.cut("a", "switch", up=True)
        healed_at = len(writer.of_kind("ack"))
        wait_until(lambda: len(writer.of_kind("ack")) >= healed_at + 50, 90, 0.05,
                   "the writers in a to write through the new primary after healing")
        stopped = writer.ask("stop", "stopped", 60)
        terms_after = {term for _, _, term in stopped["acks"][-20:]}
        assert terms_after == {new_term}, terms_after

        # m0 rejoins as a standby and every member catches up.
        def converged() -> bool:
            ps = stats(probe, new)
            if ps is None or ps.get("group_max_lag", 1) != 0 or ps["group_followers"] != 2:
                return False
            for name in MEMBER_HOST:
                if name != new:
                    s = stats(probe, name)
                    if s is None or s["group_primary"] != 0 or s.get("group_lag") != 0:
                        return False
            return True
        try:
            wait_until(converged, 60, 0.2, "m0 to rejoin and every member to catch up")
        except AssertionError:
            raise AssertionError(diagnostics()) from None

        log = probe.ask(f"fetch {address(new)}", "log", 60)["events"]
        assert log is not None, "the new primary's log could not be fetched"
        events = msgspec.json.decode(log, type=list[Event])
        history = History()
        for r in writer.records:
            if r["kind"] == "attempt":
                history.attempt(r["writer"], "set", r["key"], r["value"])
            elif r["kind"] == "ack":
                history.ack(r["writer"], "set", r["key"], r["value"], r["seq"])
        # Every WriteOk (before, during and after the cut) is in the new term's log once at its
        # seq; nothing unattempted is there.
        summary = history.check(events)
        assert summary.acks == len(writer.of_kind("ack")) and summary.acks >= 150
        want = replay_digest(NS, events)
        for p in members.values():
            p.stop()
        digests = {name: digest_of(tmp_path / name) for name in MEMBER_HOST}
        assert digests == {name: want for name in MEMBER_HOST}, (digests, want)
        reason = next(line for line in members["m0"].stderr().splitlines()
                      if "steps down from term" in line)
        print(f"\ncut-off primary: new term {new_term} on {new}; {acked_during_cut} acks "
              f"arrived in a during the cut (all in the new log); m0: {reason}")
    finally:
        for p in procs:
            if p.proc.poll() is None:
                if p.proc.stdin is not None:
                    try:
                        p.proc.stdin.close()
                    except OSError:
                        pass
                p.stop()
