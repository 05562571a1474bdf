"""The wire protocol: every message is a msgspec Struct in a tagged union, msgpack-encoded.

One module, shared by broker and node. Requests are commands (``Set``, ``Delete``), events are
facts (``KeySet``, ``KeyDeleted``, ``KeyExpired``). Decoding either returns a message of the
expected union or raises ``ProtocolError`` -- never anything else (h11's fuzz invariant).

Compatibility rule: new fields get defaults, so an older peer's messages still decode.

Sockets and frames (see docs/protocol.md):
- requests: node REQ/DEALER -> broker ROUTER, one frame ``Request``, answered by one ``Reply``;
- events: broker XPUB -> node SUB: topic ``<namespace>\\0``, one ``Published``, and for an
  ``EventBatch`` a third frame, its ``batch_header`` (term, epoch, seq range: enough for a
  node to drop a duplicate without decoding the body).
Values are JSON bytes encoded once by the writer; the broker never decodes them on the hot path.
TTLs travel as *remaining seconds* at the moment of sending, never as wall-clock deadlines, so
clocks of different hosts are never compared.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, final

import msgspec

from broker.errors import ProtocolError

if TYPE_CHECKING:  # annotations only: the kernel never loads zmq (tests/core/test_layering.py)
    import zmq
    from typing_extensions import Buffer

# 2: snapshot chunks carry keys and rows in the stored form (SnapshotReply). A broker refuses
# a Hello of another version, so a node and a broker of different versions never talk.
PROTOCOL_VERSION = 2
TOPIC_END = b"\x00"  # no namespace contains NUL, so "ns1\0" never prefixes "ns10\0"

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


def topic_for(namespace: str) -> bytes:
    """The PUB topic of a namespace: its name terminated by NUL."""
    return namespace.encode() + TOPIC_END


# --------------------------------------------------------------------------- events (facts)


@final
class KeySet(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """A key now holds ``value`` (JSON bytes); ``ttl``: seconds left when sent, None = never."""

    seq: int
    key: str
    value: bytes
    created_at: float  # broker wall clock, unix seconds (metadata only)
    modified_at: float
    ttl: float | None = None


@final
class KeyDeleted(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """A key was removed by a ``delete`` request."""

    seq: int
    key: str


@final
class KeyExpired(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """A key was removed by the broker because its TTL ran out."""

    seq: int
    key: str


@final
class KeyTouched(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """A key's TTL was changed without rewriting its value (version and value unchanged)."""

    seq: int
    key: str
    ttl: float | None = None


Event = KeySet | KeyDeleted | KeyExpired | KeyTouched


@final
class EventBatch(msgspec.Struct, tag=True, frozen=True):
    """Events of one namespace with contiguous seqs, applied atomically (one request's effect)."""

    namespace: str
    epoch: str
    events: list[Event]
    term: int = 0  # broker group: the primary's term (0 for a single broker)


@final
class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    """Sent per namespace on the event stream so idle nodes notice a dead broker or lost tail."""

    namespace: str
    epoch: str
    seq: int
    term: int = 0  # broker group: the primary's term (0 for a single broker)


Published = EventBatch | Heartbeat


# A published EventBatch's third frame: version, term, first and last seq (little-endian), then
# the epoch's UTF-8 bytes. Fixed offsets, so a node compares it without any msgpack decode.
BATCH_HEADER = struct.Struct("<BQQQ")
BATCH_HEADER_VERSION = 1


class BatchHeader(NamedTuple):
    """What a batch's header frame says about its body (the same broker wrote both)."""

    term: int
    first_seq: int
    last_seq: int
    epoch: str


def batch_header(epoch: str, term: int, first_seq: int, last_seq: int) -> bytes:
    """The header frame of a published batch of events ``first_seq..last_seq``."""
    return BATCH_HEADER.pack(BATCH_HEADER_VERSION, term, first_seq, last_seq) + epoch.encode()


