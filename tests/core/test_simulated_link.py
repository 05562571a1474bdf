"""A simulated link between the broker core and a replica (h11's ConnectionPair idea).

The test plays both shells: it drives ``BrokerCore`` (decide -> log -> commit -> publish) and
carries the published batches and heartbeats, and the replica's requests and their answers,
through channels that drop, duplicate and reorder messages under a seeded random generator.
Time is a plain float that only moves when the test says so.

Checked throughout: the replica's state is always the broker's state at some seq of the log
(a prefix: same digest as replaying the log up to that seq) and its seq never goes back within
an epoch. Checked at the end: once writes stop and a heartbeat gets through, the replica
converges to the broker's digest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgspec
import pytest

from broker.core import BrokerCore, Decision
from broker.log import MemoryLog
from broker.protocol import (
    Delete,
    Error,
    EventBatch,
    FetchReply,
    Heartbeat,
    Open,
    OpenReply,
    Set,
    SetMany,
    Snapshot,
    SnapshotReply,
    WriteOk,
    WriteRequest,
)
from broker.state import NamespaceState
from node.replica import Replica, RequestFetch, RequestSnapshot, Sync

NS = "sim"
MAX_KEYS = 10
KEYS = [f"k{i:02}" for i in range(13)]  # more keys than max_keys: some writes are refused


@dataclass
class Channel:
    """An unreliable, unordered channel: each send may be dropped or duplicated, and each
    receive may take any of the first few queued messages."""

    rng: random.Random
    drop: float
    dup: float
    reorder: float
    queue: list[object] = field(default_factory=list)
    sent: int = 0
    dropped: int = 0

    def send(self, message: object) -> None:
        self.sent += 1
        if self.rng.random() < self.drop:
            self.dropped += 1
            return
        self.queue.append(message)
        if self.rng.random() < self.dup:
            self.queue.insert(self.rng.randrange(len(self.queue) + 1), message)

    def receive(self) -> object | None:
        if not self.queue:
            return None
        i = 0
        if self.rng.random() < self.reorder:
            i = self.rng.randrange(min(len(self.queue), 5))
        return self.queue.pop(i)

    def make_reliable(self) -> None:
        self.drop = self.dup = self.reorder = 0.0


@dataclass
class ProbeAnswer:
    reply: OpenReply


class Sim:
    def __init__(self, seed: int, retention: int, drop: float = 0.15, dup: float = 0.1,
                 reorder: float = 0.3) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.to_replica = Channel(random.Random(seed + 1000), drop, dup, reorder)
        self.to_broker = Channel(random.Random(seed + 2000), drop, dup, reorder)
        self.retention = retention
        self.replica = Replica(NS, MAX_KEYS, request_timeout=1.0)
        # Per epoch, the digest of the broker's state after each seq (index = seq).
        self.history: dict[str, list[str]] = {}
        self._ref: NamespaceState | None = None
        self._last_write: tuple[WriteRequest, Decision] | None = None
        self.core: BrokerCore
        self.restart_broker("epoch-0")
        self._request_no = 0
        self._last_seen: tuple[str | None, int] = (None, 0)
        self.applied_writes = 0
        self.refusals = 0
        self.retries = 0
        self.prefix_checks = 0
        for action in self.replica.start(self.now):
            self.to_broker.send(action)

    # ------------------------------------------------------------------ broker side

    def restart_broker(self, epoch: str) -> None:
        """A new broker incarnation with an empty, non-durable log: a new history."""
        self.core = BrokerCore(epoch, log=MemoryLog(retention=self.retention))
        assert isinstance(self.core.open(Open(NS, MAX_KEYS)), OpenReply)
        self._ref = NamespaceState(NS)
        self.history[epoch] = [self._ref.digest()]
        self._last_write = None  # the new broker's dedup table is empty: no retries across

    @property
    def broker_state(self) -> NamespaceState:
        return self.core.namespaces[NS]

    def _record_and_publish(self, decision: Decision) -> None:
        assert self._ref is not None
        for event in decision.events:
            self._ref.apply_batch([event], self.now)
            self.history[self.core.epoch].append(self._ref.digest())
        assert self._ref.digest() == self.broker_state.digest()
        if decision.events:
            self.to_replica.send(EventBatch(NS, self.core.epoch, list(decision.events)))

    def _new_request(self) -> WriteRequest:
        self._request_no += 1
        no = self._request_no
        r = self.rng.random()
        key = self.rng.choice(KEYS)
        value = msgspec.json.encode({"no": no, "pad": "x" * self.rng.randrange(5)})
        if r < 0.5:
            return Set(b"writer", no, NS, MAX_KEYS, key, value)
        if r < 0.65:
            return Set(b"writer", no, NS, MAX_KEYS, key, value, self.rng.uniform(0.2, 3.0))
        if r < 0.8:
            items = [(self.rng.choice(KEYS), value) for _ in range(self.rng.randint(1, 4))]
            return SetMany(b"writer", no, NS, MAX_KEYS, items)
        return Delete(b"writer", no, NS, MAX_KEYS, key)

    def write(self) -> None:
        """One request through the broker shell's write path; sometimes a retry of the last."""
        retry = self._last_write is not None and self.rng.random() < 0.1
        request = self._last_write[0] if retry and self._last_write else self._new_request()
        seq_before = self.broker_state.seq
        decision = self.core.decide(request, self.now, 1_000_000.0 + self.now)
        if decision.events:
            self.core.log.append(NS, decision.events, self.now)
        self.core.commit(decision, self.now)
        if retry:
            assert self._last_write is not None
            self.retries += 1
            assert decision.duplicate
            assert decision.reply == self._last_write[1].reply
            assert decision.events == []
            assert self.broker_state.seq == seq_before
            return
        self._last_write = (request, decision)
        if isinstance(decision.reply, WriteOk):
            self.applied_writes += 1
            assert decision.reply.seq == seq_before + len(decision.events)
        else:
            assert isinstance(decision.reply, Error)
            assert decision.reply.kind == "StorageError"  # the only refusal we provoke: full
            assert decision.events == []
            self.refusals += 1
        self._record_and_publish(decision)

    def expire(self) -> None:
        for decision in self.core.expire_due(self.now):
            first = decision.events[0].seq
            assert first == self.broker_state.seq + 1
            self.core.log.append(NS, decision.events, self.now)
            self.core.commit(decision, self.now)
            assert [e.seq for e in decision.events] == list(range(first, self.broker_state.seq + 1))
            self._record_and_publish(decision)

    def heartbeat(self, channel: Channel | None = None) -> None:
        (channel or self.to_replica).send(Heartbeat(NS, self.core.epoch, self.broker_state.seq))

    def serve(self) -> bool:
        """The broker answers one request from the replica, if any arrived."""
        action = self.to_broker.receive()
        if action is None:
            return False
        if isinstance(action, RequestSnapshot):
            reply = self.core.snapshot(
                Snapshot(action.namespace, MAX_KEYS, action.snap_id, b"nonce"), self.now
            )
            assert isinstance(reply, SnapshotReply)
            self.to_replica.send(reply)
        elif isinstance(action, RequestFetch):
            self.to_replica.send(self.core.fetch(
                action.namespace, action.epoch, action.from_seq, 10_000, action.snap_id, self.now,
            ))
        elif type(action).__name__ == "RequestProbe":  # answered by Open (epoch, seq)
            reply = self.core.open(Open(action.namespace, action.max_keys))
            assert isinstance(reply, OpenReply)
            self.to_replica.send(ProbeAnswer(reply))
        else:  # pragma: no cover - a new action kind the simulation does not know
            raise AssertionError(f"unknown action {action!r}")
        return True

    # ------------------------------------------------------------------ replica side

    def deliver(self) -> bool:
        message = self.to_replica.receive()
        if message is None:
            return False
        r = self.replica
        if isinstance(message, EventBatch):
            actions = r.on_batch(message, self.now)
        elif isinstance(message, Heartbeat):
            actions = r.on_heartbeat(message, self.now)
        elif isinstance(message, SnapshotReply):
            actions = r.on_snapshot(message, self.now)
        elif isinstance(message, FetchReply):
            actions = r.on_fetch(message, self.now)
        else:
            assert isinstance(message, ProbeAnswer)
            actions = r.on_probe(message.reply.epoch, message.reply.seq, self.now)
        for action in actions:
            self.to_broker.send(action)
        self.check_prefix()
        return True

    def tick(self, dt: float) -> None:
        self.now += dt
        for action in self.replica.on_tick(self.now):
            self.to_broker.send(action)
        self.check_prefix()

    def check_prefix(self) -> None:
        """The replica is exactly the log up to its seq, and never goes back in an epoch."""
        r = self.replica
        if r.state is None:
            assert r.sync is Sync.JOINING
            return
        self.prefix_checks += 1
        history = self.history[r.epoch]
        assert r.seq < len(history), "replica ahead of the broker's log"
        assert r.state.digest() == history[r.seq], f"state at seq {r.seq} is not a log prefix"
        last_epoch, last_seq = self._last_seen
        if r.epoch == last_epoch:
            assert r.seq >= last_seq, f"seq went back from {last_seq} to {r.seq}"
        self._last_seen = (r.epoch, r.seq)

    # ------------------------------------------------------------------ scenario

    def run_lossy(self, steps: int) -> None:
        for _ in range(steps):
            self.tick(self.rng.uniform(0.0, 0.05))
            roll = self.rng.random()
            if roll < 0.30:
                self.write()
            elif roll < 0.65:
                self.deliver()
            elif roll < 0.82:
                self.serve()
            elif roll < 0.90:
                self.heartbeat()
            else:
                self.expire()

    def settle(self) -> int:
        """Writes have stopped: make the link reliable, deliver one heartbeat, let the replica
        catch up (ticking the clock when it waits on a lost request). Returns rounds used."""
        self.now += 10.0  # every TTL of the run is due now
        self.expire()
        self.to_replica.make_reliable()
        self.to_broker.make_reliable()
        self.heartbeat()
        for rounds in range(200):
            moved = False
            while self.deliver():
                moved = True
            while self.serve():
                moved = True
            r = self.replica
            if (
                not moved and r.sync is Sync.LIVE and r.pending_id is None
                and r.epoch == self.core.epoch and r.seq == self.broker_state.seq
            ):
                return rounds
            if not moved:
                self.tick(r.request_timeout)
        raise AssertionError(f"no convergence: {self.replica.sync} at seq {self.replica.seq}")

    def assert_converged(self) -> None:
        r, b = self.replica, self.broker_state
        assert r.state is not None
        assert r.epoch == self.core.epoch
        assert r.seq == b.seq
        assert r.state.digest() == b.digest()
        assert r.state.list_keys("*", self.now) == b.list_keys("*", self.now)
        for key in b.list_keys("*", self.now):
            assert r.state.live(key, self.now).value == b.live(key, self.now).value


