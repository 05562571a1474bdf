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
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import msgspec
from sortedcontainers import SortedList

from broker.pattern import Pattern, compile_pattern
from broker.protocol import Event, KeyDeleted, KeyExpired, KeySet, KeyTouched, SnapEntry
from broker.ttl import deadline_after, ttl_left

if TYPE_CHECKING:
    from broker.freeze import Freeze


class SeqGap(Exception):
    """Raised when a batch does not continue the state's seq: the replica must repair first."""

    def __init__(self, namespace: str, expected: int, got: int) -> None:
        super().__init__(f"namespace {namespace!r}: expected seq {expected}, got {got}")
        self.expected = expected
        self.got = got


class Entry(msgspec.Struct, gc=False):
    """One stored value. ``deadline`` is on the owner's monotonic clock (None = never)."""

    value: bytes
    version: int
    created_at: float
    modified_at: float
    deadline: float | None


class NamespaceState:
    """Entries of one namespace, their ordered key index and TTL deadlines, at ``seq``."""

    __slots__ = ("name", "max_keys", "seq", "entries", "index", "_deadlines", "freezes")

    def __init__(self, name: str, max_keys: int = 0, seq: int = 0) -> None:
        self.name = name
        self.max_keys = max_keys
        self.seq = seq
        self.entries: dict[str, Entry] = {}
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
            c, m = event.created_at, event.modified_at
            # one float object when equal (a key written once): 24 bytes less per key
            entries[event.key] = Entry(event.value, event.seq, c, c if m == c else m, deadline)
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, event.key, event.seq))
        elif type(event) is KeyTouched:
            old = entries.get(event.key)
            if old is not None:
                deadline = deadline_after(event.ttl, now)
                entries[event.key] = Entry(old.value, old.version, old.created_at,
                                           old.modified_at, deadline)
                if deadline is not None:
                    heapq.heappush(self._deadlines, (deadline, event.key, old.version))
        elif type(event) is KeyDeleted or type(event) is KeyExpired:
            # Tolerant of an absent key: a snapshot may omit nothing, but a replica built from
            # a snapshot taken between expiry and its event must still accept the event.
            if entries.pop(event.key, None) is not None:
                self.index.remove(event.key)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"not an event: {event!r}")
        self.seq = event.seq

    def restore(self, key: str, old: Entry | None) -> None:
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
        if old.deadline is not None:
            heapq.heappush(self._deadlines, (old.deadline, key, old.version))

    # ------------------------------------------------------------------ reading

    def live(self, key: str, now: float) -> Entry | None:
        """The entry for ``key`` unless absent or past its deadline."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.deadline is not None and entry.deadline <= now:
            return None
        return entry

    def live_count(self, now: float) -> int:
        return sum(1 for _ in self._live_keys(self.index, now))

    def _live_keys(self, keys: Iterable[str], now: float) -> Iterator[str]:
        entries = self.entries
        for key in keys:
            d = entries[key].deadline
            if d is None or d > now:
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
            return [p.prefix] if self.live(p.prefix, now) is not None else []
        if p.prefix:
            candidates: Iterable[str] = self.index.irange(minimum=p.prefix)
        else:
            candidates = self.index
        out: list[str] = []
        entries = self.entries
        prefix = p.prefix
        for key in candidates:
            if not key.startswith(prefix):
                break
            d = entries[key].deadline
            if d is None or d > now:
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
            entry = entries.get(key)
            if entry is not None and entry.version == version and entry.deadline == deadline:
                due.append(item)
        for item in due:
            heapq.heappush(heap, item)
        return [key for _, key, _ in due]

    def next_deadline(self) -> float | None:
        """Earliest pending deadline (possibly stale; harmless: the timer just finds nothing)."""
        return self._deadlines[0][0] if self._deadlines else None

    # ------------------------------------------------------------------ snapshots

    def snapshot_entries(self, now: float) -> list[SnapEntry]:
        """All entries in key order, TTLs as remaining seconds (0 for due-but-unexpired keys)."""
        entries = self.entries
        out = []
        for key in self.index:
            e = entries[key]
            ttl = ttl_left(e.deadline, now)
            out.append(SnapEntry(key, e.value, e.version, e.created_at, e.modified_at, ttl))
        return out

    @classmethod
    def from_snapshot(
        cls, name: str, max_keys: int, seq: int, entries: Iterable[SnapEntry], now: float
    ) -> NamespaceState:
        """A fresh state equal to the snapshot (never merged into an old one)."""
        state = cls(name, max_keys, seq)
        state.add_snapshot_entries(entries, now)
        state.seal_snapshot()
        return state

    def add_snapshot_entries(self, entries: Iterable[SnapEntry], now: float) -> None:
        """Part of building a fresh state from a snapshot's chunks (``from_snapshot`` does it
        all at once): store ``entries``, TTLs counted from ``now``. The caller then calls
        ``seal_snapshot`` once; until then the key index and deadline heap are incomplete,
        so the state must not be read. Storing each chunk as it arrives lets its decoded
        structs be freed at once instead of all living until the last chunk."""
        table = self.entries
        heap = self._deadlines
        for s in entries:
            deadline = deadline_after(s.ttl, now)
            c, m = s.created_at, s.modified_at
            table[s.key] = Entry(s.value, s.version, c, c if m == c else m, deadline)
            if deadline is not None:
                heap.append((deadline, s.key, s.version))

    def seal_snapshot(self) -> None:
        """Finish a state built by ``add_snapshot_entries``: the key index and the heap."""
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
            e = entries[key]
            h.update(key.encode())
            h.update(b"\0%d\0%d\0" % (e.version, len(e.value)))
            h.update(e.value)
        return h.hexdigest()
