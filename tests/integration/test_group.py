"""Broker groups with real processes (issue 10; docs/groups.md): a real 3-member etcd (the
``etcd_cluster`` fixture), three ``python -m broker --group`` processes on loopback ports,
started and stopped by PID, driven by raw zmq REQ clients that follow ``NotPrimary`` and rotate
on timeouts with the same request ids. Every fault test checks its history with
tests/history.py against the final log (Fetch from the primary), and compares each member's
durable state (its data dir recovered offline after a clean stop).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker.core import BrokerCore
from broker.durable import DurableLog
from broker.protocol import (
    DigestReply,
    Event,
    Fetch,
    FetchReply,
    Hello,
    HelloReply,
    NotPrimary,
    Set,
    Stats,
    StatsReply,
    WriteOk,
    reply_codec,
    request_codec,
)
from tests.conftest import BrokerProcess, wait_until
from tests.history import History, replay_digest
from tests.processes import free_port_run
from tests.raw_client import raw_call

NS = "grp"
LEASE_TTL = 1
# For the tests that assert that NO failover happened (garbage or forged messages on the link,
# a switchover's exact term, a refused switchover): a 1 s lease can lapse on a machine loaded
# by two test workers, and the election that follows is correct behaviour but fails those
# tests for a reason that is not theirs. The fault tests keep LEASE_TTL (issue 10's 3 s bound).
STABLE_LEASE_TTL = 3
REQUEST_TIMEOUT = 0.5  # a client rotates to the next member after this long

_requests = request_codec()
_replies = reply_codec()


def free_port_triple() -> int:
    """A port P on 127.0.0.1 with P, P+1 and P+2 free right now (requests, events, repl),
    below the kernel's ephemeral range (tests/processes.py free_port_run): members are
    restarted on their ports while the others keep reconnecting to them, and a reconnect from
    an ephemeral port equal to its target (a TCP self-connect) would hold the port."""
    return free_port_run(3)


def call(address: str, request: Any, timeout: float = 2.0) -> Any:
    """One request to one member; None on timeout."""
    return raw_call(address, request, timeout)


@dataclass
class Member:
    name: str
    port: int
    data_dir: Path
    etcd: str
    min_sync: int = 1
    extra: tuple[str, ...] = ()
    proc: BrokerProcess | None = None
    lease_ttl: int = LEASE_TTL

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> Member:
        self.proc = BrokerProcess(self.port, (
            "--data-dir", str(self.data_dir), "--group", "g", "--member", self.name,
            "--etcd", self.etcd, "--lease-ttl", str(self.lease_ttl),
            "--min-sync", str(self.min_sync), *self.extra)).start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.proc is not None
        return self.proc.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stats(self, timeout: float = 1.0) -> dict[str, int] | None:
        r = call(self.address, Stats(), timeout)
        return r.counters if isinstance(r, StatsReply) else None

    def stderr(self) -> str:
        assert self.proc is not None
        f = self.proc.stderr_file
        if f.closed:
            return "(closed)"
        f.seek(0)
        return f.read()[-4000:]


@dataclass
class Group:
    members: list[Member]

    def addresses(self) -> list[str]:
        return [m.address for m in self.members]

    def roles(self) -> dict[str, dict[str, int] | None]:
        return {m.name: (m.stats(0.5) if m.alive else None) for m in self.members}

    def primary(self) -> Member | None:
        """The one member that says it is primary (None unless exactly one does). Each
        member gets 1.5 s to answer: on a loaded machine (two test workers on two cores) a
        live primary can take longer than 0.5 s, and a missed answer reads as "no primary"."""
        found = [m for m, s in zip(self.members, [m.stats(1.5) if m.alive else None
                                                  for m in self.members], strict=True)
                 if s is not None and s.get("group_primary") == 1]
        return found[0] if len(found) == 1 else None

    def wait_new_primary(self, old: Member, timeout: float = 30.0) -> Member:
        """Exactly one member says it is primary, and it is not ``old``. Waited for, not read
        once: after a fault a stats request can time out on a loaded machine, and a primary
        resumed from SIGSTOP says "primary" until its loop sees its lease gone (it commits
        nothing meanwhile: the standbys follow the new term)."""

        def found() -> Member | None:
            p = self.primary()
            return p if p is not None and p is not old else None

        return wait_until(found, timeout, 0.05, "exactly one primary, not the old one")  # type: ignore

    def wait_formed(self, timeout: float = 30.0, sync: int = 2) -> Member:
        """One primary whose sync set holds ``sync`` members, the rest standbys."""

        def formed() -> Member | None:
            p = self.primary()
            if p is None:
                return None
            s = p.stats(0.5)
            return p if s is not None and s["group_sync_set"] >= sync else None

        try:
            return wait_until(formed, timeout, 0.05, "the group to form")  # type: ignore
        except AssertionError:
            raise AssertionError(f"group did not form: {self.roles()}\n" + "\n".join(
                f"--- {m.name}:\n{m.stderr()}" for m in self.members)) from None

    def stop_all(self) -> None:
        # SIGTERM every member first, then wait for each: a clean stop may wait on etcd (to
        # revoke its lease; seconds when etcd is down), and the waits then overlap.
        for m in self.members:
            if m.alive:
                m.signal(signal.SIGTERM)
        for m in self.members:
            m.stop()


@contextlib.contextmanager
def running_group(tmp_path: Path, etcd: Any, min_sync: int = 1,
                  extra: tuple[str, ...] = (), lease_ttl: int = LEASE_TTL) -> Iterator[Group]:
    members = [Member(f"m{i}", free_port_triple(), tmp_path / f"m{i}",
                      etcd.endpoint_string, min_sync, extra, lease_ttl=lease_ttl)
               for i in range(3)]
    g = Group(members)
    try:
        for m in members:
            m.start()
        yield g
    finally:
        for m in members:
            if m.alive:
                try:
                    m.signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
        g.stop_all()


@pytest.fixture
def group(tmp_path: Path, etcd_cluster: Any, request: pytest.FixtureRequest) -> Iterator[Group]:
    extra = getattr(request, "param", ())
    stable = request.node.get_closest_marker("stable_lease") is not None
    with running_group(tmp_path, etcd_cluster, extra=extra,
                       lease_ttl=STABLE_LEASE_TTL if stable else LEASE_TTL) as g:
        yield g


class Writer:
    """A raw REQ client writing unique keys to the group: it follows NotPrimary, rotates to the
    next member on a timeout, and resends with the same (client_id, request_no)."""

    def __init__(self, name: str, addresses: list[str], history: History) -> None:
        self.name, self.addresses, self.history = name, addresses, history
        self.client_id = f"writer-{name}-{os.getpid()}".encode()
        self.index = 0
        self.acks: list[tuple[float, int, int]] = []  # (time, seq, term)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.timeouts = 0
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.thread = threading.Thread(target=self._run, name=f"writer-{name}", daemon=True)

    def start(self) -> Writer:
        self.thread.start()
        return self

    def _connect(self, address: str) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def _request(self, request: Set) -> WriteOk | None:
        """Until acknowledged (or stopped): the same request to whoever may be primary."""
        address = self.addresses[self.index]
        while not self.stop.is_set():
            self._connect(address)
            assert self.sock is not None
            self.sock.send(_requests.encode(request))
            if not self.sock.poll(int(REQUEST_TIMEOUT * 1000)):
                self.timeouts += 1
                self.index = (self.index + 1) % len(self.addresses)
                address = self.addresses[self.index]
                continue
            reply = _replies.decode(self.sock.recv())
            if isinstance(reply, WriteOk):
                return reply
            if isinstance(reply, NotPrimary):
                if reply.primary and reply.primary in self.addresses:
                    self.index = self.addresses.index(reply.primary)
                else:
                    self.index = (self.index + 1) % len(self.addresses)
                    self.stop.wait(0.05)  # poll: no primary known yet
                address = self.addresses[self.index]
                continue
            self.errors.append(repr(reply))
            self.stop.wait(0.05)  # poll: a refusal; the same request again
        return None

    def _run(self) -> None:
        try:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                key = f"{self.name}_{i}"
                value = {"w": self.name, "i": i}
                self.history.attempt(self.name, "set", key, value)
                reply = self._request(Set(self.client_id, i + 1, NS, 0, key,
                                          json.dumps(value).encode()))
                if reply is None:
                    return
                self.history.ack(self.name, "set", key, value, reply.seq)
                self.acks.append((time.monotonic(), reply.seq, reply.term))
        finally:
            if self.sock is not None:
                self.sock.close(linger=0)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def acked_after(writers: list[Writer], t: float) -> int:
    return sum(1 for w in writers for at, _, _ in list(w.acks) if at > t)


def wait_progress(writers: list[Writer], n: int, timeout: float, what: str,
                  group: Group | None = None) -> float:
    """Wait until ``n`` more writes are acknowledged; returns when the first came."""
    t0 = time.monotonic()
    try:
        wait_until(lambda: acked_after(writers, t0) >= n, timeout, 0.02, what)
    except AssertionError:
        extra = "" if group is None else f" roles {group.roles()}\n" + "\n".join(
            f"--- {m.name}:\n{m.stderr()}" for m in group.members if m.proc)
        raise AssertionError(f"timed out waiting for {what}; {extra}") from None
    return min(at for w in writers for at, _, _ in list(w.acks) if at > t0)


def fetch_log(address: str) -> tuple[str, list[Event]]:
    """The namespace's complete log from the primary (Fetch from seq 1)."""
    hello = call(address, Hello(b"checker"))
    assert isinstance(hello, HelloReply), hello
    events: list[Event] = []
    while True:
        r = call(address, Fetch(NS, hello.epoch, len(events) + 1, 1, 100_000), 5.0)
        assert isinstance(r, FetchReply) and r.available, f"Fetch from {len(events) + 1}: {r}"
        if not r.events:
            return hello.epoch, events
        events += r.events