SEEDS = range(8)


@pytest.mark.parametrize("retention", [100_000, 4], ids=["long-log", "short-log"])
@pytest.mark.parametrize("seed", SEEDS)
def test_replica_converges_over_a_lossy_link(seed: int, retention: int) -> None:
    sim = Sim(seed, retention)
    sim.run_lossy(700)
    # The run exercised what it claims to: losses, refusals, retries, repair or resync.
    assert sim.to_replica.dropped > 0 and sim.to_broker.dropped > 0
    assert sim.applied_writes > 50
    assert sim.retries > 0
    assert sim.broker_state.seq > 100
    assert sim.replica.repairs + sim.replica.resyncs > 0
    assert sim.prefix_checks > 300
    sim.settle()
    sim.assert_converged()


@pytest.mark.parametrize("seed", SEEDS)
def test_short_log_forces_snapshot_resyncs(seed: int) -> None:
    sim = Sim(seed, retention=2, drop=0.3)
    sim.run_lossy(500)
    sim.settle()
    sim.assert_converged()
    assert sim.replica.resyncs > 0  # gaps could not all be repaired from a 2-event log


@pytest.mark.parametrize("seed", range(4))
def test_reliable_link_needs_no_repair(seed: int) -> None:
    sim = Sim(seed, retention=100_000, drop=0.0, dup=0.0, reorder=0.0)
    sim.run_lossy(400)
    assert sim.replica.repairs == 0 and sim.replica.resyncs == 0
    sim.settle()
    sim.assert_converged()


