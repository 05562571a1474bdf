"""The namespaced key/value state and the one place where events are applied.

Pure: no sockets, no threads, no clock. Callers pass ``now`` (their own monotonic seconds). The
broker's state and every node's replica are instances of ``NamespaceState`` fed by the same
events through ``apply_batch``; that is how they stay equal.

Rules:
- events are applied strictly in seq order; a batch that does not start at ``seq + 1`` raises
  ``SeqGap`` and leaves the state untouched (never guess, never skip);
- expiry is a *view*: a key whose deadline passed is invisible to ``live``/``list_keys`` at once,
  but it stays in ``entries`` until its ``KeyExpired`` event arrives, so the state at seq N is
  exactly the events up to N;
- TTLs arrive as remaining seconds and become deadlines on the caller's clock.

The stored entry (issue 11): ``entries`` maps each key to ONE immutable ``bytes`` object, a
packed header and then the value's JSON, so a key costs its str, one bytes object and its
dict and index slots, and no int, float or struct objects (a 1M-key replica: ~138 B/key of
Python objects beyond key and value, was ~229). Header, little-endian:

    flag: u8   bit 0 (MODIFIED): a modified_at different from created_at follows
               bit 1 (EXPIRES): an expiry follows
    version: u64, created_at: f64
    [expiry: f64]        if EXPIRES: the deadline on this process's monotonic clock
    [modified_at: f64]   if MODIFIED (else modified_at == created_at)
    JSON                 the value, as the writer encoded it

so 17, 25 or 33 bytes (``HEADER_SIZE[flag]``). The expiry always sits at offset 17, so the
expiry check of a read is one byte test and, for the few keys with a TTL, one unpack.
A snapshot row on the wire (``SnapshotReply.rows``) is the same bytes with one difference:
its expiry slot holds the *remaining seconds* when the snapshot was taken (clocks of two
processes never compare); ``snapshot_row`` and ``add_snapshot_rows`` convert, and a row
without a TTL (most of them) is sent and stored as the very same bytes, with no per-entry
object built on either side. ``Entry`` is a decoded view for readers that want the fields;
nothing keeps one.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from sortedcontainers import SortedList

from broker.pattern import Pattern, compile_pattern
from broker.protocol import Event, KeyDeleted, KeyExpired, KeySet, KeyTouched
from broker.ttl import deadline_after, ttl_left

if TYPE_CHECKING:
    from broker.freeze import Freeze

MODIFIED = 1
EXPIRES = 2
_H0 = struct.Struct("<BQd")  # flag 0: version, created_at
_H1 = struct.Struct("<BQdd")  # flag 1: + modified_at; flag 2: + expiry
_H3 = struct.Struct("<BQddd")  # flag 3: + expiry, modified_at
_EXPIRY = struct.Struct("<d")  # at offset 17 when EXPIRES is set
_VERSION = struct.Struct("<Q")  # at offset 1
HEADER_SIZE = (17, 25, 25, 33)  # by flag
_SLICE_MAX = 4096  # entry_json: below, slice the JSON out; above, decode through a memoryview
_json_decode = msgspec.json.decode


def pack_entry(value: bytes | memoryview, version: int, created_at: float,
               modified_at: float, expiry: float | None) -> bytes:
    """The stored form of an entry (``expiry``: a deadline; in a snapshot row, a TTL)."""
    if expiry is None:
        if modified_at == created_at:
            return _H0.pack(0, version, created_at) + value
        return _H1.pack(MODIFIED, version, created_at, modified_at) + value
    if modified_at == created_at:
        return _H1.pack(EXPIRES, version, created_at, expiry) + value
    return _H3.pack(EXPIRES | MODIFIED, version, created_at, expiry, modified_at) + value


class Entry(msgspec.Struct, frozen=True, gc=False):
    """A stored entry decoded (``decode_entry``), for readers that need its fields.
    ``deadline`` is on the owner's monotonic clock (None = never); in a decoded snapshot row
    it is the TTL the row carries. ``value`` copies the JSON out of ``raw``; ``json()``
    decodes it without that copy."""

    version: int
    created_at: float
    modified_at: float
    deadline: float | None
    raw: bytes
    offset: int

    @property
    def value(self) -> bytes:
        return self.raw[self.offset:]

    @property
    def size(self) -> int:
        """The JSON's length."""
        return len(self.raw) - self.offset

    def json(self) -> Any:
        return _json_decode(memoryview(self.raw)[self.offset:])