def offline_digests(group: Group) -> dict[str, tuple[int, str]]:
    """Each member's durable state, recovered from its data dir (members stopped)."""
    out = {}
    for m in group.members:
        assert not m.alive
        core = BrokerCore(log=DurableLog(m.data_dir))
        core.log.recover(core)
        try:
            d = core.digest(NS)
            assert isinstance(d, DigestReply), d
            out[m.name] = (d.seq, d.digest)
        finally:
            core.log.close()
    return out


def check_end(group: Group, history: History, writers: list[Writer]) -> None:
    """Writers stopped: the history against the primary's log, then every member's durable
    state equal to that log's."""
    for w in writers:
        w.join()
    primary = group.wait_formed(30, sync=1)
    # A last write through the primary settles every member at the same seq.
    final = Writer("final", group.addresses(), history)
    reply = final._request(Set(final.client_id, 1, NS, 0, "final", b"1"))
    assert isinstance(reply, WriteOk)
    history.attempt("final", "set", "final", 1)
    history.ack("final", "set", "final", 1, reply.seq)
    epoch, events = fetch_log(primary.address)
    summary = history.check(events)
    assert summary.acks > 0
    want = replay_digest(NS, events)

    def standbys_caught_up() -> bool:
        for m in group.members:
            s = m.stats(0.5) if m.alive else None
            if s is None or (m is not primary and s.get("group_lag") != 0):
                return False
        ps = primary.stats(0.5)
        return ps is not None and ps.get("group_max_lag", 1) == 0 \
            and ps["group_followers"] == len(group.members) - 1
    wait_until(standbys_caught_up, 30, 0.05, "every standby to catch up")
    group.stop_all()
    digests = offline_digests(group)
    assert digests == {m.name: want for m in group.members}, (digests, want)




