"""The replica's state machine (its ``Phase``) for one namespace: pure, no sockets, no clock.

Inputs are messages from the event stream and replies to the replica's own requests, each with
the caller's ``now``; outputs are ``Action`` values the shell carries out (ask for a snapshot,
ask for missing events, set up or drop a snapshot's subscription barrier). ``TRANSITIONS`` lists
which reply kinds each state accepts; a reply a state does not accept is ignored and leaves the
state unchanged (the tests assert both). Where the next state depends on the content (a gap, an
epoch), the code below decides it, so this is a guard table, not a full transition table.

This module is the one home of the snapshot protocol on the node's side: it picks each
request's id and barrier nonce (randomness comes in as ``nonce_source``), collects a chunked
``SnapshotReply`` in order, and installs it whole at the last chunk. The I/O thread only
carries out the actions.

Theory of operation:
- JOINING: subscribed; events are buffered until the first snapshot arrives.
- LIVE: events are applied in seq order. A duplicate is dropped; a gap (an event, or a
  heartbeat's seq, beyond ``seq + 1``) moves to REPAIRING and asks for the missing range.
- REPAIRING: waiting for missing events from the broker's log; new events are buffered.
  If the log no longer has them, go to RESYNCING.
- RESYNCING: waiting for a fresh snapshot (epoch change, or repair impossible). The old state is
  still served; the new one is built from the snapshot alone and swapped in whole.
Every request carries an id; replies with another id are stale and dropped.

Broker groups (docs/groups.md): every batch and heartbeat carries the term of the primary
that sent it. One of a term below the highest seen for this namespace comes from a deposed
primary and is dropped before anything else looks at it (it does not even count as hearing
from the broker); an equal or higher term is accepted and continues the same epoch and seqs,
so a failover needs no resync. A single broker sends term 0 throughout.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat

from broker.protocol import (
    Event,
    EventBatch,
    FetchReply,
    Heartbeat,
    KeyDeleted,
    KeySet,
    SnapshotReply,
)
from broker.state import BadSnapshotRow, NamespaceState, SeqGap, decode_entry

logger = logging.getLogger("sharedmem.node")


def random_nonce() -> bytes:
    """A barrier nonce no other subscriber will pick (it is a topic suffix, so printable)."""
    return os.urandom(8).hex().encode()


def diff_events(old: NamespaceState, new: NamespaceState) -> list[Event]:
    """Events that turn ``old`` into ``new`` (for watchers after a resync), in key order."""
    out: list[Event] = []
    old_e, new_e = old.entries, new.entries
    for key in sorted(old_e.keys() | new_e.keys()):
        a, b = old_e.get(key), new_e.get(key)
        if b is None:
            out.append(KeyDeleted(new.seq, key))
        elif a is not b:  # the same object: unchanged (the stored bytes are immutable)
            e = decode_entry(b)
            if a is not None:
                d = decode_entry(a)
                if d.version == e.version and d.value == e.value:
                    continue
            out.append(KeySet(e.version, key, e.value, e.created_at, e.modified_at, None))
    return out


class Phase(enum.Enum):
    """Where a replica is in following the broker. ("sync" names other things: the public
    ``NamespaceStatus.sync`` reports this value; ``sync_with_broker()`` is a catch-up; the
    ``AsyncSharedMemory.sync`` handle is the blocking API; fsync is the disk's.)"""

    JOINING = "joining"
    LIVE = "live"
    REPAIRING = "repairing"
    RESYNCING = "resyncing"


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    """Subscribe ``<ns>\\0<nonce>`` (barrier) and send ``Snapshot(snap_id, nonce)``."""

    namespace: str
    snap_id: int
    nonce: bytes = field(default=b"", compare=False)  # random: which snapshot is what counts


@dataclass(frozen=True, slots=True)
class DropBarrier:
    """Unsubscribe ``<ns>\\0<nonce>``: its snapshot was answered or abandoned."""

    namespace: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class RequestFetch:
    """Send ``Fetch(namespace, epoch, from_seq, request_id)``."""

    namespace: str
    epoch: str
    from_seq: int
    request_id: int


@dataclass(frozen=True, slots=True)
class RequestProbe:
    """Send ``Open(namespace, max_keys)``: after a silence, learn the broker's epoch and seq
    (a restarted broker may not know the namespace yet, so it sends no heartbeats for it)."""

    namespace: str
    max_keys: int


Action = RequestSnapshot | RequestFetch | RequestProbe | DropBarrier

# Which inputs each state reacts to; a reply a state does not list is ignored (state unchanged).
TRANSITIONS: dict[Phase, frozenset[str]] = {
    Phase.JOINING: frozenset({"batch", "heartbeat", "snapshot", "timeout"}),
    Phase.LIVE: frozenset({"batch", "heartbeat", "probe", "timeout"}),
    Phase.REPAIRING: frozenset({"batch", "heartbeat", "fetch", "timeout"}),
    Phase.RESYNCING: frozenset({"batch", "heartbeat", "snapshot", "timeout"}),
}


class Replica:
    """One namespace's replica and its phase.

    ``state`` is None until the first snapshot is installed. ``request_timeout``: how long a
    snapshot/fetch may stay unanswered before it is asked again (with a new id).
    """

    def __init__(self, namespace: str, max_keys: int, *, request_timeout: float = 3.0,
                 silence_timeout: float = 1.5, max_buffer: int = 1_000_000,
                 nonce_source: Callable[[], bytes] = random_nonce) -> None:
        self.namespace = namespace
        self.max_keys = max_keys
        self.phase = Phase.JOINING
        self.state: NamespaceState | None = None
        self.epoch: str | None = None
        self.request_timeout = request_timeout
        self.silence_timeout = silence_timeout
        self._last_probe = float("-inf")
        self.max_buffer = max_buffer
        self.resyncs = 0
        self.repairs = 0
        self.last_heard: float | None = None  # any message of this namespace, local clock
        self.head_seq = 0  # highest seq the broker has announced (events or heartbeats)
        self.term = 0  # highest broker-group term seen for this namespace (0: single broker)
        self.stale_dropped = 0  # batches and heartbeats dropped for a term below ``term``
        self.skipped = 0  # batches dropped by their header alone, never decoded (skip_batch)
        self._buffer: list[tuple[EventBatch, float]] = []  # with arrival time (for TTLs)
        self._buffered = 0
        self._next_id = 0
        self._pending_id: int | None = None
        self._pending_since = 0.0
        # While ``record`` is set (a watcher exists), every applied event is appended to
        # ``changes`` in log order, and a snapshot swap appends the diff as ``(event, True)``.
        self.record = False
        self.changes: list[tuple[Event, bool]] = []
        self._nonce_source = nonce_source
        self._barriers: dict[int, bytes] = {}  # snap_id -> nonce subscribed for it
        # The pending snapshot's state, built chunk by chunk (chunks received so far).
        self._building: tuple[NamespaceState, int] | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def seq(self) -> int:
        return self.state.seq if self.state is not None else 0

    @property
    def pending_id(self) -> int | None:
        return self._pending_id

    def _new_id(self, now: float) -> int:
        self._next_id += 1
        self._pending_id = self._next_id
        self._pending_since = now
        return self._next_id

    def _ask_snapshot(self, now: float) -> list[Action]:
        snap_id = self._new_id(now)
        nonce = self._barriers[snap_id] = self._nonce_source()
        self._building = None
        return [RequestSnapshot(self.namespace, snap_id, nonce)]

    def _apply(self, events: list[Event], now: float) -> None:
        """Apply contiguous events to the state and, while a watcher exists, record them.
        Raises SeqGap (nothing applied) if they do not follow the state's seq."""
        assert self.state is not None
        self.state.apply_batch(events, now)
        if self.record:
            self.changes.extend(zip(events, repeat(False)))  # no generator frame per event

    def _replay(self, buffered: list[tuple[EventBatch, float]]) -> list[Action]:
        """Apply batches buffered while not LIVE, in arrival order (TTLs count from when each
        arrived); once a gap leaves LIVE, the rest is buffered again."""
        actions: list[Action] = []
        for batch, arrived in buffered:
            if batch.events:
                self.head_seq = max(self.head_seq, batch.events[-1].seq)
            if self.phase is Phase.LIVE:
                actions += self._apply_live(batch.events, arrived)
            else:
                actions += self._buffer_batch(batch, arrived)
        return actions

    def _ask_fetch(self, now: float) -> list[Action]:
        assert self.epoch is not None
        self.phase = Phase.REPAIRING
        self.repairs += 1
        return [RequestFetch(self.namespace, self.epoch, self.seq + 1, self._new_id(now))]

    def _resync(self, now: float) -> list[Action]:
        if self.phase is not Phase.JOINING:
            self.resyncs += 1
        self.phase = Phase.RESYNCING if self.state is not None else Phase.JOINING
        return self._ask_snapshot(now)

    def _buffer_batch(self, batch: EventBatch, now: float) -> list[Action]:
        self._buffer.append((batch, now))
        self._buffered += len(batch.events)
        if self._buffered > self.max_buffer:
            # Too far behind to catch up from the buffer: forget it, a snapshot covers it.
            self._buffer.clear()
            self._buffered = 0
            return self._resync(now)
        return []

    def _accepts(self, kind: str) -> bool:
        return kind in TRANSITIONS[self.phase]

    def _old_term(self, term: int) -> bool:
        """True (and counted) for a term below the highest seen; else that term is noted."""
        if term < self.term:
            self.stale_dropped += 1
            return True
        self.term = term
        return False

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Action]:
        """Begin joining: ask for the first snapshot."""
        return self._ask_snapshot(now)

    def on_batch(self, batch: EventBatch, now: float) -> list[Action]:
        if self._old_term(batch.term):
            return []  # a deposed primary's batch: never applied, never buffered
        self.last_heard = now
        if self.phase is not Phase.LIVE:
            if batch.events and (self.epoch is None or batch.epoch == self.epoch):
                self.head_seq = max(self.head_seq, batch.events[-1].seq)
            return self._buffer_batch(batch, now)
        if batch.epoch != self.epoch:
            # Another history: keep the batch for after the snapshot, never apply it here.
            return self._buffer_batch(batch, now) or self._resync(now)
        if batch.events:
            self.head_seq = max(self.head_seq, batch.events[-1].seq)
        return self._apply_live(batch.events, now)

    def skip_batch(self, epoch: str, term: int, last_seq: int, now: float) -> bool:
        """True when a published batch, known only by its header (epoch, term, last seq), can
        be dropped without decoding it: it comes from a deposed primary, or this LIVE replica of
        the same epoch already holds every one of its events (the stream copy of this node's own
        write, applied from the reply; events a repair brought first). The effect is exactly
        what ``on_batch`` of the decoded batch would have: the term is noted, the broker heard
        from, nothing applied. Anything else (False) must be decoded and go to ``on_batch``."""
        if term < self.term:
            self.stale_dropped += 1
            self.skipped += 1
            return True
        state = self.state
        if self.phase is not Phase.LIVE or state is None or last_seq > state.seq \
                or epoch != self.epoch:
            return False
        self.term = term
        self.last_heard = now
        if last_seq > self.head_seq:
            self.head_seq = last_seq
        self.skipped += 1
        return True

    def _apply_live(self, events: list[Event], now: float) -> list[Action]:
        assert self.state is not None
        seq = self.state.seq
        if events and events[-1].seq <= seq:
            return []  # duplicate
        if events and events[0].seq <= seq:
            events = [e for e in events if e.seq > seq]
        try:
            self._apply(events, now)
        except SeqGap:
            overflow = self._buffer_batch(EventBatch(self.namespace, self.epoch or "", events),
                                          now)
            return overflow or self._ask_fetch(now)
        self.head_seq = max(self.head_seq, self.state.seq)
        return []

    def apply_own(self, batch: EventBatch, now: float) -> bool:
        """Apply the events of this node's own acknowledged write, sent along with the reply,
        if they are exactly the next ones of a live replica of the same epoch; True if applied.
        The same batch arriving later on the stream is then dropped as a duplicate."""
        events = batch.events
        if self.phase is not Phase.LIVE or batch.epoch != self.epoch or not events \
                or self.state is None or events[0].seq != self.state.seq + 1 \
                or batch.term < self.term:
            return False
        self.term = batch.term
        self._apply(events, now)
        self.head_seq = max(self.head_seq, self.state.seq)
        return True

    def on_heartbeat(self, hb: Heartbeat, now: float) -> list[Action]:
        if self._old_term(hb.term):
            return []  # a deposed primary's heartbeat says nothing about the group's head
        self.last_heard = now
        if self.phase is Phase.JOINING:
            return []
        if hb.epoch != self.epoch:
            if self.phase is Phase.RESYNCING:
                return []
            return self._resync(now)
        self.head_seq = max(self.head_seq, hb.seq)
        if self.phase is Phase.LIVE and hb.seq > self.seq:
            # Events are published before the heartbeat on the same stream: a heartbeat ahead
            # of us means events were dropped (HWM) -- repair.
            return self._ask_fetch(now)
        return []

    def on_snapshot_chunk(self, chunk: SnapshotReply, now: float) -> list[Action]:
        """One chunk of a snapshot reply (the broker sends big ones in several, in order).

        Chunks of the pending request are collected; the last one installs the whole
        snapshot (``on_snapshot``). A chunk out of order drops the collection (the request is
        asked again after its timeout). The last chunk of any request drops its barrier."""
        actions: list[Action] = []
        if chunk.last and chunk.snap_id in self._barriers:
            actions.append(DropBarrier(self.namespace, self._barriers.pop(chunk.snap_id)))
        if chunk.snap_id != self._pending_id:
            return actions  # stale: another request is pending, or none
        if chunk.chunk == 0 and chunk.last:
            return actions + self.on_snapshot(chunk, now)
        if chunk.chunk == 0:
            self._building = (NamespaceState(chunk.namespace, chunk.max_keys, chunk.seq), 0)
        elif self._building is None or self._building[1] != chunk.chunk:
            self._building = None
            logger.warning("snapshot %d: chunk %d out of order; dropped", chunk.snap_id,
                           chunk.chunk)
            return actions
        fresh, _ = self._building
        # Stored at once: the chunk's rows become the entries, nothing else of it is kept.
        try:
            fresh.add_snapshot_rows(chunk.keys, chunk.rows, now)
        except BadSnapshotRow as exc:
            self._building = None
            logger.warning("snapshot %d: chunk %d dropped: %s", chunk.snap_id, chunk.chunk, exc)
            return actions
        self._building = (fresh, chunk.chunk + 1)
        # A chunk arrived: the request is not lost, do not ask again yet.
        self._pending_since = now
        self.last_heard = now
        if not chunk.last:
            return actions
        self._building = None
        fresh.seal_snapshot()
        return actions + self._install(chunk, fresh, now)

    def on_snapshot(self, reply: SnapshotReply, now: float) -> list[Action]:
        """A whole snapshot (one chunk, or all of them collected): build the state from it
        alone, swap it in, and replay the events buffered meanwhile."""
        if reply.snap_id != self._pending_id or not self._accepts("snapshot"):
            return []  # stale or unasked-for
        try:
            fresh = NamespaceState.from_snapshot(
                reply.namespace, reply.max_keys, reply.seq, reply.keys, reply.rows, now
            )
        except BadSnapshotRow as exc:
            logger.warning("snapshot %d dropped: %s", reply.snap_id, exc)
            return []  # asked again after its timeout
        return self._install(reply, fresh, now)

    def _install(self, reply: SnapshotReply, fresh: NamespaceState, now: float
                 ) -> list[Action]:
        """Swap in ``fresh``, built from the snapshot ``reply`` (its last chunk) alone, and
        replay the events buffered meanwhile."""
        if reply.snap_id != self._pending_id or not self._accepts("snapshot"):
            return []  # stale or unasked-for
        self._pending_id = None
        self.last_heard = now
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        if self.record and self.state is not None:
            self.changes.extend((e, True) for e in diff_events(self.state, fresh))
        self.state = fresh  # swapped in whole, never merged
        self.epoch = reply.epoch
        self.max_keys = reply.max_keys
        self.head_seq = reply.seq
        self.phase = Phase.LIVE
        return self._replay([(b, t) for b, t in buffered if b.epoch == reply.epoch])

    def on_fetch(self, reply: FetchReply, now: float) -> list[Action]:
        if reply.request_id != self._pending_id or not self._accepts("fetch"):
            return []
        self._pending_id = None
        self.last_heard = now
        if not reply.available or reply.epoch != self.epoch:
            return self._resync(now)
        assert self.state is not None
        events = [e for e in reply.events if e.seq > self.state.seq]
        try:
            self._apply(events, now)
        except SeqGap:
            return self._resync(now)
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        self.phase = Phase.LIVE
        if any(b.epoch != self.epoch for b, _ in buffered):
            # A newer history showed up while we repaired: take a snapshot of it.
            self._buffer = [(b, t) for b, t in buffered if b.epoch != self.epoch]
            self._buffered = sum(len(b.events) for b, _ in self._buffer)
            return self._resync(now)
        actions = self._replay(buffered)
        if self.phase is Phase.LIVE and self.head_seq > self.state.seq and not actions:
            actions = self._ask_fetch(now)  # the log gave us less than the head: ask for more
        return actions

    def on_probe(self, epoch: str, seq: int, now: float) -> list[Action]:
        """The broker's answer to a probe: its epoch and the namespace's head seq."""
        if not self._accepts("probe"):
            return []
        self.last_heard = now
        if epoch != self.epoch:
            return self._resync(now)
        self.head_seq = max(self.head_seq, seq)
        if seq > self.seq:
            return self._ask_fetch(now)
        return []

    def reask(self, now: float) -> list[Action]:
        """The shell moved its snapshot/fetch channel to another broker (a new primary): ask
        again now what is pending (with a new id) instead of after ``request_timeout``."""
        if self._pending_id is None:
            return []
        self._pending_since = now - self.request_timeout
        return self.on_tick(now)

    def close(self) -> list[Action]:
        """The namespace is closed: drop every barrier subscription still held."""
        out: list[Action] = [DropBarrier(self.namespace, n) for n in self._barriers.values()]
        self._barriers.clear()
        return out

    def on_tick(self, now: float) -> list[Action]:
        """Re-ask an unanswered snapshot/fetch (new id; the old answer will be dropped);
        probe the broker after a silence; drop the barriers of abandoned snapshot requests."""
        abandoned: list[Action] = [
            DropBarrier(self.namespace, self._barriers.pop(i))
            for i in [i for i in self._barriers if i != self._pending_id]
        ]
        return abandoned + self._on_tick(now)

    def _on_tick(self, now: float) -> list[Action]:
        if self._pending_id is None:
            if self.phase is Phase.LIVE and (
                self.last_heard is None or now - self.last_heard > self.silence_timeout
            ) and now - self._last_probe > self.silence_timeout:
                self._last_probe = now
                return [RequestProbe(self.namespace, self.max_keys)]
            return []
        if now - self._pending_since < self.request_timeout:
            return []
        if self.phase is Phase.REPAIRING:
            return self._ask_fetch(now)
        if self.phase in (Phase.JOINING, Phase.RESYNCING):
            return self._ask_snapshot(now)
        return []
