"""The ordered event log of every namespace (in memory; the durable variant builds on this API).

Owns: the events each namespace has had, in seq order, so that a node that missed some can be
given exactly those (gap repair) instead of a full snapshot. Retention is bounded per namespace;
a request older than what is retained is answered "not available" and the node takes a snapshot.

Must never: hold state (that is ``NamespaceState``'s job) or reorder events.
TTLs are kept as deadlines on the broker's monotonic clock and handed out as remaining seconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import msgspec

from broker.protocol import Event, KeySet, KeyTouched


class MemoryLog:
    """Last ``retention`` events per namespace, each with its absolute TTL deadline."""

    def __init__(self, retention: int = 100_000) -> None:
        self.retention = retention
        self._events: dict[str, deque[tuple[Event, float | None]]] = {}

    def record_namespace(self, namespace: str, max_keys: int) -> None:
        """A namespace was created (nothing to keep in memory: the state has it)."""

    def append(self, namespace: str, events: Sequence[Event], now: float, *, wall: float = 0.0,
               client: tuple[bytes, int] | None = None, changed: bool = True) -> None:
        """Record events decided at ``now`` (their ``ttl`` counts from ``now``).

        ``wall``, ``client`` and ``changed`` matter only to a durable log."""
        q = self._events.get(namespace)
        if q is None:
            q = self._events[namespace] = deque(maxlen=self.retention)
        for ev in events:
            t = type(ev)
            ttl = ev.ttl if t is KeySet or t is KeyTouched else None
            deadline = None if ttl is None else now + ttl
            q.append((ev, deadline))

    def flush(self) -> None:
        """Make appended events durable (nothing to do in memory)."""

    def discard_turn(self) -> None:
        """Forget what was appended since the last flush (nothing is ever pending here)."""

    def tick(self) -> None:
        """Periodic housekeeping (background fsync of a durable log)."""

    def close(self) -> None:
        """Release files (none in memory)."""

    compacting = False

    def wants_compaction(self) -> bool:
        """Memory is not compacted (retention bounds it)."""
        return False

    def finish_compaction(self) -> None:
        """Nothing to finish in memory."""

    def first_seq(self, namespace: str) -> int | None:
        q = self._events.get(namespace)
        return q[0][0].seq if q else None

    def read(self, namespace: str, from_seq: int, limit: int, now: float) -> list[Event] | None:
        """Events with seq >= from_seq (at most ``limit``), TTLs re-stamped as remaining at
        ``now``; None when the log no longer holds ``from_seq``."""
        q = self._events.get(namespace)
        if not q:
            return None
        first = q[0][0].seq
        last = q[-1][0].seq
        if from_seq < first:
            return None
        if from_seq > last:
            return []
        start = from_seq - first
        out: list[Event] = []
        for i in range(start, min(len(q), start + limit)):
            ev, deadline = q[i]
            if deadline is not None:
                ev = msgspec.structs.replace(ev, ttl=max(0.0, deadline - now))
            out.append(ev)
        return out