# ------------------------------------------------------------------------------ the tests


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_group_forms_with_one_primary_and_equal_state(group: Group) -> None:
    primary = group.wait_formed()
    roles = {m.name: m.stats() for m in group.members}
    assert sum(s["group_primary"] for s in roles.values() if s) == 1, roles
    hello = call(group.members[0].address, Hello(b"x"))
    assert isinstance(hello, HelloReply)
    assert hello.primary == primary.address and sorted(hello.members) == sorted(
        group.addresses()) and hello.term >= 1
    standby = next(m for m in group.members if m is not primary)
    refused = call(standby.address, Set(b"c", 1, NS, 0, "k", b"1"))
    assert isinstance(refused, NotPrimary) and refused.primary == primary.address
    stream = StreamRecorder(primary)
    history = History()
    writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(2)]
    wait_progress(writers, 100, 30, "writes through the group", group)
    assert all(term == hello.term for w in writers for _, _, term in w.acks)
    wait_until(lambda: stream.batches() and stream.heartbeats(), 10, 0.02,
               "batches and heartbeats from the primary")
    stream.close()
    assert {m.term for m in stream.messages} == {hello.term}
    check_end(group, history, writers)


class StreamRecorder:
    """A SUB on one member's event endpoint recording every batch and heartbeat (thread)."""

    def __init__(self, member: Member) -> None:
        from broker.protocol import published_codec, topic_for

        self.codec = published_codec()
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic_for(NS))
        self.sock.connect(f"tcp://127.0.0.1:{member.port + 1}")
        self.messages: list[Any] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(50):
                body = self.sock.recv_multipart()[1]  # [topic, body] or [topic, body, header]
                self.messages.append(self.codec.decode(body))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)

    def batches(self) -> list[Any]:
        return [m for m in list(self.messages) if type(m).__name__ == "EventBatch"]

    def heartbeats(self) -> list[Any]:
        return [m for m in list(self.messages) if type(m).__name__ == "Heartbeat"]


