"""The broker's decisions, without sockets: a turn's requests in, one ``Turn`` value out.

``run_turn`` is the shell's one entry point for the requests that may change the state: it
runs the expiry that is due, decides each request (``decide`` reads the state and returns a
``Decision``), applies it (``commit``, recording undo information) and returns a ``Turn``
(broker/turn.py): the log records, then the replies and publishes. The shell appends the
records and flushes, and only then sends -- the write order of docs/architecture.md
section 2: decide -> append (durable) -> apply -> reply -> publish -- or, if the flush failed,
calls ``rollback``.
A refused request produces no events and changes nothing.

Exactly-once: each write carries ``(client_id, request_no)``. The last reply per client is kept
(bounded LRU); a repeat of the same request number gets that reply again and is not re-applied.
A node sends one write at a time per client id, so "last reply" is enough.

A turn *in doubt* (its flush failed and its bytes could not be cut away, ``LogInDoubt``) is
rolled back like a refused one, but none of its replies is sent and its writes are marked
``IN_DOUBT``: a retry gets no answer either (it is not decided again) until
``settle_in_doubt`` finds the log cut back (the writes are refused for good), or a restart
replays the records (the rebuilt table answers them as applied). docs/persistence.md.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import msgspec

from broker.errors import (
    InvalidKey,
    InvalidValue,
    KeyNotFound,
    SharedMemoryError,
    StorageError,
    VersionConflict,
)
from broker.freeze import Freeze, FrozenStates
from broker.log import Log, MemoryLog
from broker.pattern import compile_pattern
from broker.protocol import (
    READ_KINDS,
    Delete,
    DeleteMany,
    DeletePattern,
    DigestReply,
    DropNamespace,
    Error,
    Event,
    EventBatch,
    FetchReply,
    HelloReply,
    KeyDeleted,
    KeyExpired,
    KeySet,
    KeyTouched,
    Open,
    OpenReply,
    Read,
    ReadEntry,
    ReadReply,
    Reply,
    Set,
    SetMany,
    SetMaxKeys,
    Snapshot,
    SnapshotReply,
    StatsReply,
    Touch,
    WriteOk,
    WriteRequest,
    published_codec,
)
from broker.records import (
    BatchRecord,
    DedupFile,
    LogRecord,
    NamespaceFile,
    NamespaceRecord,
    SnapshotFile,
)
from broker.state import Entry, NamespaceState, snapshot_row, unpack_entries
from broker.turn import Outgoing, Turn, TurnRequest, merge_publishes
from broker.validation import (
    DEFAULT_MAX_VALUE_BYTES,
    check_encoded_value,
    check_key,
    check_namespace,
    check_ttl_bound,
    check_version,
)

MAX_BATCH_ITEMS = 10_000  # items of one set_many / keys of one delete_many / get_many
# Keys one delete_pattern may remove. One call is one event batch that every subscriber receives
# as one message and every replica applies under its lock, so its size is bounded; a pattern that
# matches more is refused whole (StorageError, nothing deleted): narrow it, or delete in parts.
MAX_PATTERN_DELETE = 100_000
# Entries a compaction's frozen view copies per loop turn: 1-3 ms of the loop's time here.
FREEZE_CHUNK = 10_000

logger = logging.getLogger("sharedmem.broker.core")


def new_epoch() -> str:
    """A random id for this incarnation of the broker's history."""
    return os.urandom(8).hex()


@dataclass(slots=True)
class Decision:
    """What a request does: ``events`` to log and apply to ``namespace``, then ``reply``."""

    reply: Reply
    namespace: str | None = None
    events: list[Event] = field(default_factory=list)
    create_max_keys: int | None = None  # create ``namespace`` with this max_keys first
    client: tuple[bytes, int] | None = None  # (client_id, request_no) to remember the reply for
    duplicate: bool = False
    body: bytes | None = None  # the encoded EventBatch, shared by the reply and the publish
    set_max_keys: int | None = None  # change the namespace's max_keys to this (SetMaxKeys)


