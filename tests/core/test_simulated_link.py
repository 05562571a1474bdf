"""A simulated link between the broker core and a replica (h11's ConnectionPair idea).

The broker side is the production code path: ``BrokerCore.run_turn`` returns a ``Turn`` and
``broker.turn.persist`` appends its records to a log whose flush sometimes fails (seeded), then
commits or rolls the turn back; only then are its replies and publishes sent -- the same calls
the broker's loop makes. The test carries the published batches and heartbeats, and the
replica's requests and their answers, through channels that drop, duplicate and reorder
messages under a seeded random generator. Time is a plain float that only moves when told.

Checked throughout: the reference history is built from what the log made *durable*; the
broker's state always equals it; every WriteOk the writer receives names a durable seq; the
replica's state is always the history at some seq (a prefix) and its seq never goes back within
an epoch. Checked at the end: once writes stop and a heartbeat gets through, the replica
converges to the broker's digest. A shell that sends before it persists
(``replies_before_append``) is caught by these checks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import pytest

from broker.core import BrokerCore, SnapshotJob
from broker.errors import StorageError
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
    published_codec,
)
from broker.records import BatchRecord
from broker.state import NamespaceState, entry_json
from broker.turn import Turn, persist
from node.replica import DropBarrier, Phase, Replica, RequestFetch, RequestSnapshot

NS = "sim"
SNAPSHOT_CHUNK = 3  # entries per chunk: most snapshots of the run come in several
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


class FlakyLog(MemoryLog):
    """A memory log whose flush fails now and then (seeded), like a full disk: the turn's
    appended events are dropped again, as ``DurableLog`` does, and ``on_durable`` hears about
    every record only once a flush that includes it returned."""

    def __init__(self, rng: random.Random, fail: float, retention: int,
                 on_durable: Callable[[list[BatchRecord]], None]) -> None:
        super().__init__(retention)
        self.rng, self.fail, self.on_durable = rng, fail, on_durable
        self.pending: list[BatchRecord] = []
        self.failures = 0

    def append_records(self, records: Sequence[object], now: float) -> None:
        super().append_records(records, now)  # type: ignore[arg-type]
        self.pending += [r for r in records if type(r) is BatchRecord]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if pending and self.rng.random() < self.fail:
            self.failures += 1
            for rec in reversed(pending):
                q = self._events[rec.namespace]
                for _ in range(min(len(rec.events), len(q))):  # a short retention held fewer
                    q.pop()
            raise StorageError("write to the log failed (simulated); nothing changed")
        self.on_durable(pending)


Shell = Callable[["Sim", Turn], None]


def production_shell(sim: Sim, turn: Turn) -> None:
    """What broker/server.py's ``_turn`` does with a turn: persist, then send."""
    persist(sim.core, sim.core.log, turn)
    sim.send(turn)


def replies_before_append(sim: Sim, turn: Turn) -> None:
    """A deliberately wrong shell: sends the turn, then appends and flushes."""
    sim.send(turn)
    persist(sim.core, sim.core.log, turn)