def check_published_against_log(batches: list[Any], events: list[Event]) -> int:
    """Every published event is the log's event at its seq: nothing uncommitted went out."""
    n = 0
    for batch in batches:
        for e in batch.events:
            assert e.seq <= len(events) and events[e.seq - 1] == e, (
                f"published {e} is not the final log's event at seq {e.seq}")
            n += 1
    return n


def first_ack_of_term_above(writers: list[Writer], term: int) -> float | None:
    times = [at for w in writers for at, _, t in list(w.acks) if t > term]
    return min(times) if times else None


def current_term(member: Member) -> int:
    s = member.stats()
    assert s is not None
    return s["group_term"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("group", [(), ("--compact-bytes", "20000")], indirect=True,
                         ids=["plain", "compacting"])
def test_kill_9_of_the_primary_under_writers_loses_no_acknowledged_write(
        group: Group) -> None:
    cycles = int(os.environ.get("SHAREDMEM_GROUP_CYCLES", "3"))
    history = History()
    writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(4)]
    pauses = []
    for _ in range(cycles):
        primary = group.wait_formed(30)
        term = current_term(primary)
        wait_progress(writers, 50, 30, "writes before the kill", group)
        killed_at = time.monotonic()
        primary.kill()
        # Writes resume under a new term on another member.
        wait_until(lambda t=term: first_ack_of_term_above(writers, t) is not None,  # noqa: B023
                   30, 0.02, "writes to resume after the primary was killed")
        resumed = first_ack_of_term_above(writers, term)
        assert resumed is not None
        pauses.append(resumed - killed_at)
        group.wait_new_primary(primary)
        primary.start()  # the old primary rejoins as a standby
        assert group.wait_formed(30) is not primary
    pauses.sort()
    print(f"write pause after kill -9 of the primary (lease TTL {LEASE_TTL}s): "
          f"p50 {pauses[len(pauses) // 2]:.2f}s max {pauses[-1]:.2f}s over {cycles} cycles")
    if "--compact-bytes" in group.members[0].extra:
        compactions = {m.name: (m.stats() or {}).get("compactions", 0) for m in group.members}
        assert sum(compactions.values()) > 0, compactions
    check_end(group, history, writers)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_of_a_standby_shrinks_the_sync_set_and_it_rejoins(
        group: Group, etcd_cluster: Any) -> None:
    from broker.coordination import EtcdCoordinator, GroupConfig, GroupKeys

    primary = group.wait_formed(30)
    etcd = EtcdCoordinator(etcd_cluster.endpoint_string)
    keys = GroupKeys("g")
    sizes: list[int] = []
    stop_watch = threading.Event()

    def sample() -> None:
        while not stop_watch.is_set():
            kv = etcd.get(keys.config).first
            if kv is not None:
                sizes.append(len(GroupConfig.decode(kv.value).sync_set))
            stop_watch.wait(0.02)  # poll

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    history = History()
    writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(2)]
    try:
        wait_progress(writers, 50, 30, "writes before the kill", group)
        standby = next(m for m in group.members if m is not primary)
        standby.kill()
        wait_until(lambda: (primary.stats() or {}).get("group_sync_set") == 1, 30, 0.05,
                   "the sync set to shrink to 1 via etcd")
        wait_progress(writers, 50, 30, "writes to go on without the standby", group)
        assert group.primary() is primary
        standby.start()
        wait_until(lambda: (primary.stats() or {}).get("group_sync_set") == 2, 30, 0.05,
                   "the restarted standby to rejoin the sync set")
        wait_until(lambda: (standby.stats() or {}).get("group_in_sync_set") == 1, 10, 0.05,
                   "the standby to see itself in the sync set")
        wait_progress(writers, 50, 30, "writes with the full sync set", group)
    finally:
        stop_watch.set()
        sampler.join(5)
        etcd.close()
    assert 1 in sizes and 2 in sizes
    assert min(sizes) >= 1, f"the sync set went below --min-sync 1: {sorted(set(sizes))}"
    check_end(group, history, writers)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigstop_of_the_primary_past_its_lease_hands_over_and_it_rejoins(
        group: Group) -> None:
    primary = group.wait_formed(30)
    term = current_term(primary)
    history = History()
    stream = StreamRecorder(primary)  # everything the old primary ever publishes
    writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(3)]
    wait_progress(writers, 50, 30, "writes before the stop", group)
    primary.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    # A writer stuck with the old primary: its request waits in the stopped process.
    stuck = Writer("stuck", [primary.address], history)
    stuck_reply: list[Any] = []

    def stuck_write() -> None:
        stuck.history.attempt("stuck", "set", "stuck", 1)
        s = zmq.Context.instance().socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(primary.address)
        s.send(_requests.encode(Set(stuck.client_id, 1, NS, 0, "stuck", b"1")))
        if s.poll(int((3 * LEASE_TTL + 8) * 1000)):
            stuck_reply.append(_replies.decode(s.recv()))
        s.close(linger=0)

    t = threading.Thread(target=stuck_write, daemon=True)
    t.start()
    wait_until(lambda: first_ack_of_term_above(writers, term) is not None, 30, 0.02,
               "a standby to take over while the primary is stopped")
    new = group.wait_new_primary(primary)
    wait_until(lambda: time.monotonic() - stopped_at >= 3 * LEASE_TTL, 10, 0.05,
               "3x the lease TTL")
    wait_progress(writers, 30, 30, "writes under the new primary", group)
    primary.signal(signal.SIGCONT)
    t.join(3 * LEASE_TTL + 10)
    print(f"the stopped primary's answer to a write sent while stopped: {stuck_reply}")
    for reply in stuck_reply:
        if isinstance(reply, WriteOk):
            # Only a write the new term's log holds may be acknowledged (history checks it).
            history.ack("stuck", "set", "stuck", 1, reply.seq)
    formed = group.wait_formed(30)
    assert formed is new, "the old primary must rejoin as a standby"
    old_stats = primary.stats()
    assert old_stats is not None and old_stats["group_primary"] == 0
    assert old_stats["group_steps_down"] >= 1
    wait_progress(writers, 30, 30, "writes after the old primary rejoined", group)
    stream.close()
    epoch, events = fetch_log(formed.address)
    assert check_published_against_log(stream.batches(), events) > 0
    assert {b.term for b in stream.batches()} == {term}
    check_end(group, history, writers)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_all_members_killed_at_once_restart_with_every_acknowledged_write(
        group: Group) -> None:
    group.wait_formed(30)
    history = History()
    writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(3)]
    wait_progress(writers, 100, 30, "writes before the crash", group)
    for m in group.members:
        m.signal(signal.SIGKILL)
    for m in group.members:
        m.kill()  # reaps it
    for w in writers:
        w.join()
    acked = [(a.key, a.value, a.version) for a in history.acks]
    assert acked
    for m in group.members:
        m.start()
    primary = group.wait_formed(30)
    writers2 = [Writer(f"v{i}", group.addresses(), history).start() for i in range(2)]
    wait_progress(writers2, 30, 30, "writes after the restart", group)
    for w in writers2:
        w.join()
    wait_until(lambda: (primary.stats() or {}).get("group_max_lag", 1) == 0, 30, 0.05,
               "standbys to catch up")
    group.stop_all()
    assert_everywhere(group, acked)