def decode_entry(raw: bytes) -> Entry:
    """The fields of a stored entry (or of a snapshot row)."""
    flag = raw[0]
    if flag == 0:
        _, v, c = _H0.unpack_from(raw)
        return Entry(v, c, c, None, raw, 17)
    if flag == MODIFIED:
        _, v, c, m = _H1.unpack_from(raw)
        return Entry(v, c, m, None, raw, 25)
    if flag == EXPIRES:
        _, v, c, d = _H1.unpack_from(raw)
        return Entry(v, c, c, d, raw, 25)
    _, v, c, d, m = _H3.unpack_from(raw)
    return Entry(v, c, m, d, raw, 33)


def unpack_entries(keys: Sequence[str], raws: Sequence[bytes], shift: float
                   ) -> list[tuple[str, bytes, int, float, float, float | None]]:
    """``(key, value, version, created_at, modified_at, deadline + shift)`` per entry (None:
    no deadline), for writing entries out field by field (a compaction's snapshot file).
    ``decode_entry`` inlined, with tuples instead of structs: this runs once per key of every
    namespace on the snapshot thread, and every row it costs is GIL time taken from the loop."""
    h0, h1, h3 = _H0.unpack_from, _H1.unpack_from, _H3.unpack_from
    out: list[tuple[str, bytes, int, float, float, float | None]] = []
    add = out.append
    for key, raw in zip(keys, raws, strict=True):
        flag = raw[0]
        if flag == 0:
            _, v, c = h0(raw)
            add((key, raw[17:], v, c, c, None))
        elif flag == MODIFIED:
            _, v, c, m = h1(raw)
            add((key, raw[25:], v, c, m, None))
        elif flag == EXPIRES:
            _, v, c, d = h1(raw)
            add((key, raw[25:], v, c, c, d + shift))
        else:
            _, v, c, d, m = h3(raw)
            add((key, raw[33:], v, c, m, d + shift))
    return out


def entry_version(raw: bytes) -> int:
    return _VERSION.unpack_from(raw, 1)[0]


def entry_deadline(raw: bytes) -> float | None:
    """The deadline of a stored entry (None: never expires)."""
    return _EXPIRY.unpack_from(raw, 17)[0] if raw[0] & EXPIRES else None


def entry_is_live(raw: bytes, now: float) -> bool:
    """False once the entry's deadline has passed (it is then invisible to reads)."""
    return not raw[0] & EXPIRES or _EXPIRY.unpack_from(raw, 17)[0] > now


def entry_json(raw: bytes) -> Any:
    """The value of a stored entry, decoded from its bytes (a fresh object). Up to
    ``_SLICE_MAX`` bytes the JSON is sliced out first, past it decoded through a memoryview:
    a memoryview costs ~70 ns more to make than a small slice, and saves a copy of a big one."""
    offset = HEADER_SIZE[raw[0]]
    if len(raw) <= _SLICE_MAX:
        return _json_decode(raw[offset:])
    return _json_decode(memoryview(raw)[offset:])


def live_value(raw: bytes | None, clock: Callable[[], float], missing: Any) -> Any:
    """The decoded value of a stored entry, or ``missing`` if ``raw`` is None or its deadline
    has passed at ``clock()`` (read only for an entry with a TTL). ``get``'s whole path after
    the lookup, in one call: it runs outside any lock (the bytes are immutable)."""
    if raw is None:
        return missing
    flag = raw[0]
    if flag & EXPIRES and _EXPIRY.unpack_from(raw, 17)[0] <= clock():
        return missing
    if len(raw) <= _SLICE_MAX:
        return _json_decode(raw[HEADER_SIZE[flag]:])
    return _json_decode(memoryview(raw)[HEADER_SIZE[flag]:])


def entry_size(raw: bytes) -> int:
    """The length of the entry's JSON."""
    return len(raw) - HEADER_SIZE[raw[0]]


def _with_expiry(raw: bytes, expiry: float) -> bytes:
    """``raw`` (EXPIRES set) with another number in its expiry slot."""
    view = memoryview(raw)
    return b"".join((view[:17], _EXPIRY.pack(expiry), view[25:]))


def snapshot_row(raw: bytes, now: float) -> bytes:
    """A stored entry as a snapshot row: the same object unless it has a deadline, which the
    row carries as the seconds left at ``now`` (0 once due, never negative)."""
    if not raw[0] & EXPIRES:
        return raw
    ttl = ttl_left(_EXPIRY.unpack_from(raw, 17)[0], now)
    assert ttl is not None
    return _with_expiry(raw, ttl)


class SeqGap(Exception):
    """Raised when a batch does not continue the state's seq: the replica must repair first."""

    def __init__(self, namespace: str, expected: int, got: int) -> None:
        super().__init__(f"namespace {namespace!r}: expected seq {expected}, got {got}")
        self.expected = expected
        self.got = got


