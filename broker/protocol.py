"""The wire protocol: every message is a msgspec Struct in a tagged union, msgpack-encoded.

One module, shared by broker and node. Requests are commands (``Set``, ``Delete``), events are
facts (``KeySet``, ``KeyDeleted``, ``KeyExpired``). Decoding either returns a message of the
expected union or raises ``ProtocolError`` -- never anything else (h11's fuzz invariant).

Compatibility rule: new fields get defaults, so an older peer's messages still decode.

Sockets and frames (see docs/protocol.md):
- requests: node REQ/DEALER -> broker ROUTER, one frame ``Request``, answered by one ``Reply``;
- events: broker XPUB -> node SUB, two frames: topic ``<namespace>\\0`` and one ``Published``.
Values are JSON bytes encoded once by the writer; the broker never decodes them on the hot path.
TTLs travel as *remaining seconds* at the moment of sending, never as wall-clock deadlines, so
clocks of different hosts are never compared.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from broker.errors import ProtocolError

PROTOCOL_VERSION = 1
TOPIC_END = b"\x00"  # no namespace contains NUL, so "ns1\0" never prefixes "ns10\0"

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


def topic_for(namespace: str) -> bytes:
    """The PUB topic of a namespace: its name terminated by NUL."""
    return namespace.encode() + TOPIC_END


# --------------------------------------------------------------------------- events (facts)


class KeySet(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """A key now holds ``value`` (JSON bytes); ``ttl``: seconds left when sent, None = never."""

    seq: int
    key: str
    value: bytes
    created_at: float  # broker wall clock, unix seconds (metadata only)
    modified_at: float
    ttl: float | None = None


class KeyDeleted(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """A key was removed by a ``delete`` request."""

    seq: int
    key: str


class KeyExpired(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """A key was removed by the broker because its TTL ran out."""

    seq: int
    key: str


class KeyTouched(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """A key's TTL was changed without rewriting its value (version and value unchanged)."""

    seq: int
    key: str
    ttl: float | None = None


Event = KeySet | KeyDeleted | KeyExpired | KeyTouched


class EventBatch(msgspec.Struct, tag=True, frozen=True):
    """Events of one namespace with contiguous seqs, applied atomically (one request's effect)."""

    namespace: str
    epoch: str
    events: list[Event]
    term: int = 0  # broker group: the primary's term (0 for a single broker)


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    """Sent per namespace on the event stream so idle nodes notice a dead broker or lost tail."""

    namespace: str
    epoch: str
    seq: int
    term: int = 0  # broker group: the primary's term (0 for a single broker)


Published = EventBatch | Heartbeat


# --------------------------------------------------------------------------- requests (commands)


class Hello(msgspec.Struct, tag=True, frozen=True):
    """First request of a node: the broker answers with everything else the node needs."""

    client_id: bytes
    protocol: int = PROTOCOL_VERSION


class Open(msgspec.Struct, tag=True, frozen=True):
    """Create ``namespace`` with ``max_keys`` if missing; refuse if it exists with another."""

    namespace: str
    max_keys: NonNegInt


class Snapshot(msgspec.Struct, tag=True, frozen=True):
    """Ask for the namespace's full state. Answered only after the broker has seen the
    subscription ``<namespace>\\0<nonce>`` on its XPUB (the subscription barrier), so every
    event after the snapshot's seq reaches the asking SUB. Creates the namespace if missing."""

    namespace: str
    max_keys: NonNegInt
    snap_id: int
    nonce: bytes


class Fetch(msgspec.Struct, tag=True, frozen=True):
    """Ask for the events ``from_seq..`` of a namespace from the broker's log (gap repair)."""

    namespace: str
    epoch: str
    from_seq: int
    snap_id: int
    limit: int = 10000


class Set(msgspec.Struct, tag=True, frozen=True):
    """Store ``value`` (JSON bytes) under ``key``. ``ttl`` seconds; None or 0 = never expires."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    key: str
    value: bytes
    ttl: float | None = None
    if_version: int | None = None  # compare-and-set: 0 = only if absent


class SetMany(msgspec.Struct, tag=True, frozen=True):
    """Store several keys atomically: one event batch, all or nothing."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    items: list[tuple[str, bytes]]
    ttl: float | None = None