def assert_everywhere(group: Group, acked: list[tuple[str, Any, int]]) -> None:
    """Members stopped: their durable states are equal and hold every acknowledged write."""
    digests = offline_digests(group)
    assert len(set(digests.values())) == 1, digests
    for m in group.members:
        core = BrokerCore(log=DurableLog(m.data_dir))
        core.log.recover(core)
        try:
            state = core.namespaces[NS]
            for key, value, version in acked:
                entry = state.entry(key)
                assert entry is not None, f"{m.name} lost acknowledged {key!r}"
                assert json.loads(entry.value) == value and entry.version == version, (
                    m.name, key, entry)
        finally:
            core.log.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_sync_set_member_on_a_wiped_data_dir_never_leads(group: Group) -> None:
    """A sync-set member restarted on an empty data dir has a new epoch and none of the
    acknowledged writes: it must not campaign, or its Install would empty every member. It
    waits, saying why; once an intact member is back, that one leads, the wiped one is
    installed from it, and every acknowledged write is on all three."""
    primary = group.wait_formed(30)
    history = History()
    writers = [Writer("w0", group.addresses(), history).start()]
    wait_progress(writers, 50, 30, "writes before the wipe", group)
    for w in writers:
        w.join()
    acked = [(a.key, a.value, a.version) for a in history.acks]
    wiped = next(m for m in group.members if m is not primary)  # in the sync set of 2
    group.stop_all()  # clean stops revoke the leases: the leader key is gone at once
    shutil.rmtree(wiped.data_dir)
    wiped.start()
    wait_until(lambda: "does not campaign: its log has epoch" in wiped.stderr(), 30, 0.05,
               "the wiped member to say why it does not campaign")
    assert (wiped.stats(1.5) or {}).get("group_primary") == 0
    for m in group.members:
        if m is not wiped:
            m.start()
    leader = group.wait_formed(30)
    assert leader is not wiped
    wait_until(lambda: (leader.stats() or {}).get("group_max_lag", 1) == 0, 30, 0.05,
               "the wiped member to be installed and catch up")
    group.stop_all()
    assert_everywhere(group, acked)