class SnapshotJob:
    """A namespace frozen at one seq, handed out in chunks (``next_chunk``) across loop turns.

    The freeze copies nothing up front: each chunk copies its own entries (broker/freeze.py),
    so neither the request nor any chunk stalls the loop for more than one chunk's work."""

    __slots__ = ("snap_id", "namespace", "epoch", "seq", "max_keys", "freeze", "chunk")

    def __init__(self, snap_id: int, epoch: str, freeze: Freeze) -> None:
        self.snap_id = snap_id
        self.namespace = freeze.name
        self.epoch = epoch
        self.seq = freeze.seq
        self.max_keys = freeze.max_keys
        self.freeze = freeze
        self.chunk = 0

    @property
    def done(self) -> bool:
        return self.freeze.done and self.chunk > 0

    def next_chunk(self, now: float, size: int) -> SnapshotReply:
        """The next ``size`` entries, TTLs as seconds remaining at ``now``."""
        keys, part = self.freeze.take(size)
        # The stored entries themselves: only those with a deadline are rewritten (TTL left).
        rows = [snapshot_row(raw, now) for raw in part]
        reply = SnapshotReply(self.snap_id, self.namespace, self.epoch, self.seq,
                              self.max_keys, keys, rows, self.chunk, self.freeze.done)
        self.chunk += 1
        return reply


# What ``DedupTable.lookup`` returns for a write whose turn is in doubt: the shell sends no
# reply to it (compared by identity; never sent).
IN_DOUBT: Reply = Error("StorageError", "the outcome of this write is in doubt")


class DedupTable:
    """Last reply per client id, least recently used evicted beyond ``capacity``; plus the
    writes in doubt (``mark_in_doubt``), which are never evicted: a retry of one that was
    forgotten would be decided as a new write and could be refused while the first one may
    still come back."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._last: OrderedDict[bytes, tuple[int, Reply]] = OrderedDict()
        self._in_doubt: dict[bytes, int] = {}

    def lookup(self, client_id: bytes, request_no: int) -> Reply | None:
        if self._in_doubt and self._in_doubt.get(client_id) == request_no:
            return IN_DOUBT
        item = self._last.get(client_id)
        if item is None:
            return None
        self._last.move_to_end(client_id)
        last_no, reply = item
        if request_no == last_no:
            return reply
        if request_no < last_no:
            return Error(
                "StorageError",
                f"request {request_no} of this client is older than its last ({last_no})",
            )
        return None

    def remember(self, client_id: bytes, request_no: int, reply: Reply) -> None:
        self._last[client_id] = (request_no, reply)
        self._last.move_to_end(client_id)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def items(self) -> Iterator[tuple[bytes, int, Reply]]:
        """Every remembered ``(client_id, request_no, reply)``, least recently used first."""
        for client_id, (no, reply) in self._last.items():
            yield client_id, no, reply

    def entry(self, client_id: bytes) -> tuple[int, Reply] | None:
        """The remembered ``(request_no, reply)`` of a client, without touching its recency."""
        return self._last.get(client_id)

    def restore(self, client_id: bytes, entry: tuple[int, Reply] | None) -> None:
        """Put back what ``entry`` returned before (None: forget the client), for a rollback."""
        if entry is None:
            self._last.pop(client_id, None)
        else:
            self._last[client_id] = entry

    def mark_in_doubt(self, client_id: bytes, request_no: int) -> None:
        """This write's turn is in doubt: until ``settle_in_doubt``, its retries get IN_DOUBT."""
        self._in_doubt[client_id] = request_no

    @property
    def in_doubt(self) -> int:
        """How many writes are in doubt."""
        return len(self._in_doubt)

    def settle_in_doubt(self, reply: Reply) -> int:
        """The bytes of the writes in doubt are gone: remember ``reply`` (a refusal) for each,
        unless its client has since had a newer request answered. Returns how many."""
        n = len(self._in_doubt)
        for client_id, no in self._in_doubt.items():
            entry = self._last.get(client_id)
            if entry is None or entry[0] <= no:
                self.remember(client_id, no, reply)
        self._in_doubt.clear()
        return n

    def rename_epoch(self, epoch: str) -> None:
        """Make every remembered WriteOk name ``epoch``: after recovery starts a new epoch, the
        writes it replayed live in that one."""
        for client_id, (no, reply) in self._last.items():
            if isinstance(reply, WriteOk):
                self._last[client_id] = (no, msgspec.structs.replace(reply, epoch=epoch))