class Sim:
    def __init__(self, seed: int, retention: int, drop: float = 0.15, dup: float = 0.1,
                 reorder: float = 0.3, *, flush_fail: float = 0.05,
                 shell: Shell = production_shell) -> None:
        self.rng = random.Random(seed)
        self.log_rng = random.Random(seed + 3000)
        self.flush_fail = flush_fail
        self.shell = shell
        self.codec = published_codec()
        self.now = 0.0
        self.to_replica = Channel(random.Random(seed + 1000), drop, dup, reorder)
        self.to_broker = Channel(random.Random(seed + 2000), drop, dup, reorder)
        self.retention = retention
        self.replica = Replica(NS, MAX_KEYS, request_timeout=1.0)
        # Per epoch, the digest of the broker's state after each seq (index = seq).
        self.history: dict[str, list[str]] = {}
        # Snapshot jobs being sent, one chunk per serve() (production: one per loop turn),
        # and the barrier topics the replica holds subscribed.
        self.jobs: list[SnapshotJob] = []
        self.barriers: set[bytes] = set()
        self.later_chunks = 0  # chunks after the first delivered: snapshots were assembled
        self._ref: NamespaceState | None = None
        self._last_write: tuple[WriteRequest, object] | None = None  # (request, its reply)
        self._replies: dict[object, object] = {}
        self.core: BrokerCore
        self.restart_broker("epoch-0")
        self._request_no = 0
        self._last_seen: tuple[str | None, int] = (None, 0)
        self.applied_writes = 0
        self.refusals = 0
        self.flush_refusals = 0
        self.retries = 0
        self.prefix_checks = 0
        self.carry_out(self.replica.start(self.now))

    # ------------------------------------------------------------------ broker side

    def restart_broker(self, epoch: str) -> None:
        """A new broker incarnation with an empty, non-durable log: a new history."""
        log = FlakyLog(self.log_rng, self.flush_fail, self.retention, self._durable)
        self.core = BrokerCore(epoch, log=log)
        assert isinstance(self.core.open(Open(NS, MAX_KEYS)), OpenReply)
        self._ref = NamespaceState(NS)
        self.history[epoch] = [self._ref.digest()]
        self._last_write = None  # the new broker's dedup table is empty: no retries across
        self.jobs = []  # the old broker's snapshot jobs died with it

    @property
    def broker_state(self) -> NamespaceState:
        return self.core.namespaces[NS]

    def _durable(self, records: list[BatchRecord]) -> None:
        """The log made these records durable: they extend the reference history."""
        assert self._ref is not None
        for rec in records:
            for event in rec.events:
                assert event.seq == self._ref.seq + 1, "durable log not contiguous"
                self._ref.apply_batch([event], self.now)
                self.history[self.core.epoch].append(self._ref.digest())

    def send(self, turn: Turn) -> None:
        """Carry out the turn's sends: replies to the writer, publishes onto the stream."""
        for out in turn.replies:
            reply = out.reply
            if isinstance(reply, WriteOk):
                # An acknowledged write is durable: its seq is in the history already.
                assert reply.seq < len(self.history[reply.epoch]), (
                    f"WriteOk for seq {reply.seq} sent before it was durable")
            self._replies[out.tag] = reply
        for namespace, body, _header in turn.publishes:
            batch = self.codec.decode(body)
            assert isinstance(batch, EventBatch) and namespace == NS
            assert batch.events[-1].seq < len(self.history[batch.epoch]), (
                "events published before they were durable")
            self.to_replica.send(batch)

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

    def turn(self, write: bool = True) -> None:
        """One broker loop turn: the expiry due now and (if ``write``) one request of the
        writer -- sometimes a retry of its last -- through ``run_turn`` and the shell."""
        retry = write and self._last_write is not None and self.rng.random() < 0.1
        requests: list[tuple[object, WriteRequest]] = []
        if retry:
            assert self._last_write is not None
            requests.append(("retry", self._last_write[0]))
        elif write:
            requests.append(("write", self._new_request()))
        seq_before = self.broker_state.seq
        turn = self.core.run_turn(requests, self.now, 1_000_000.0 + self.now)
        expired = sum(len(r.events) for r in turn.records
                      if type(r) is BatchRecord and r.client is None)
        self._replies = {}
        self.shell(self, turn)
        if not turn.committed:
            expired = 0  # rolled back with the turn
        assert self._ref is not None
        assert self._ref.digest() == self.broker_state.digest(), "state is not the durable log"
        if not requests:
            return
        tag, request = requests[0]
        reply = self._replies[tag]
        if isinstance(reply, Error) and "simulated" in reply.message:
            self.flush_refusals += 1  # the turn was rolled back: nothing happened
            assert self.broker_state.seq == seq_before
            self._last_write = (request, reply)
            return
        if retry:
            assert self._last_write is not None
            self.retries += 1
            last_reply = self._last_write[1]
            if not (isinstance(last_reply, Error) and "simulated" in last_reply.message):
                # Answered from the dedup table: the same reply, and nothing re-applied.
                assert reply == last_reply
                assert self.broker_state.seq == seq_before + expired
                return
        self._last_write = (request, reply)
        if isinstance(reply, WriteOk):
            self.applied_writes += 1
            assert reply.seq <= self.broker_state.seq
        else:
            assert isinstance(reply, Error)
            assert reply.kind == "StorageError"  # the only refusal we provoke: full
            assert self.broker_state.seq == seq_before + expired
            self.refusals += 1

    def heartbeat(self, channel: Channel | None = None) -> None:
        (channel or self.to_replica).send(Heartbeat(NS, self.core.epoch, self.broker_state.seq))

    def serve(self) -> bool:
        """The broker sends one chunk of its oldest snapshot job and answers one request from
        the replica, if any arrived; False if there was nothing to do."""
        pumped = False
        if self.jobs:
            job = self.jobs[0]
            self.to_replica.send(job.next_chunk(self.now, SNAPSHOT_CHUNK))
            if job.done:
                self.jobs.pop(0)
            pumped = True
        action = self.to_broker.receive()
        if action is None:
            return pumped
        if isinstance(action, RequestSnapshot):
            # The production path: freeze now, hand out in chunks across later turns.
            job = self.core.snapshot_job(
                Snapshot(action.namespace, MAX_KEYS, action.snap_id, action.nonce))
            assert isinstance(job, SnapshotJob)
            self.jobs.append(job)
        elif isinstance(action, RequestFetch):
            self.to_replica.send(self.core.fetch(
                action.namespace, action.epoch, action.from_seq, 10_000, action.request_id,
                self.now,
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
            self.later_chunks += message.chunk > 0
            actions = r.on_snapshot_chunk(message, self.now)
        elif isinstance(message, FetchReply):
            actions = r.on_fetch(message, self.now)
        else:
            assert isinstance(message, ProbeAnswer)
            actions = r.on_probe(message.reply.epoch, message.reply.seq, self.now)
        self.carry_out(actions)
        self.check_prefix()
        return True

    def carry_out(self, actions: list) -> None:
        """The node's I/O thread: barrier (un)subscriptions are local, requests go out."""
        for action in actions:
            if isinstance(action, DropBarrier):
                assert action.nonce in self.barriers, "dropped a barrier never subscribed"
                self.barriers.remove(action.nonce)
                continue
            if isinstance(action, RequestSnapshot):
                assert action.nonce and action.nonce not in self.barriers
                self.barriers.add(action.nonce)
            self.to_broker.send(action)

    def tick(self, dt: float) -> None:
        self.now += dt
        self.carry_out(self.replica.on_tick(self.now))
        self.check_prefix()

    def check_prefix(self) -> None:
        """The replica is exactly the log up to its seq, and never goes back in an epoch."""
        r = self.replica
        if r.state is None:
            assert r.phase is Phase.JOINING
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
                self.turn()
            elif roll < 0.65:
                self.deliver()
            elif roll < 0.82:
                self.serve()
            elif roll < 0.90:
                self.heartbeat()
            else:
                self.turn(write=False)  # a turn woken by a due TTL only

    def settle(self) -> int:
        """Writes have stopped: make the link reliable, deliver one heartbeat, let the replica
        catch up (ticking the clock when it waits on a lost request). Returns rounds used."""
        self.now += 10.0  # every TTL of the run is due now
        self.core.log.fail = 0.0  # type: ignore[attr-defined]
        self.turn(write=False)
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
                not moved and r.phase is Phase.LIVE and r.pending_id is None
                and r.epoch == self.core.epoch and r.seq == self.broker_state.seq
            ):
                return rounds
            if not moved:
                self.tick(r.request_timeout)
        raise AssertionError(f"no convergence: {self.replica.phase} at seq {self.replica.seq}")

    def assert_converged(self) -> None:
        self.tick(0.0)  # barriers of answered or abandoned requests are dropped at a tick
        assert self.barriers == set(), "barrier subscriptions left behind"
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
    assert sim.later_chunks > 0  # and the snapshots came in chunks


@pytest.mark.parametrize("seed", range(4))
def test_a_shell_that_replies_before_it_appends_is_caught(seed: int) -> None:
    """The checks above can fail: the same run, with a shell that sends a turn's replies and
    publishes before appending and flushing its records, breaks an invariant at once."""
    sim = Sim(seed, retention=100_000, shell=replies_before_append)
    with pytest.raises(AssertionError, match="before it was durable|before they were durable"):
        sim.run_lossy(700)


@pytest.mark.parametrize("seed", SEEDS)
def test_failed_flushes_are_rolled_back_and_refused(seed: int) -> None:
    sim = Sim(seed, retention=100_000, flush_fail=0.2)
    sim.run_lossy(500)
    assert sim.core.log.failures > 0 and sim.flush_refusals > 0  # type: ignore[attr-defined]
    sim.settle()
    sim.assert_converged()


@pytest.mark.parametrize("seed", range(4))
def test_reliable_link_needs_no_repair(seed: int) -> None:
    sim = Sim(seed, retention=100_000, drop=0.0, dup=0.0, reorder=0.0, flush_fail=0.0)
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
    for raw in sim.replica.state.entries.values():
        assert entry_json(raw)["no"] > restart_no