def read_batch_header(frame: bytes) -> BatchHeader | None:
    """The header in ``frame``, or None when it is not one this version reads (too short,
    another version, seqs out of order, an epoch that is not UTF-8): the receiver then decodes
    the body as if there were no header. Never raises."""
    if len(frame) < BATCH_HEADER.size or frame[0] != BATCH_HEADER_VERSION:
        return None
    _, term, first, last = BATCH_HEADER.unpack_from(frame)
    if not 0 < first <= last:
        return None
    try:
        epoch = frame[BATCH_HEADER.size:].decode()
    except UnicodeDecodeError:
        return None
    return BatchHeader(term, first, last, epoch)


# --------------------------------------------------------------------------- requests (commands)


@final
class Hello(msgspec.Struct, tag=True, frozen=True):
    """First request of a node: the broker answers with everything else the node needs."""

    client_id: bytes
    protocol: int = PROTOCOL_VERSION


@final
class Open(msgspec.Struct, tag=True, frozen=True):
    """Create ``namespace`` with ``max_keys`` if missing. If it exists with another
    ``max_keys``: ``adopt`` = open it with its own limit (the reply says which), else refuse
    (what nodes without the field expect)."""

    namespace: str
    max_keys: NonNegInt
    adopt: bool = False


@final
class Snapshot(msgspec.Struct, tag=True, frozen=True):
    """Ask for the namespace's full state. Answered only after the broker has seen the
    subscription ``<namespace>\\0<nonce>`` on its XPUB (the subscription barrier), so every
    event after the snapshot's seq reaches the asking SUB. Creates the namespace if missing."""

    namespace: str
    max_keys: NonNegInt
    snap_id: int
    nonce: bytes


@final
class Fetch(msgspec.Struct, tag=True, frozen=True):
    """Ask for the events ``from_seq..`` of a namespace from the broker's log (gap repair)."""

    namespace: str
    epoch: str
    from_seq: int
    # Pairs the reply with its request (the node's request id; snapshots share the counter).
    # Called snap_id on the wire, as before issue 13: only the Python name changed.
    request_id: int = msgspec.field(name="snap_id")
    limit: int = 10000


@final
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


@final
class SetMany(msgspec.Struct, tag=True, frozen=True):
    """Store several keys atomically: one event batch, all or nothing."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    items: list[tuple[str, bytes]]
    ttl: float | None = None


@final
class Delete(msgspec.Struct, tag=True, frozen=True):
    """Remove ``key``; the reply says whether it existed."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    key: str
    if_version: int | None = None


@final
class Touch(msgspec.Struct, tag=True, frozen=True):
    """Give ``key`` a new TTL (None or 0 = never) without rewriting its value."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    key: str
    ttl: float | None = None


@final
class DeleteMany(msgspec.Struct, tag=True, frozen=True):
    """Remove several keys atomically: one event batch (a KeyDeleted per key that was stored);
    keys that are absent are skipped. WriteOk.changed: at least one existed."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    keys: list[str]