_ROWS_PER_PIECE = 10_000


def _encoded_rows(keys: list[str], entries: list[bytes], mono: float, wall: float
                  ) -> msgspec.Raw:
    """A namespace's ``SnapEntryFile`` rows as one msgpack array, encoded a slice at a time.

    Why: the snapshot thread shares the GIL with the loop, and one encode of a million rows
    holds it for ~200 ms (a C call never yields). Slices of 10 000 rows yield between them,
    and only one slice of row structs lives at a time. The bytes are those of encoding the
    whole list at once: an array header for the count, then each row's encoding. Each stored
    entry is unpacked into its file row here (the file format predates the packed entry)."""
    n = len(keys)
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    parts = [header]
    encode = msgspec.msgpack.encode
    for at in range(0, n, _ROWS_PER_PIECE):
        # (key, value, version, created_at, modified_at, expires_at) tuples: the bytes of
        # the array_like SnapEntryFile rows, without a struct per row
        piece = encode(unpack_entries(keys[at:at + _ROWS_PER_PIECE],
                                      entries[at:at + _ROWS_PER_PIECE], wall - mono))
        count = min(_ROWS_PER_PIECE, n - at)
        parts.append(piece[1 if count < 16 else 3 if count < 1 << 16 else 5:])
    return msgspec.Raw(b"".join(parts))


def _check_ttl(ttl: float | None) -> float | None:
    if ttl is None or ttl == 0:
        return None
    if not math.isfinite(ttl) or ttl < 0:
        raise InvalidValue(f"ttl must be a finite number of seconds >= 0, got {ttl!r}")
    return check_ttl_bound(float(ttl))