@pytest.mark.parametrize(("args", "message"), [
    (["--group", "g", "--etcd", "http://127.0.0.1:1"], "--group requires --data-dir"),
    (["--group", "g", "--data-dir", "{dir}"], "--group requires --etcd"),
    (["--member", "m1"], "--member need --group"),
    (["--etcd", "http://127.0.0.1:1"], "--etcd need --group"),
    (["--group", "a/b", "--data-dir", "{dir}", "--etcd", "http://127.0.0.1:1"],
     "invalid group name"),
    (["--group", "g", "--data-dir", "{dir}", "--etcd", "localhost:2379"],
     "invalid etcd endpoint"),
    (["--group", "g", "--data-dir", "{dir}", "--etcd", "http://127.0.0.1:1", "--fsync", "no"],
     "--group requires --fsync always"),
    (["--group", "g", "--data-dir", "{dir}", "--etcd", "http://127.0.0.1:1", "--lease-ttl",
      "0"], "--lease-ttl must be >= 1"),
    (["--group", "g", "--data-dir", "{dir}", "--etcd", "http://127.0.0.1:1", "--repl-bind",
      "tcp://10.1.2.3:7402"], "off loopback"),
])
def test_group_flags_are_checked(tmp_path: Path, args: list[str], message: str) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT, child_env

    argv = [a.replace("{dir}", str(tmp_path / "d")) for a in args]
    r = subprocess.run([sys.executable, "-m", "broker", "--bind", "tcp://127.0.0.1:1", *argv],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr, r.stderr


class SyncSetSampler:
    """Reads the config's sync set from etcd every 20 ms (on a thread), to show it never went
    below --min-sync."""

    def __init__(self, etcd: Any) -> None:
        from broker.coordination import EtcdCoordinator, GroupKeys

        self.etcd = EtcdCoordinator(etcd.endpoint_string, deadline=1.0)
        self.key = GroupKeys("g").config
        self.sizes: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from broker.coordination import CoordinationError, GroupConfig

        while not self.stop.is_set():
            try:
                kv = self.etcd.get(self.key).first
            except CoordinationError:
                kv = None
            if kv is not None:
                self.sizes.append(len(GroupConfig.decode(kv.value).sync_set))
            self.stop.wait(0.02)  # poll

    def __enter__(self) -> SyncSetSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.etcd.close()


def timeouts(writers: list[Writer]) -> int:
    return min(w.timeouts for w in writers)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_min_sync_2_never_acknowledges_with_fewer_standbys(
        tmp_path: Path, etcd_cluster: Any) -> None:
    with running_group(tmp_path, etcd_cluster, min_sync=2) as group:
        primary = group.wait_formed(30)  # the sync set grew 0 -> 1 -> 2 (no commit before)
        sampler = SyncSetSampler(etcd_cluster).__enter__()
        history = History()
        writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(2)]
        wait_progress(writers, 50, 30, "writes before the kill", group)
        standby = next(m for m in group.members if m is not primary)
        standby.kill()
        # Every writer times out twice (its write waits for an ack that cannot come) ...
        t0 = timeouts(writers)
        wait_until(lambda: timeouts(writers) >= t0 + 2, 30, 0.05, "writers to time out")
        before = sum(len(w.acks) for w in writers)
        t1 = timeouts(writers)
        wait_until(lambda: timeouts(writers) >= t1 + 3, 30, 0.05, "writers to time out again")
        # ... and meanwhile nothing was acknowledged with one standby.
        assert sum(len(w.acks) for w in writers) == before
        # The primary's loop waits for the ack (it answers no Stats now); etcd says the rest.
        assert sampler.sizes and sampler.sizes[-1] == 2
        standby.start()
        wait_progress(writers, 50, 30, "writes after the standby came back", group)
        sampler.__exit__()
        assert min(sampler.sizes) >= 2, sorted(set(sampler.sizes))
        check_end(group, history, writers)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigstop_of_a_standby_shrinks_the_sync_set_and_writes_go_on(
        group: Group, etcd_cluster: Any) -> None:
    primary = group.wait_formed(30)
    history = History()
    writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(2)]
    with SyncSetSampler(etcd_cluster) as sampler:
        wait_progress(writers, 50, 30, "writes before the stop", group)
        standby = next(m for m in group.members if m is not primary)
        standby.signal(signal.SIGSTOP)
        wait_until(lambda: (primary.stats() or {}).get("group_sync_set") == 1, 30, 0.05,
                   "the sync set to shrink")
        wait_progress(writers, 50, 30, "writes with the standby stopped", group)
        standby.signal(signal.SIGCONT)
        wait_until(lambda: (primary.stats() or {}).get("group_sync_set") == 2, 30, 0.05,
                   "the resumed standby to rejoin the sync set")
        wait_progress(writers, 30, 30, "writes after it rejoined", group)
    assert min(sampler.sizes) >= 1
    check_end(group, history, writers)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_writes_go_on_through_the_loss_of_the_etcd_leader_and_of_all_etcd(
        group: Group, etcd_cluster: Any) -> None:
    primary = group.wait_formed(30)
    history = History()
    writers = [Writer(f"w{i}", group.addresses(), history).start() for i in range(2)]
    wait_progress(writers, 50, 30, "writes before etcd faults", group)
    etcd_cluster.kill(etcd_cluster.leader())
    wait_progress(writers, 50, 30, "writes after kill -9 of the etcd leader", group)
    for m in etcd_cluster.alive_members():
        etcd_cluster.kill(m)
    wait_progress(writers, 100, 30, "writes with every etcd member down", group)
    assert group.primary() is primary, "no failover can happen without etcd"
    for w in writers:
        w.join()
    epoch, events = fetch_log(primary.address)
    history.check(events)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.stable_lease