class Delete(msgspec.Struct, tag=True, frozen=True):
    """Remove ``key``; the reply says whether it existed."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    key: str
    if_version: int | None = None


class Touch(msgspec.Struct, tag=True, frozen=True):
    """Give ``key`` a new TTL (None or 0 = never) without rewriting its value."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    key: str
    ttl: float | None = None


class Head(msgspec.Struct, tag=True, frozen=True):
    """Ask for a namespace's epoch and head seq (consistent reads wait for it locally)."""

    namespace: str


class Stats(msgspec.Struct, tag=True, frozen=True):
    """Ask for the broker's counters."""


class Digest(msgspec.Struct, tag=True, frozen=True):
    """Ask for the hash of a namespace's state at its current seq (convergence checks)."""

    namespace: str


Request = (
    Hello | Open | Snapshot | Fetch | Set | SetMany | Delete | Touch | Head | Stats | Digest
)
WriteRequest = Set | SetMany | Delete | Touch


# --------------------------------------------------------------------------- replies


class HelloReply(msgspec.Struct, tag=True, frozen=True):
    epoch: str
    pub_endpoints: list[str]
    max_value_bytes: int
    heartbeat_interval: float
    protocol: int = PROTOCOL_VERSION
    # Broker groups (CLUSTER.md section 4): the group's term, the primary's request endpoint
    # ("" when none is known) and every member's request endpoint. A single broker sends 0, ""
    # and [].
    term: int = 0
    primary: str = ""
    members: list[str] = []


class OpenReply(msgspec.Struct, tag=True, frozen=True):
    epoch: str
    namespace: str
    max_keys: int
    seq: int


class SnapEntry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    key: str
    value: bytes
    version: int
    created_at: float
    modified_at: float
    ttl: float | None  # remaining seconds when the snapshot was taken


class SnapshotReply(msgspec.Struct, tag=True, frozen=True):
    """One chunk of a snapshot (the state at ``seq``): chunks ``0..`` in order, the one with
    ``last`` True completes it. The broker sends one chunk per loop turn, so a big snapshot
    never holds up writes."""

    snap_id: int
    namespace: str
    epoch: str
    seq: int
    max_keys: int
    entries: list[SnapEntry]
    chunk: int = 0
    last: bool = True


class FetchReply(msgspec.Struct, tag=True, frozen=True):
    """Events ``from_seq..`` (possibly fewer than asked); ``available`` False: the log no longer
    has them (or the epoch changed), so the node must take a snapshot instead."""

    snap_id: int
    namespace: str
    epoch: str
    available: bool
    events: list[Event] = []


class WriteOk(msgspec.Struct, tag=True, frozen=True):
    """A write was applied: ``seq`` is the namespace's seq of its (last) event."""

    epoch: str
    seq: int
    changed: bool = True
    term: int = 0  # broker group: the term that committed it (0 for a single broker)


class StatsReply(msgspec.Struct, tag=True, frozen=True):
    epoch: str
    namespaces: dict[str, dict[str, int]]
    counters: dict[str, int]


class DigestReply(msgspec.Struct, tag=True, frozen=True):
    epoch: str
    namespace: str
    seq: int
    digest: str
    keys: int


class Error(msgspec.Struct, tag=True, frozen=True):
    """The request was refused (``kind`` names an error class of broker.errors); nothing changed."""

    kind: str
    message: str
    current_version: int | None = None  # VersionConflict: the key's version now (0 = absent)


class NotPrimary(msgspec.Struct, tag=True, frozen=True):
    """A standby of a broker group refused the request: send it to ``primary`` (a request
    endpoint; "" while no primary is known). ``term`` is the highest term the standby knows.
    Nothing changed."""

    term: int
    primary: str


Reply = (
    HelloReply | OpenReply | SnapshotReply | FetchReply | WriteOk | StatsReply | DigestReply
    | Error | NotPrimary
)


# --------------------------------------------------------------------------- codecs


class Codec:
    """One encoder/decoder pair for one union: decode raises only ProtocolError."""

    def __init__(self, union: Any, name: str) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(union)
        self._name = name

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes | memoryview) -> Any:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed {self._name} message: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the invariant: ProtocolError or a message
            raise ProtocolError(f"malformed {self._name} message: {exc!r}") from None


def request_codec() -> Codec:
    return Codec(Request, "request")


def reply_codec() -> Codec:
    return Codec(Reply, "reply")


def published_codec() -> Codec:
    return Codec(Published, "event-stream")