class BrokerCore:
    """All namespaces, the log, and the dedup table of one broker incarnation."""

    def __init__(
        self,
        epoch: str | None = None,
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        log: Log | None = None,
    ) -> None:
        self.epoch = epoch or new_epoch()
        # Broker groups: the primary's term, stamped on every batch it encodes (0: single).
        self.term = 0
        self.max_value_bytes = max_value_bytes
        self.namespaces: dict[str, NamespaceState] = {}
        self.log: Log = log if log is not None else MemoryLog()
        self.dedup = DedupTable()
        # Undo records of the current turn: what to put back if the log flush fails.
        self._undo: list[tuple] | None = None
        # Log records not yet handed out: the current turn's, or those of a namespace created
        # between turns (a snapshot of a new one), which the next turn carries first.
        self._records: list[LogRecord] = []
        self._encoder = published_codec()
        # Compactions' frozen views still being copied, oldest first (``advance_freezes``).
        self.frozen: list[FrozenStates] = []
        self.counters: dict[str, int] = {
            "writes": 0,
            "events": 0,
            "duplicates": 0,
            "refused": 0,
            "snapshots": 0,
            "fetches": 0,
            "expired": 0,
        }

    # ------------------------------------------------------------------ writes

    def decide(self, request: WriteRequest, now: float, wall: float) -> Decision:
        """The effect of a write request on the current state; mutates nothing."""
        client = (request.client_id, request.request_no)
        cached = self.dedup.lookup(*client)
        if cached is not None:
            return Decision(cached, duplicate=True, client=client)
        try:
            decision = self._decide(request, now, wall)
        except VersionConflict as exc:
            decision = Decision(Error(exc.kind, str(exc), exc.current_version))
        except SharedMemoryError as exc:
            decision = Decision(Error(exc.kind, str(exc)))
        decision.client = client
        return decision

    def _decide(self, request: WriteRequest, now: float, wall: float) -> Decision:
        ns_name = check_namespace(request.namespace)
        state = self.namespaces.get(ns_name)
        create = None
        if state is None:
            if type(request) is DropNamespace:
                raise KeyNotFound(f"namespace {ns_name!r} does not exist")
            create = request.max_keys
            state = NamespaceState(ns_name, request.max_keys)
        seq = state.seq
        entries = state.entries
        if type(request) is Set:
            ttl = _check_ttl(request.ttl)
            check_key(request.key)
            check_encoded_value(request.key, request.value, self.max_value_bytes)
            old = state.live(request.key, now)
            self._check_version(state, request.key, old, request.if_version)
            if old is None and request.key not in entries:
                self._check_capacity(state, 1)
            created = old.created_at if old is not None else wall
            event: Event = KeySet(seq + 1, request.key, request.value, created, wall, ttl)
            return Decision(WriteOk(self.epoch, seq + 1), ns_name, [event], create)
        if type(request) is SetMany:
            ttl = _check_ttl(request.ttl)
            if not request.items:
                raise InvalidValue("set_many needs at least one item")
            if len(request.items) > MAX_BATCH_ITEMS:
                raise InvalidValue(
                    f"set_many of {len(request.items)} items; the limit is {MAX_BATCH_ITEMS}"
                )
            new_keys: set[str] = set()
            for key, value in request.items:
                check_key(key)
                check_encoded_value(key, value, self.max_value_bytes)
                if key not in entries:
                    new_keys.add(key)
            self._check_capacity(state, len(new_keys))
            events: list[Event] = []
            created_in_batch: dict[str, float] = {}
            for key, value in request.items:
                seq += 1
                old = state.live(key, now)
                created = created_in_batch.setdefault(
                    key, old.created_at if old is not None else wall
                )
                events.append(KeySet(seq, key, value, created, wall, ttl))
            return Decision(WriteOk(self.epoch, seq), ns_name, events, create)
        if type(request) is Delete:
            check_key(request.key)
            self._check_version(state, request.key, state.live(request.key, now),
                                request.if_version)
            if request.key not in entries:
                return Decision(WriteOk(self.epoch, seq, changed=False), ns_name, [], create)
            # A due-but-unexpired key is still deleted (and reported absent, as a reader saw).
            existed = state.is_live(request.key, now)
            event = KeyDeleted(seq + 1, request.key)
            return Decision(WriteOk(self.epoch, seq + 1, changed=existed), ns_name, [event], create)
        if type(request) is Touch:
            ttl = _check_ttl(request.ttl)
            check_key(request.key)
            if not state.is_live(request.key, now):
                raise KeyNotFound(f"key {request.key!r} not found in namespace {ns_name!r}")
            event = KeyTouched(seq + 1, request.key, ttl)
            return Decision(WriteOk(self.epoch, seq + 1), ns_name, [event], create)
        if type(request) is DeleteMany:
            if len(request.keys) > MAX_BATCH_ITEMS:
                raise InvalidValue(
                    f"delete_many of {len(request.keys)} keys; the limit is {MAX_BATCH_ITEMS}")
            for key in request.keys:
                check_key(key)
            # Stored keys, each once, in the order given; a due-but-unexpired key is deleted
            # too (as delete does), and counts as existing only if it is still live.
            doomed = [k for k in dict.fromkeys(request.keys) if k in entries]
            existed = any(state.is_live(k, now) for k in doomed)
            return self._deletes(state, doomed, existed, create)
        if type(request) is DeletePattern:
            p = compile_pattern(request.pattern)
            doomed = p.select(state.candidates(p, now))
            if len(doomed) > MAX_PATTERN_DELETE:
                raise StorageError(
                    f"delete_pattern {request.pattern!r} matches {len(doomed)} keys in namespace "
                    f"{ns_name!r}; one call deletes at most {MAX_PATTERN_DELETE} (nothing was "
                    "deleted: narrow the pattern or delete in parts)")
            return self._deletes(state, doomed, bool(doomed), create)
        if type(request) is DropNamespace:
            doomed = list(state.index)
            existed = any(state.is_live(k, now) for k in doomed)
            return self._deletes(state, doomed, existed, None)
        if type(request) is SetMaxKeys:
            live = len(state.entries)
            if request.max_keys and live > request.max_keys:
                raise StorageError(
                    f"namespace {ns_name!r} holds {live} keys: max_keys={request.max_keys} is "
                    "below that (delete keys first, or choose a larger limit; 0 = unlimited)")
            if create is not None:
                create = request.max_keys
            changed = create is not None or state.max_keys != request.max_keys
            decision = Decision(WriteOk(self.epoch, seq, changed=changed), ns_name, [], create)
            if changed and create is None:
                decision.set_max_keys = request.max_keys
            return decision
        raise InvalidKey(f"not a write request: {type(request).__name__}")  # pragma: no cover

    def _deletes(self, state: NamespaceState, keys: list[str], existed: bool,
                 create: int | None) -> Decision:
        """One batch of KeyDeleted for ``keys`` (all stored): consecutive seqs, one reply."""
        seq = state.seq
        events: list[Event] = [KeyDeleted(seq + i + 1, k) for i, k in enumerate(keys)]
        return Decision(WriteOk(self.epoch, seq + len(events), existed, count=len(events)),
                        state.name, events, create)

    @staticmethod
    def _check_version(state: NamespaceState, key: str, live: Entry | None,
                       expected: int | None) -> None:
        if expected is None:
            return
        check_version(expected)  # a raw peer may send any int64 or uint64
        current = live.version if live is not None else 0
        if current != expected:
            raise VersionConflict(
                f"key {key!r} in namespace {state.name!r} is at version {current}, "
                f"not {expected}", current)

    @staticmethod
    def _check_capacity(state: NamespaceState, new_keys: int) -> None:
        if state.max_keys and len(state.entries) + new_keys > state.max_keys:
            raise StorageError(
                f"namespace {state.name!r} is full: {len(state.entries)} keys, max_keys "
                f"{state.max_keys}, this write adds {new_keys}"
            )

    def commit(self, decision: Decision, now: float) -> None:
        """Apply a decision and remember its reply (within ``run_turn``: undo is recorded)."""
        if decision.duplicate:
            self.counters["duplicates"] += 1
            return
        if decision.namespace is not None and decision.create_max_keys is not None:
            # append_to_log already recorded the namespace (before the batch).
            self._create(decision.namespace, decision.create_max_keys)
        if decision.set_max_keys is not None:
            assert decision.namespace is not None
            state = self.namespaces[decision.namespace]
            if self._undo is not None:
                self._undo.append(("max_keys", state, state.max_keys))
            state.max_keys = decision.set_max_keys
            # Recovery takes a namespace's last NamespaceRecord as its limit.
            self._records.append(NamespaceRecord(state.name, state.max_keys))
        if decision.events:
            assert decision.namespace is not None
            state = self.namespaces[decision.namespace]
            if self._undo is not None:
                self._undo.append(("events", state, state.seq,
                                   [(e.key, state.entries.get(e.key)) for e in decision.events]))
            state.apply_batch(decision.events, now)
            self.counters["events"] += len(decision.events)
            if type(decision.events[0]) is KeyExpired:
                self.counters["expired"] += len(decision.events)
        if decision.client is not None and self._undo is not None:
            self._undo.append(("dedup", decision.client[0],
                               self.dedup.entry(decision.client[0])))
        if type(decision.reply) is Error:
            self.counters["refused"] += 1
        else:
            self.counters["writes"] += 1
        if decision.client is not None:
            self.dedup.remember(*decision.client, decision.reply)

    # ------------------------------------------------------------------ expiry

    def expire_due(self, now: float) -> list[Decision]:
        """One decision per namespace holding keys whose TTL has run out."""
        out = []
        for name, state in self.namespaces.items():
            nd = state.next_deadline()
            if nd is None or nd > now:
                continue
            keys = state.due_expirations(now)
            if keys:
                events: list[Event] = [
                    KeyExpired(state.seq + i + 1, k) for i, k in enumerate(keys)
                ]
                out.append(Decision(WriteOk(self.epoch, state.seq + len(keys)), name, events))
        return out

    def next_deadline(self) -> float | None:
        deadlines = [d for s in self.namespaces.values() if (d := s.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ namespaces and reads

    def _create(self, name: str, max_keys: int) -> NamespaceState:
        """Create ``name`` if missing; ``record=False`` when its NamespaceRecord is already in
        this turn's log records (a write's ``append_to_log``)."""
        state = self.namespaces.get(name)
        if state is None:
            state = self.namespaces[name] = NamespaceState(name, max_keys)
            self._records.append(NamespaceRecord(name, max_keys))
            if self._undo is not None:
                self._undo.append(("create", name))
        return state

    def frozen_view(self, segment: int, mono: float, wall: float) -> Callable[[], SnapshotFile]:
        """Freeze every namespace now (no copy yet: ``advance_freezes`` copies a chunk per
        loop turn, broker/freeze.py) and return a function that, on another thread, waits
        for the copy to complete and builds the snapshot from it."""
        epoch = self.epoch
        view = FrozenStates(list(self.namespaces.values()))
        if not view.ready.is_set():
            self.frozen.append(view)
        dedup = [(cid, no, r.seq, r.changed) for cid, no, r in self.dedup.items()
                 if isinstance(r, WriteOk)]

        def build() -> SnapshotFile:
            view.wait()
            namespaces = []
            for name, max_keys, seq, keys, entries in view.copies:
                rows = _encoded_rows(keys, entries, mono, wall)
                namespaces.append(NamespaceFile(name, max_keys, seq, rows))  # type: ignore[arg-type]
            return SnapshotFile(epoch, segment, wall, namespaces,
                                [DedupFile(*row) for row in dedup])

        return build

    def advance_freezes(self, budget: int = FREEZE_CHUNK) -> bool:
        """Copy up to ``budget`` entries of the oldest open frozen view (the loop calls this
        once per turn while ``frozen`` is not empty); True while some copying is left."""
        while self.frozen:
            if self.frozen[0].step(budget):
                return True
            self.frozen.pop(0)
        return False

    def finish_freezes(self) -> None:
        """Complete every open frozen view at once: the loop is stopping, and a compaction
        thread waiting for its view must not wait forever."""
        for view in self.frozen:
            view.finish()
        self.frozen.clear()

    # ------------------------------------------------------------------ turns (group commit)

    def run_turn(self, requests: Sequence[tuple[object, TurnRequest]], now: float, wall: float,
                 held: Sequence[tuple[object, Reply]] = ()) -> Turn:
        """Decide and apply one loop turn: the expiry due at ``now``, then ``requests`` in order
        (each ``(tag, request)``; the tag comes back with its reply).

        ``held``: replies the shell made during the turn that must still wait for its flush
        (they read state the flush makes durable); they come first in ``Turn.replies`` and are
        refused with the turn if its flush fails (a ``HelloReply``, which reads no state, is
        kept). Returns the ``Turn``; the shell must then call ``commit_turn`` or ``rollback``.
        """
        turn = Turn(now, wall)
        turn.replies = [Outgoing(tag, reply) for tag, reply in held]
        self._undo = turn.undo
        batches: list[tuple[str, list[Event], bytes | None]] = []
        try:
            for decision in self.expire_due(now):
                self._apply(turn, decision, batches)
            for tag, request in requests:
                try:
                    if type(request) is Open:
                        turn.replies.append(Outgoing(tag, self.open(request)))
                        continue
                    decision = self.decide(request, now, wall)
                    self._apply(turn, decision, batches)
                except Exception as exc:  # noqa: BLE001 - one bad request never ends a turn
                    logger.exception("internal error handling %s", type(request).__name__)
                    turn.replies.append(
                        Outgoing(tag, Error("StorageError", f"internal broker error: {exc!r}")))
                    continue
                reply = decision.reply
                if reply is IN_DOUBT:
                    continue  # a retry of a write in doubt: no answer yet (the client retries)
                if decision.duplicate:
                    turn.replies.append(Outgoing(tag, reply, None, decision.client))
                elif decision.events and type(reply) is WriteOk:
                    # The writer's node may apply its own write at once (same events, same
                    # order as the stream): the batch goes along with the reply.
                    turn.replies.append(Outgoing(tag, reply, self._body(decision)))
                else:
                    turn.replies.append(Outgoing(tag, reply))
        finally:
            self._undo = None
        turn.records, self._records = self._records, []
        turn.publishes = merge_publishes(batches, self.epoch, self._encoder.encode, self.term)
        return turn

    def _apply(self, turn: Turn, decision: Decision,
               batches: list[tuple[str, list[Event], bytes | None]]) -> None:
        """Commit one decision of the turn and add its log record and published batch."""
        self.commit(decision, turn.now)
        if decision.events and decision.namespace is not None:
            reply = decision.reply
            changed = reply.changed if isinstance(reply, WriteOk) else True
            cid, no = decision.client if decision.client is not None else (None, 0)
            self._records.append(BatchRecord(decision.namespace, turn.wall, decision.events,
                                             cid, no, changed))
            batches.append((decision.namespace, decision.events,
                            self._body(decision) if type(reply) is WriteOk and cid is not None
                            else None))

    def _body(self, decision: Decision) -> bytes:
        """The decision's events as the EventBatch bytes the stream carries (encoded once)."""
        if decision.body is None:
            assert decision.namespace is not None
            decision.body = self._encoder.encode(
                EventBatch(decision.namespace, self.epoch, decision.events, self.term))
        return decision.body

    def commit_turn(self, turn: Turn) -> None:
        """The turn's log flush succeeded: forget its undo information."""
        turn.undo.clear()
        turn.committed = True

    def rollback(self, turn: Turn, reason: str, *, in_doubt: bool = False) -> None:
        """The turn's log flush failed: put state, namespaces and dedup table back, and turn
        the turn's replies into refusals (``StorageError`` saying ``reason``); nothing is
        published. A resent reply of an earlier, durable write -- still in the dedup table
        once the turn is undone -- stays what it was; a ``HelloReply`` reads no state and stays.

        ``in_doubt`` (``LogInDoubt``: the turn's bytes may still be in the log): the replies
        that would be refusals are dropped instead -- a refusal would be false if a restart
        replays the bytes -- and every write of the turn with a log record is marked in doubt
        in the dedup table, so its retry is not decided again (``settle_in_doubt``).
        """
        doubtful = [(r.client, r.request_no) for r in turn.records
                    if type(r) is BatchRecord and r.client is not None] if in_doubt else []
        for item in reversed(turn.undo):
            if item[0] == "events":
                _, state, old_seq, olds = item
                for key, old in reversed(olds):
                    state.restore(key, old)
                state.seq = old_seq
            elif item[0] == "dedup":
                _, client_id, previous = item
                self.dedup.restore(client_id, previous)
            elif item[0] == "create":
                self.namespaces.pop(item[1], None)
            elif item[0] == "max_keys":
                item[1].max_keys = item[2]
        turn.undo.clear()
        # Namespaces created between turns (and so not undone) still need their record.
        # (A set_max_keys record of the turn names a limit the undo just took back: dropped.)
        self._records[:0] = [r for r in turn.records
                             if type(r) is NamespaceRecord and r.namespace in self.namespaces
                             and self.namespaces[r.namespace].max_keys == r.max_keys]
        refusal = Error("StorageError", reason)
        if in_doubt:
            for client_id, request_no in doubtful:
                self.dedup.mark_in_doubt(client_id, request_no)
            turn.replies = [out for out in turn.replies
                            if type(out.reply) is HelloReply or self._still_durable(out)]
        else:
            turn.replies = [
                out if type(out.reply) is HelloReply or self._still_durable(out)
                else Outgoing(out.tag, refusal)
                for out in turn.replies
            ]
        turn.records = []
        turn.publishes = []

    def settle_in_doubt(self) -> None:
        """Once the log owes no cut any more, the writes in doubt are refused for good: their
        bytes are gone, so their retries get StorageError. The shell calls this after every
        flush and every log tick (cheap when nothing is in doubt)."""
        if not self.dedup.in_doubt or self.log.in_doubt:
            return
        n = self.dedup.settle_in_doubt(Error(
            "StorageError", "write to the log failed and its bytes were cut away afterwards; "
                            "the write was refused and nothing changed"))
        logger.warning("the log was cut back: %d write(s) in doubt are refused for good", n)

    def _still_durable(self, out: Outgoing) -> bool:
        """After a rollback: is this resent reply's original write still in the table (it was
        durable before this turn), rather than one rolled back with the turn?"""
        if out.resent is None:
            return False
        client_id, request_no = out.resent
        entry = self.dedup.entry(client_id)
        return entry is not None and entry[0] == request_no and entry[1] == out.reply

    def open(self, request: Open) -> Reply:
        """Create the namespace if missing. An existing one keeps its ``max_keys`` (settings
        belong to the namespace): with ``adopt`` the reply carries it, without (older nodes)
        a different ``max_keys`` is refused."""
        try:
            name = check_namespace(request.namespace)
        except SharedMemoryError as exc:
            return Error(exc.kind, str(exc))
        state = self.namespaces.get(name)
        if state is None:
            state = self._create(name, request.max_keys)
        elif state.max_keys != request.max_keys and not request.adopt:
            return Error(
                "StorageError",
                f"namespace {name!r} exists with max_keys={state.max_keys}; this node asked "
                f"for max_keys={request.max_keys}",
            )
        return OpenReply(self.epoch, name, state.max_keys, state.seq)

    def snapshot_job(self, request: Snapshot) -> SnapshotJob | Error:
        """Freeze the namespace now for chunks (copied chunk by chunk: broker/freeze.py)."""
        try:
            name = check_namespace(request.namespace)
        except SharedMemoryError as exc:
            return Error(exc.kind, str(exc))
        state = self.namespaces.get(name) or self._create(name, request.max_keys)
        self.counters["snapshots"] += 1
        return SnapshotJob(request.snap_id, self.epoch, Freeze(state))

    def fetch(self, namespace: str, epoch: str, from_seq: int, limit: int, request_id: int,
              now: float) -> FetchReply:
        self.counters["fetches"] += 1
        events = None
        if epoch == self.epoch and 0 < limit:
            events = self.log.read(namespace, from_seq, min(limit, 100_000), now)
        if events is None:
            return FetchReply(request_id, namespace, self.epoch, False)
        return FetchReply(request_id, namespace, self.epoch, True, events)

    def read(self, request: Read, now: float) -> Reply:
        """Answer a Read from the broker's state (what a node without a replica asks for: the
        CLI's one-shot commands). Never creates a namespace; absent or expired keys are left
        out; the reply names the seq the answer reflects."""
        try:
            name = check_namespace(request.namespace)
            if request.kind not in READ_KINDS:
                raise InvalidValue(
                    f"unknown read kind {request.kind!r}; use one of {', '.join(READ_KINDS)}")
            if len(request.keys) > MAX_BATCH_ITEMS:
                raise InvalidValue(
                    f"a read of {len(request.keys)} keys; the limit is {MAX_BATCH_ITEMS}")
            for key in request.keys:
                check_key(key)
            p = compile_pattern(request.pattern) if request.kind == "list" else None
        except SharedMemoryError as exc:
            return Error(exc.kind, str(exc))
        state = self.namespaces.get(name)
        if state is None:
            return ReadReply(self.epoch, name, False)
        entries: list[ReadEntry] = []
        keys: list[str] = []
        if p is not None:
            keys = p.select(state.candidates(p, now))
        elif request.kind != "info":
            with_value = request.kind == "get"
            for key in dict.fromkeys(request.keys):
                e = state.live(key, now)
                if e is not None:
                    entries.append(ReadEntry(
                        key, e.value if with_value else b"", e.version, e.created_at,
                        e.modified_at, None if e.deadline is None else e.deadline - now,
                        e.size))
        return ReadReply(self.epoch, name, True, state.seq, len(state.entries), state.max_keys,
                         entries, keys)

    def digest(self, namespace: str) -> Reply:
        state = self.namespaces.get(namespace)
        if state is None:
            return Error("KeyNotFound", f"namespace {namespace!r} does not exist")
        return DigestReply(self.epoch, namespace, state.seq, state.digest(), len(state.entries))

    def stats(self) -> StatsReply:
        return StatsReply(
            self.epoch,
            {
                name: {"keys": len(s.entries), "seq": s.seq, "max_keys": s.max_keys}
                for name, s in self.namespaces.items()
            },
            dict(self.counters),
        )