def test_garbage_and_stray_messages_on_the_replication_link_change_nothing(
        group: Group) -> None:
    from broker.records import NamespaceRecord
    from broker.replication import Ack, Append, Follow, Refuse, ReplCodec

    primary = group.wait_formed(30)
    term = current_term(primary)
    codec = ReplCodec()
    ctx = zmq.Context.instance()
    for m in group.members:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, b"intruder")
        s.connect(f"tcp://127.0.0.1:{m.port + 2}")
        for frames in ([b"\xff\x00garbage"], [b"a", b"b", b"c"], [b""],
                       [codec.encode(Refuse(term + 100, "intruder"))],
                       [codec.encode(Ack("m1", term, 10**9))],
                       [codec.encode(Follow("m1", term))],  # identity is not m1's
                       [codec.encode(Append(term + 100, 1, [NamespaceRecord("evil", 0)]))]):
            s.send_multipart(frames)
        s.close(linger=100)
    history = History()
    writers = [Writer("w0", group.addresses(), history).start()]
    wait_progress(writers, 30, 30, "writes after the garbage", group)
    assert group.primary() is primary and current_term(primary) == term
    for m in group.members:
        s = m.stats()
        assert s is not None and s["group_steps_down"] == 0, (m.name, s)
    check_end(group, history, writers)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_former_primarys_unacknowledged_tail_is_replaced_when_it_rejoins(
        group: Group, tmp_path: Path) -> None:
    import shutil

    primary = group.wait_formed(30)
    standbys = [m for m in group.members if m is not primary]
    history = History()
    writers = [Writer("w0", group.addresses(), history).start()]
    wait_progress(writers, 30, 30, "writes before the fault", group)
    writers[0].join()
    for m in standbys:
        m.signal(signal.SIGSTOP)
    # A write only the primary gets: appended and fsynced there, never acknowledged.
    tail = Writer("tail", [primary.address], history)
    request = Set(tail.client_id, 1, NS, 0, "tail", json.dumps({"t": 1}).encode())
    history.attempt("tail", "set", "tail", {"t": 1})
    assert call(primary.address, request, timeout=1.0) is None, "acknowledged without acks"
    primary.kill()
    copy = tmp_path / "old-primary-copy"
    shutil.copytree(primary.data_dir, copy)
    core = BrokerCore(log=DurableLog(copy))
    core.log.recover(core)
    try:
        assert "tail" in core.namespaces[NS].entries, "the old primary must hold the tail"
    finally:
        core.log.close()
    for m in standbys:
        m.signal(signal.SIGCONT)
    # The writer's retry (same ids) goes to whoever leads now and is applied once.
    retry = Writer("tail", group.addresses(), history)
    retry.client_id = tail.client_id
    reply = retry._request(request)
    assert isinstance(reply, WriteOk)
    history.ack("tail", "set", "tail", {"t": 1}, reply.seq)
    new = group.wait_new_primary(primary)
    primary.start()  # rejoins: its tail is replaced by the new primary's state
    assert group.wait_formed(30) is new
    more = [Writer("w1", group.addresses(), history).start()]
    wait_progress(more, 20, 30, "writes after the rejoin", group)
    check_end(group, history, more)