@pytest.mark.parametrize("drain_first", [True, False], ids=["drained", "in-flight"])
@pytest.mark.parametrize("seed", range(4))
def test_replica_follows_a_broker_restart_to_the_new_history(seed: int, drain_first: bool) -> None:
    sim = Sim(seed, retention=100_000)
    sim.run_lossy(300)
    if drain_first:
        sim.settle()
        sim.assert_converged()
        assert sim.replica.state is not None and sim.replica.state.entries
    # The broker restarts with a new epoch and an empty, non-durable log. "in-flight": batches,
    # heartbeats and answers of the dead epoch are still queued and arrive late.
    restart_no = sim._request_no
    had_state = sim.replica.state is not None
    resyncs_before = sim.replica.resyncs
    sim.restart_broker("epoch-1")
    for channel in (sim.to_replica, sim.to_broker):
        channel.drop, channel.dup, channel.reorder = 0.15, 0.1, 0.3
    sim.run_lossy(300)
    sim.settle()
    sim.assert_converged()
    assert sim.replica.epoch == "epoch-1"
    if had_state:  # it had to leave the old history through a resync
        assert sim.replica.resyncs > resyncs_before
    # Nothing of the old history survives: every value was written after the restart.
    assert sim.replica.state is not None
    for entry in sim.replica.state.entries.values():
        assert msgspec.json.decode(entry.value)["no"] > restart_no
