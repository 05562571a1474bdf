"""What one broker loop turn does, as one value the shell obeys (etcd raft's ``Ready``).

``BrokerCore.run_turn`` decides a turn's requests (and the expiry due at its clock reading) and
returns a ``Turn``. Its fields say what to do, in the order they must be done:

1. ``records``: append to the log (namespace records before the batches that use them), then
   flush -- the turn's group commit;
2. only after the flush returned: send ``replies``, then ``publishes``.

If the flush fails, ``BrokerCore.rollback(turn, reason)`` puts the state back and rewrites the
turn's replies into refusals (a resent reply of an earlier, durable write stays what it was);
if it succeeds, ``BrokerCore.commit_turn(turn)`` forgets the undo information. Either way the
shell then sends what the turn holds (a turn in doubt, ``LogInDoubt``, holds no reply that a
refusal would have replaced: see ``persist``). This module owns the shape of that value and the
per-namespace merge of the turn's batches; it never does I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from broker.errors import StorageError
from broker.log import LogInDoubt
from broker.protocol import (
    Delete,
    DeleteMany,
    DeletePattern,
    DropNamespace,
    Event,
    EventBatch,
    Open,
    Reply,
    Set,
    SetMany,
    SetMaxKeys,
    Touch,
    batch_header,
)
from broker.records import LogRecord

if TYPE_CHECKING:
    from broker.core import BrokerCore
    from broker.log import Log

logger = logging.getLogger("sharedmem.broker")

# The requests a turn decides: those that may change the state or create a namespace.
TurnRequest = (Set | SetMany | Delete | Touch | DeleteMany | DeletePattern | DropNamespace
               | SetMaxKeys | Open)
# The same as a set of types, for the shell's dispatch (``type(request) in TURN_TYPES``).
TURN_TYPES: frozenset[type] = frozenset(TurnRequest.__args__)


class Outgoing(NamedTuple):
    """One reply of a turn: ``tag`` is the shell's (it routes the reply, e.g. the envelope);
    ``events`` is the encoded ``EventBatch`` of a fresh write, sent along so the writer's node
    can apply its own write at once; ``resent`` names ``(client_id, request_no)`` when the reply
    is one remembered from an earlier turn (a retry)."""

    tag: object
    reply: Reply
    events: bytes | None = None
    resent: tuple[bytes, int] | None = None


class Publish(NamedTuple):
    """One message for the event stream: a namespace's encoded ``EventBatch`` and its header
    frame (``broker.protocol.batch_header``), which lets a node drop a duplicate undecoded."""

    namespace: str
    body: bytes
    header: bytes


@dataclass(slots=True)
class Turn:
    """One turn's records to persist, then replies and publishes to send (in that order)."""

    now: float
    wall: float
    records: list[LogRecord] = field(default_factory=list)
    replies: list[Outgoing] = field(default_factory=list)
    publishes: list[Publish] = field(default_factory=list)
    undo: list[tuple] = field(default_factory=list)  # the core's, for ``rollback``
    committed: bool = False


def persist(core: BrokerCore, event_log: Log, turn: Turn) -> bool:
    """Make the turn durable: append its records and flush, then ``commit_turn`` -- or, if
    the flush fails, ``rollback`` (the turn's replies become refusals, nothing is published).
    If the failed turn's bytes could not even be cut away (``LogInDoubt``), its replies are
    withheld instead, and its writes stay in doubt until ``core.settle_in_doubt`` (called here
    after every flush, and by the shell after every log tick) finds the log cut back.
    Returns whether the flush succeeded. Only after this may the shell send what the turn
    holds; every shell (the broker's loop, the simulation) goes through here."""
    try:
        event_log.append_records(turn.records, turn.now)
        event_log.flush()
    except LogInDoubt as exc:
        logger.error("%s", exc)
        core.rollback(turn, str(exc), in_doubt=True)
        return False
    except StorageError as exc:
        logger.error("%s", exc)
        core.rollback(turn, str(exc))
        core.settle_in_doubt()
        return False
    core.commit_turn(turn)
    core.settle_in_doubt()
    return True


def merge_publishes(batches: Sequence[tuple[str, list[Event], bytes | None]], epoch: str,
                    encode: Callable[[EventBatch], bytes],
                    term: int = 0) -> list[Publish]:
    """One published batch per namespace, in order of first appearance.

    ``batches`` are ``(namespace, events, body)`` in log order, ``body`` the batch's encoding if
    already made (it is reused when a namespace had one batch this turn). The turn's events of a
    namespace are contiguous and all durable, and fewer, larger messages cost every subscriber
    less. Every batch has events (a decision without events publishes nothing)."""
    merged: dict[str, list[tuple[list[Event], bytes | None]]] = {}
    for namespace, events, body in batches:
        merged.setdefault(namespace, []).append((events, body))
    out: list[Publish] = []
    for namespace, parts in merged.items():
        if len(parts) == 1:
            events, body = parts[0]
            if body is None:
                body = encode(EventBatch(namespace, epoch, events, term))
        else:
            events = [e for part, _ in parts for e in part]
            body = encode(EventBatch(namespace, epoch, events, term))
        out.append(Publish(namespace, body,
                           batch_header(epoch, term, events[0].seq, events[-1].seq)))
    return out
