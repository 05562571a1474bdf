"""The ordered event log of every namespace (in memory; the durable variant builds on this API).

Owns: the events each namespace has had, in seq order, so that a node that missed some can be
given exactly those (gap repair) instead of a full snapshot. Retention is bounded per namespace;
a request older than what is retained is answered "not available" and the node takes a snapshot.

Must never: hold state (that is ``NamespaceState``'s job) or reorder events.
TTLs are kept as deadlines on the broker's monotonic clock and handed out as remaining seconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

from broker.errors import StorageError
from broker.protocol import Event, KeySet, KeyTouched
from broker.records import LogRecord, NamespaceRecord, SnapshotFile
from broker.ttl import deadline_after, ttl_left

if TYPE_CHECKING:
    from broker.core import BrokerCore
    from broker.recovery import RecoveryReport


class LogInDoubt(StorageError):
    """A turn's flush failed *and* its bytes could not be cut away afterwards: they may still
    be in the log file, so a restart may replay them. Such a turn must be neither acknowledged
    nor refused: ``persist`` withholds its replies and the dedup table marks its writes in
    doubt, until the log has cut the bytes away (``Log.in_doubt`` turns False: the writes are
    refused for good) or a restart has replayed them (the rebuilt table answers them as
    applied, which is then true). docs/persistence.md, "A turn in doubt"."""

    kind = "StorageError"


class Log(Protocol):
    """What the broker shell and core need of a log; ``MemoryLog`` and ``DurableLog`` are both
    one, so no caller asks which kind it has (the hooks that only mean something on disk are
    no-ops in memory)."""

    @property
    def compacting(self) -> bool: ...

    @property
    def in_doubt(self) -> bool:
        """True while the bytes of a failed turn may be in the log (``LogInDoubt``)."""
        ...

    def append_records(self, records: Sequence[LogRecord], now: float) -> None: ...

    def replay(self, namespace: str, events: Sequence[Event], now: float) -> None: ...

    def flush(self) -> None: ...

    def tick(self) -> None: ...

    def close(self) -> None: ...

    def recover(self, core: BrokerCore) -> RecoveryReport | None: ...

    def open_for_writing(self) -> None: ...

    def shut_down(self, *, clean: bool) -> None: ...

    def stats(self) -> dict[str, int]: ...

    @property
    def segment(self) -> int: ...

    def wants_compaction(self) -> bool: ...

    def start_compaction(self, build: Callable[[], SnapshotFile]) -> bool:
        """Start a snapshot and rotate; False when the rotation failed (retried later)."""
        ...

    def finish_compaction(self) -> None: ...

    def first_seq(self, namespace: str) -> int | None: ...

    def read(self, namespace: str, from_seq: int, limit: int,
             now: float) -> list[Event] | None: ...


class MemoryLog:
    """Last ``retention`` events per namespace, each with its absolute TTL deadline."""

    def __init__(self, retention: int = 100_000) -> None:
        self.retention = retention
        self._events: dict[str, deque[tuple[Event, float | None]]] = {}

    def record_namespace(self, namespace: str, max_keys: int) -> None:
        """A namespace was created (nothing to keep in memory: the state has it)."""

    def append_records(self, records: Sequence[LogRecord], now: float) -> None:
        """Append a turn's records (``Turn.records``) decided at ``now``, in order."""
        for rec in records:
            if type(rec) is NamespaceRecord:
                self.record_namespace(rec.namespace, rec.max_keys)
            else:
                client = None if rec.client is None else (rec.client, rec.request_no)
                self.append(rec.namespace, rec.events, now, wall=rec.wall, client=client,
                            changed=rec.changed)

    def append(self, namespace: str, events: Sequence[Event], now: float, *, wall: float = 0.0,
               client: tuple[bytes, int] | None = None, changed: bool = True) -> None:
        """Record events decided at ``now`` (their ``ttl`` counts from ``now``).

        ``wall``, ``client`` and ``changed`` matter only to a durable log."""
        MemoryLog.replay(self, namespace, events, now)

    def replay(self, namespace: str, events: Sequence[Event], now: float) -> None:
        """Keep events for ``read`` (Fetch) without writing them anywhere: recovery re-reads
        them from the files, which already hold them."""
        q = self._events.get(namespace)
        if q is None:
            q = self._events[namespace] = deque(maxlen=self.retention)
        for ev in events:
            ttl = ev.ttl if isinstance(ev, (KeySet, KeyTouched)) else None
            deadline = deadline_after(ttl, now)
            q.append((ev, deadline))

    def flush(self) -> None:
        """Make appended events durable (nothing to do in memory)."""

    def drop_newest(self, namespace: str, count: int) -> None:
        """Forget the ``count`` newest events of ``namespace`` (a durable log's failed turn:
        they were appended for Fetch but never became durable)."""
        q = self._events.get(namespace)
        for _ in range(min(count, len(q) if q else 0)):
            assert q is not None
            q.pop()

    def clear(self) -> None:
        """Forget every retained event (a group standby installing a primary's state)."""
        self._events.clear()

    def recover(self, core: BrokerCore) -> RecoveryReport | None:
        """Fill ``core`` from what the log holds at start-up, writing nothing yet (memory holds
        nothing: None)."""
        return None

    def open_for_writing(self) -> None:
        """After the sockets are bound: the writes start-up owes the log (none in memory)."""

    def shut_down(self, *, clean: bool) -> None:
        """Close the log at the broker's stop; ``clean``: everything was flushed, so the next
        start may say so. Never raises (memory has nothing to close)."""

    def stats(self) -> dict[str, int]:
        """The log's own counters for ``Stats`` (fsyncs, compactions; none in memory)."""
        return {}

    def tick(self) -> None:
        """Periodic housekeeping (background fsync of a durable log)."""

    def close(self) -> None:
        """Release files (none in memory)."""

    # Read-only properties, not class attributes: DurableLog overrides them with properties
    # of its own state, and a property may not override a writable attribute. Read once or
    # twice per loop iteration, never per message.
    @property
    def compacting(self) -> bool:
        return False

    @property
    def in_doubt(self) -> bool:
        """Always False: memory writes nothing that could come back."""
        return False

    @property
    def segment(self) -> int:
        return 0

    def wants_compaction(self) -> bool:
        """Memory is not compacted (retention bounds it)."""
        return False

    def start_compaction(self, build: Callable[[], SnapshotFile]) -> bool:
        """Never called: ``wants_compaction`` is always False in memory."""
        raise RuntimeError("a memory log is never compacted")

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
                ev = msgspec.structs.replace(ev, ttl=ttl_left(deadline, now))
            out.append(ev)
        return out
