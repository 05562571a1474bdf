"""The replication link of a broker group: wire structs and their codec (docs/groups.md).

Used only between members of one group: a standby's DEALER talks to the primary's ROUTER
(port + 2 of the request endpoint, or ``--repl-bind``). Nodes never see these messages.

- ``Follow`` (standby -> primary): "I follow the primary of ``term``; send me your state".
- ``Install`` (primary -> standby): the primary's whole state in chunks (an encoded
  ``InstallImage``); v1 installs in full on every (re)join, which also replaces any
  unacknowledged tail of a former primary.
- ``Append`` (primary -> standby): one turn's records, ``first_lsn`` the lsn of the first one.
  An ``Append`` without records is the link's heartbeat: the standby acks its position.
- ``Ack`` (standby -> primary): everything up to ``lsn`` is appended, fsynced and applied
  (one Ack may cover several Appends that the standby made durable with one fsync).
- ``Refuse`` (standby -> primary): the standby knows a higher term; the sender steps down.

The lsn counts the records the primary has appended in its term, continuous from the Install
(``Install.lsn`` = the records the installed state already holds).

Decoding either returns one of these messages or raises ``ProtocolError``: never anything else.
"""

from __future__ import annotations

from typing import Any, final

import msgspec

from broker.errors import ProtocolError
from broker.protocol import Event
from broker.records import LogRecord, SnapshotFile

INSTALL_CHUNK_BYTES = 1024 * 1024  # bytes of an encoded InstallImage per Install message


@final
class Follow(msgspec.Struct, tag=True, frozen=True):
    """A standby asks the primary of ``term`` to install it and ship it every turn."""

    member: str
    term: int
    epoch: str = ""  # the standby's epoch (informational: the Install decides)


@final
class Install(msgspec.Struct, tag=True, frozen=True):
    """Chunk ``chunk`` (from 0) of the encoded ``InstallImage`` of the state at ``lsn``;
    ``last`` completes it."""

    term: int
    lsn: int
    chunk: int
    last: bool
    data: bytes


@final
class Append(msgspec.Struct, tag=True, frozen=True):
    """Records ``first_lsn .. first_lsn + len(records) - 1`` of the primary of ``term``."""

    term: int
    first_lsn: int
    records: list[LogRecord]


@final
class Ack(msgspec.Struct, tag=True, frozen=True):
    """``member`` has made everything up to ``lsn`` of ``term`` durable and applied it."""

    member: str
    term: int
    lsn: int


@final
class Refuse(msgspec.Struct, tag=True, frozen=True):
    """The receiver knows ``term`` (higher than the sender's): the sender must step down.
    ``primary`` names the member the receiver believes leads (``""`` unknown)."""

    term: int
    primary: str = ""


ReplMessage = Follow | Install | Append | Ack | Refuse


class RetainedLog(msgspec.Struct, array_like=True):
    """The events of one namespace the primary still keeps for Fetch (TTLs as remaining
    seconds at the image's creation), so a promoted standby can repair nodes' gaps."""

    namespace: str
    events: list[Event]


class InstallImage(msgspec.Struct):
    """What an Install transfers: the state as a snapshot file (with the dedup table), and the
    retained event log for Fetch."""

    snapshot: SnapshotFile
    retained: list[RetainedLog] = []


class ReplCodec:
    """Encoder/decoder of the replication link: decode raises only ``ProtocolError``."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ReplMessage)
        self._image = msgspec.msgpack.Decoder(InstallImage)

    def encode(self, message: ReplMessage) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes | memoryview) -> Any:
        return self._decode(self._decoder, data, "replication")

    def encode_image(self, image: InstallImage) -> bytes:
        return self._encoder.encode(image)

    def decode_image(self, data: bytes | memoryview) -> InstallImage:
        return self._decode(self._image, data, "install image")

    @staticmethod
    def _decode(decoder: msgspec.msgpack.Decoder, data: bytes | memoryview, name: str) -> Any:
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed {name} message: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the invariant: ProtocolError or a message
            raise ProtocolError(f"malformed {name} message: {exc!r}") from None


def chunks(data: bytes, size: int = INSTALL_CHUNK_BYTES) -> list[bytes]:
    """``data`` cut into pieces of at most ``size`` bytes (at least one, maybe empty)."""
    if size <= 0:
        raise ValueError(f"chunk size must be > 0, got {size}")
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]