class BadSnapshotRow(ValueError):
    """A snapshot's rows are not in the stored form (a corrupt or foreign reply)."""


class NamespaceState:
    """Entries of one namespace, their ordered key index and TTL deadlines, at ``seq``."""

    __slots__ = ("name", "max_keys", "seq", "entries", "index", "_deadlines", "freezes")

    def __init__(self, name: str, max_keys: int = 0, seq: int = 0) -> None:
        self.name = name
        self.max_keys = max_keys
        self.seq = seq
        self.entries: dict[str, bytes] = {}  # key -> stored entry (module docstring)
        self.index: SortedList = SortedList()
        # Heap of (deadline, key, version); stale items are skipped lazily.
        self._deadlines: list[tuple[float, str, int]] = []
        # Open frozen views (broker/freeze.py): each is told before a key changes, so it can
        # keep that key's entry as of its freeze (copy-on-write). Empty on nodes.
        self.freezes: list[Freeze] = []

    # ------------------------------------------------------------------ applying events

    def apply_batch(self, events: Sequence[Event], now: float) -> None:
        """Apply events that must start at ``seq + 1`` and be contiguous; all or nothing."""
        expected = self.seq + 1
        for i, event in enumerate(events):
            if event.seq != expected + i:
                raise SeqGap(self.name, expected + i, event.seq)
        for event in events:
            self._apply(event, now)

    def _apply(self, event: Event, now: float) -> None:
        entries = self.entries
        if self.freezes:
            for freeze in self.freezes:
                freeze.note(event.key)
        if type(event) is KeySet:
            deadline = deadline_after(event.ttl, now)
            if event.key not in entries:
                self.index.add(event.key)
            entries[event.key] = pack_entry(event.value, event.seq, event.created_at,
                                            event.modified_at, deadline)
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, event.key, event.seq))
        elif type(event) is KeyTouched:
            old = entries.get(event.key)
            if old is not None:
                deadline = deadline_after(event.ttl, now)
                e = decode_entry(old)
                entries[event.key] = pack_entry(memoryview(old)[e.offset:], e.version,
                                                e.created_at, e.modified_at, deadline)
                if deadline is not None:
                    heapq.heappush(self._deadlines, (deadline, event.key, e.version))
        elif type(event) is KeyDeleted or type(event) is KeyExpired:
            # Tolerant of an absent key: a snapshot may omit nothing, but a replica built from
            # a snapshot taken between expiry and its event must still accept the event.
            if entries.pop(event.key, None) is not None:
                self.index.remove(event.key)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"not an event: {event!r}")
        self.seq = event.seq

    def restore(self, key: str, old: bytes | None) -> None:
        """Put back ``key`` as it was before a rolled-back event (``old`` None: absent)."""
        entries = self.entries
        for freeze in self.freezes:
            freeze.note(key)
        if old is None:
            if entries.pop(key, None) is not None:
                self.index.remove(key)
            return
        if key not in entries:
            self.index.add(key)
        entries[key] = old
        deadline = entry_deadline(old)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, key, entry_version(old)))

    # ------------------------------------------------------------------ reading

    def entry(self, key: str) -> Entry | None:
        """The entry for ``key`` decoded, expired or not (None: absent)."""
        raw = self.entries.get(key)
        return None if raw is None else decode_entry(raw)

    def live(self, key: str, now: float) -> Entry | None:
        """The entry for ``key`` decoded, unless absent or past its deadline."""
        raw = self.entries.get(key)
        return decode_entry(raw) if raw is not None and entry_is_live(raw, now) else None

    def is_live(self, key: str, now: float) -> bool:
        """``live(key, now) is not None``, without decoding the entry."""
        raw = self.entries.get(key)
        return raw is not None and entry_is_live(raw, now)

    def live_count(self, now: float) -> int:
        return sum(1 for _ in self._live_keys(self.index, now))

    def _live_keys(self, keys: Iterable[str], now: float) -> Iterator[str]:
        entries = self.entries
        for key in keys:
            raw = entries[key]
            if not raw[0] & EXPIRES or _EXPIRY.unpack_from(raw, 17)[0] > now:
                yield key

    def list_keys(self, pattern: str, now: float) -> list[str]:
        """Sorted live keys matching the glob; a literal prefix is a range scan of the index."""
        p = compile_pattern(pattern)
        return p.select(self.candidates(p, now))

    def candidates(self, p: Pattern, now: float) -> list[str]:
        """Sorted live keys that start with ``p.prefix``: every key ``p`` can match.

        This is the part of ``list_keys`` that reads the state; it costs one ordered range
        scan and never runs the matcher, so a caller holding a lock over the state takes
        candidates under it and runs ``p.select`` after releasing it."""
        if p.exact:
            return [p.prefix] if self.is_live(p.prefix, now) else []
        if p.prefix:
            candidates: Iterable[str] = self.index.irange(minimum=p.prefix)
        else:
            candidates = self.index
        out: list[str] = []
        entries = self.entries
        prefix = p.prefix
        unpack = _EXPIRY.unpack_from
        for key in candidates:
            if not key.startswith(prefix):
                break
            raw = entries[key]
            if not raw[0] & EXPIRES or unpack(raw, 17)[0] > now:
                out.append(key)
        return out

    # ------------------------------------------------------------------ expiry (broker side)

    def due_expirations(self, now: float) -> list[str]:
        """Keys whose deadline has passed and that still hold the version that set it.

        Only stale heap items are dropped; due ones stay until their KeyExpired event removes
        the entry, so a decision that is never committed is offered again next time."""
        due: list[tuple[float, str, int]] = []
        heap = self._deadlines
        entries = self.entries
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            deadline, key, version = item
            raw = entries.get(key)
            if raw is not None and entry_version(raw) == version \
                    and entry_deadline(raw) == deadline:
                due.append(item)
        for item in due:
            heapq.heappush(heap, item)
        return [key for _, key, _ in due]

    def next_deadline(self) -> float | None:
        """Earliest pending deadline (possibly stale; harmless: the timer just finds nothing)."""
        return self._deadlines[0][0] if self._deadlines else None

    # ------------------------------------------------------------------ snapshots

    def snapshot_rows(self, now: float) -> tuple[list[str], list[bytes]]:
        """All keys in order and their snapshot rows (``snapshot_row``: TTLs as seconds left,
        0 for due-but-unexpired keys)."""
        keys = list(self.index)
        entries = self.entries
        return keys, [snapshot_row(entries[k], now) for k in keys]

    @classmethod
    def from_snapshot(cls, name: str, max_keys: int, seq: int, keys: Sequence[str],
                      rows: Sequence[bytes], now: float) -> NamespaceState:
        """A fresh state equal to the snapshot (never merged into an old one)."""
        state = cls(name, max_keys, seq)
        state.add_snapshot_rows(keys, rows, now)
        state.seal_snapshot()
        return state

    def add_snapshot_rows(self, keys: Sequence[str], rows: Sequence[bytes], now: float
                          ) -> None:
        """Part of building a fresh state from a snapshot's chunks (``from_snapshot`` does it
        all at once): store ``rows`` (TTLs counted from ``now``) under ``keys``. The caller
        then calls ``seal_snapshot`` once; until then the key index and deadline heap are
        incomplete, so the state must not be read. A row without a TTL is stored as the very
        object given (the wire's bytes), so a chunk's decoded reply leaves nothing behind but
        what is kept. BadSnapshotRow (some rows stored: drop this state) if a row is not in
        the stored form."""
        if len(keys) != len(rows):
            raise BadSnapshotRow(f"{len(keys)} keys but {len(rows)} rows")
        table = self.entries
        heap = self._deadlines
        for key, row in zip(keys, rows, strict=True):
            if len(row) < 17:
                raise BadSnapshotRow(f"row of key {key!r}: {len(row)} bytes")
            flag = row[0]
            if flag:
                if flag > 3 or len(row) < HEADER_SIZE[flag]:
                    raise BadSnapshotRow(f"row of key {key!r}: flag {flag}, {len(row)} bytes")
                if flag & EXPIRES:
                    deadline = now + _EXPIRY.unpack_from(row, 17)[0]
                    row = _with_expiry(row, deadline)
                    heap.append((deadline, key, entry_version(row)))
            table[key] = row

    def seal_snapshot(self) -> None:
        """Finish a state built by ``add_snapshot_rows``: the key index and the heap."""
        heapq.heapify(self._deadlines)
        self.index = SortedList(self.entries)

    def digest(self) -> str:
        """Hash of (key, version, value) over all entries in key order; equal states, equal digests.

        Deadlines are left out: they are on different hosts' clocks.
        """
        h = hashlib.sha256()
        h.update(f"{self.name}\0{self.seq}\0".encode())
        entries = self.entries
        for key in self.index:
            raw = entries[key]
            offset = HEADER_SIZE[raw[0]]
            h.update(key.encode())
            h.update(b"\0%d\0%d\0" % (entry_version(raw), len(raw) - offset))
            h.update(memoryview(raw)[offset:])
        return h.hexdigest()