@final
class DeletePattern(msgspec.Struct, tag=True, frozen=True):
    """Remove every key matching the glob ``pattern`` (list_keys syntax) atomically: one event
    batch. Refused (StorageError, nothing deleted) when more than the broker's bound match."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt
    pattern: str


@final
class DropNamespace(msgspec.Struct, tag=True, frozen=True):
    """Admin: remove every key of the namespace in one event batch. The namespace itself (its
    seq, epoch and max_keys) stays, so connected replicas never see their seq go backwards."""

    client_id: bytes
    request_no: int
    namespace: str


@final
class SetMaxKeys(msgspec.Struct, tag=True, frozen=True):
    """Admin: change the namespace's ``max_keys`` (0 = unlimited); refused (StorageError) when
    the namespace holds more keys than the new limit. Creates the namespace if missing."""

    client_id: bytes
    request_no: int
    namespace: str
    max_keys: NonNegInt


READ_KINDS = ("get", "exists", "metadata", "list", "info")


@final
class Read(msgspec.Struct, tag=True, frozen=True):
    """A read answered from the broker's state (no replica needed; never creates anything).

    ``kind``: ``get`` (entries of ``keys`` with values), ``exists``/``metadata`` (entries of
    ``keys`` without values), ``list`` (the live keys matching ``pattern``), ``info`` (only the
    namespace's seq, key count and max_keys). Absent or expired keys are left out."""

    namespace: str
    kind: str
    keys: list[str] = []
    pattern: str = "*"


@final
class Head(msgspec.Struct, tag=True, frozen=True):
    """Ask for a namespace's epoch and head seq (consistent reads wait for it locally)."""

    namespace: str


@final
class Stats(msgspec.Struct, tag=True, frozen=True):
    """Ask for the broker's counters."""


@final
class Digest(msgspec.Struct, tag=True, frozen=True):
    """Ask for the hash of a namespace's state at its current seq (convergence checks)."""

    namespace: str


Request = (
    Hello | Open | Snapshot | Fetch | Set | SetMany | Delete | Touch | Head | Stats | Digest
    | DeleteMany | DeletePattern | DropNamespace | SetMaxKeys | Read
)
WriteRequest = Set | SetMany | Delete | Touch | DeleteMany | DeletePattern | DropNamespace \
    | SetMaxKeys

# The permission (broker/security.py) a request needs on its namespace when access control is
# on; a type not listed needs "read". (An Open of a namespace that does not exist needs
# "write": it creates it.)
PERMISSION_NEEDED: dict[type, str] = {
    Set: "write", SetMany: "write", Delete: "write", Touch: "write", DeleteMany: "write",
    DeletePattern: "write", DropNamespace: "admin", SetMaxKeys: "admin",
}


# --------------------------------------------------------------------------- replies


@final
class HelloReply(msgspec.Struct, tag=True, frozen=True):
    epoch: str
    pub_endpoints: list[str]
    max_value_bytes: int
    heartbeat_interval: float
    protocol: int = PROTOCOL_VERSION
    # The largest request frame the broker reads (ZMQ_MAXMSGSIZE); a bigger one is dropped
    # unanswered, so the node refuses it before sending. 0 = not stated (an older broker).
    max_message_bytes: int = 0
    # Broker groups (docs/groups.md): the group's term, the primary's request endpoint ("" when
    # none is known) and every member's request endpoint. A single broker sends 0, "" and [].
    term: int = 0
    primary: str = ""
    members: list[str] = []


@final
class OpenReply(msgspec.Struct, tag=True, frozen=True):
    epoch: str
    namespace: str
    max_keys: int
    seq: int


@final
class SnapshotReply(msgspec.Struct, tag=True, frozen=True):
    """One chunk of a snapshot (the state at ``seq``): chunks ``0..`` in order, the one with
    ``last`` True completes it. The broker sends one chunk per loop turn, so a big snapshot
    never holds up writes.

    ``rows[i]`` is the entry of ``keys[i]`` in the stored form of broker/state.py (a packed
    header, then the value's JSON), its expiry slot holding the seconds left when the
    snapshot was taken (0 once due). Two flat lists, so decoding a chunk builds one str and
    one bytes per key and nothing else, and the node stores the bytes as they are."""

    snap_id: int
    namespace: str
    epoch: str
    seq: int
    max_keys: int
    keys: list[str]
    rows: list[bytes]
    chunk: int = 0
    last: bool = True


@final
class FetchReply(msgspec.Struct, tag=True, frozen=True):
    """Events ``from_seq..`` (possibly fewer than asked); ``available`` False: the log no longer
    has them (or the epoch changed), so the node must take a snapshot instead."""

    request_id: int = msgspec.field(name="snap_id")  # the Fetch's; snap_id on the wire
    namespace: str
    epoch: str
    available: bool
    events: list[Event] = []


@final
class WriteOk(msgspec.Struct, tag=True, frozen=True):
    """A write was applied: ``seq`` is the namespace's seq of its (last) event."""

    epoch: str
    seq: int
    changed: bool = True
    term: int = 0  # broker group: the term that committed it (0 for a single broker)
    # Events the write logged (delete_many/delete_pattern/drop report it as keys deleted);
    # 0 = not stated (an older broker, or a resent reply rebuilt from a compacted snapshot).
    count: int = 0


@final
class HeadReply(msgspec.Struct, tag=True, frozen=True):
    """The answer to ``Head``: the broker's epoch and the namespace's head seq (0 for a
    namespace the broker does not know; ``Head`` creates nothing)."""

    epoch: str
    namespace: str
    seq: int


@final
class StatsReply(msgspec.Struct, tag=True, frozen=True):
    epoch: str
    namespaces: dict[str, dict[str, int]]
    counters: dict[str, int]
    # Broker groups (docs/groups.md, docs/operations.md): member name -> {"role": "primary" |
    # "standby" | "unknown", "term", "seq" (its position in the term, -1 unknown), "lag"
    # (records behind the primary, -1 unknown), "sync" (1 if in the sync set)}, as this member
    # sees it (the primary's view is the authoritative one). A single broker sends {}.
    group: dict[str, dict[str, int | str]] = {}


@final
class DigestReply(msgspec.Struct, tag=True, frozen=True):
    epoch: str
    namespace: str
    seq: int
    digest: str
    keys: int


@final
class ReadEntry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One key of a ReadReply: ``value`` is empty unless the kind was ``get``; ``size`` is the
    stored JSON's length; ``ttl`` the seconds left when answered (None = never)."""

    key: str
    value: bytes
    version: int
    created_at: float
    modified_at: float
    ttl: float | None
    size: int


@final
class ReadReply(msgspec.Struct, tag=True, frozen=True):
    """The answer to a Read: the broker's state at ``seq``. ``found`` False: the namespace does
    not exist (nothing else is set)."""

    epoch: str
    namespace: str
    found: bool
    seq: int = 0
    keys_count: int = 0
    max_keys: int = 0
    entries: list[ReadEntry] = []
    keys: list[str] = []


@final
class Error(msgspec.Struct, tag=True, frozen=True):
    """The request was refused (``kind`` names an error class of broker.errors); nothing changed."""

    kind: str
    message: str
    current_version: int | None = None  # VersionConflict: the key's version now (0 = absent)


@final
class NotPrimary(msgspec.Struct, tag=True, frozen=True):
    """A standby of a broker group refused the request: send it to ``primary`` (a request
    endpoint; "" while no primary is known). ``term`` is the highest term the standby knows.
    Nothing changed."""

    term: int
    primary: str


Reply = (
    HelloReply | OpenReply | SnapshotReply | FetchReply | WriteOk | HeadReply | StatsReply
    | DigestReply | ReadReply | Error | NotPrimary
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

    def decode(self, data: Buffer | zmq.Frame) -> Any:
        """Decode ``data``: bytes, a memoryview, or a received ``zmq.Frame`` passed as it is.

        Why a Frame is passed itself and not ``memoryview(frame)`` or ``frame.buffer``: msgspec
        reads it in place through the buffer protocol, and either wrapper costs a memoryview
        per message (measured on the 2-core VM, a 3-event batch: 0.75 us as is, 1.05 us via
        ``memoryview``, 1.22 us via ``.buffer``; docs/benchmarks.md)."""
        try:
            # pyzmq's stub gives Frame no ``__buffer__`` although the Cython class implements
            # the buffer protocol, so mypy cannot see that a Frame is a Buffer.
            return self._decoder.decode(data)  # type: ignore[arg-type]
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
