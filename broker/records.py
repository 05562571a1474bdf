"""The on-disk record and snapshot structs of the durable log (format: docs/persistence.md).

Owns the shapes only: what a log record and a snapshot file hold. Must never do I/O, so that
the core (which builds records and snapshot views) and the durable log (which writes and reads
them) share one definition without the core importing file or thread machinery.
"""

from __future__ import annotations

from typing import final

import msgspec

from broker.protocol import Event


@final
class NamespaceRecord(msgspec.Struct, tag="N", array_like=True):
    """A namespace was created with ``max_keys``."""

    namespace: str
    max_keys: int


@final
class BatchRecord(msgspec.Struct, tag="B", array_like=True):
    """Events applied to a namespace at broker wall time ``wall`` (KeySet.ttl counts from it);
    ``client``/``request_no``/``changed`` rebuild the dedup table's reply after a restart."""

    namespace: str
    wall: float
    events: list[Event]
    client: bytes | None = None
    request_no: int = 0
    changed: bool = True


LogRecord = NamespaceRecord | BatchRecord


@final
class SnapEntryFile(msgspec.Struct, array_like=True):
    key: str
    value: bytes
    version: int
    created_at: float
    modified_at: float
    expires_at: float | None  # broker wall clock, absolute


@final
class NamespaceFile(msgspec.Struct, array_like=True):
    name: str
    max_keys: int
    seq: int
    entries: list[SnapEntryFile]


@final
class DedupFile(msgspec.Struct, array_like=True):
    client: bytes
    request_no: int
    seq: int
    changed: bool


@final
class SnapshotFile(msgspec.Struct):
    epoch: str
    segment: int  # replay segments >= this one on top of the snapshot
    wall: float
    namespaces: list[NamespaceFile]
    dedup: list[DedupFile]


@final
class NamespaceOutline(msgspec.Struct, array_like=True):
    """A ``NamespaceFile`` with its rows left undecoded: decoding into ``Raw`` still walks
    their msgpack framing (count and lengths), without building a million structs."""

    name: str
    max_keys: int
    seq: int
    entries: msgspec.Raw


@final
class SnapshotOutline(msgspec.Struct):
    """A ``SnapshotFile`` as compaction's read-back checks it (``verify_snapshot``)."""

    epoch: str
    segment: int
    wall: float
    namespaces: list[NamespaceOutline]
    dedup: list[DedupFile]
