"""The broker's publisher side: subscriptions on the XPUB (``XPUB_MANUAL``), the subscription
barrier of snapshot requests, and the snapshot pump.

A node subscribes ``<ns>\\0`` for a namespace's events and ``<ns>\\0<nonce>`` as the barrier of
a snapshot request carrying that nonce: the broker starts the snapshot only once both the
request and its barrier arrived (in either order), so every event after the snapshot's seq is
already on the subscriber's stream (docs/protocol.md section 4). A started snapshot is sent one
chunk per loop turn, so writes interleave with big ones.

Why a module of its own: it is the one piece of broker state that spans turns besides the
core's; the loop (broker/server.py) only hands it what arrives and calls ``step`` and
``expire``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import zmq

from broker.access import Access, user_id
from broker.core import BrokerCore, SnapshotJob
from broker.frames import garbage_log
from broker.protocol import TOPIC_END, Error, Reply, Snapshot
from broker.validation import check_namespace

logger = logging.getLogger("sharedmem.broker")

MAX_PENDING_SNAPSHOTS = 10_000
MAX_SEEN_NONCES = 10_000
MAX_PENDING_SNAPSHOTS_PER_PEER = 8
SNAPSHOT_CHUNK = 5000  # entries per snapshot chunk (one chunk per loop turn)
SNAPSHOT_WAIT = 10.0  # seconds a snapshot request may wait for its barrier subscription

SendReply = Callable[[list[bytes], Reply], None]


class Subscriptions:
    """Subscribers per namespace, snapshot requests waiting for their barrier, barriers
    waiting for their request, and the snapshots being sent."""

    def __init__(self, core: BrokerCore, access: Access, send_reply: SendReply) -> None:
        self.core = core
        self.access = access
        self.send_reply = send_reply  # the loop's: held while a turn is being received
        self.xpub: zmq.Socket | None = None  # set once the loop's sockets are open
        self.subscribers: dict[str, int] = {}
        self.pending: OrderedDict[bytes, tuple[list[bytes], Snapshot, float]] = OrderedDict()
        self._seen_nonces: OrderedDict[bytes, str] = OrderedDict()
        self._ready: list[tuple[list[bytes], Snapshot]] = []
        self._jobs: deque[tuple[list[bytes], SnapshotJob]] = deque()

    @property
    def busy(self) -> bool:
        """A snapshot is ready to start or being sent: the loop should not sleep."""
        return bool(self._jobs or self._ready)

    # ------------------------------------------------------------------ the XPUB

    def drain(self) -> None:
        """Handle every subscription message waiting on the XPUB."""
        xpub = self.xpub
        assert xpub is not None
        secured = self.access.security is not None
        while True:
            try:
                if not secured:
                    msg, user = xpub.recv(zmq.NOBLOCK), None
                else:
                    frame = xpub.recv(zmq.NOBLOCK, copy=False)
                    msg, user = frame.bytes, user_id(frame)
            except zmq.Again:
                return
            self._on_subscription(msg, user)

    def _on_subscription(self, msg: bytes, user: str | None = None) -> None:
        if not msg or msg[0] not in (0, 1):
            garbage_log.warning("ignoring %d-byte non-subscription message on the publisher",
                                len(msg))
            return
        subscribe = msg[0] == 1
        topic = msg[1:]
        name_bytes, sep, nonce = topic.partition(TOPIC_END)
        try:
            name = check_namespace(name_bytes.decode())
        except (UnicodeDecodeError, ValueError):
            garbage_log.warning("refusing subscription to %r: not a namespace topic", topic[:80])
            return
        if not sep:
            garbage_log.warning("refusing subscription to %r: topic lacks the NUL terminator",
                                topic[:80])
            return
        if subscribe and not self.access.may_read(user, name):
            # Refusal is silent on this socket; the request channel says AccessDenied.
            logger.warning("refused subscription to %r by %s", name, self.access.who(user))
            return
        if not nonce:
            # Exact namespace topic: accept (XPUB_MANUAL applies it to the peer just read).
            assert self.xpub is not None
            if subscribe:
                self.xpub.setsockopt(zmq.SUBSCRIBE, topic)
                self.subscribers[name] = self.subscribers.get(name, 0) + 1
            else:
                self.xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
                self.subscribers[name] = max(0, self.subscribers.get(name, 0) - 1)
            return
        if not subscribe:
            return  # nonce topics were never applied, nothing to remove
        pending = self.pending.pop(nonce, None)
        if pending is not None:
            envelope, request, _ = pending
            if request.namespace == name:
                self._ready.append((envelope, request))
            return
        self._seen_nonces[nonce] = name
        while len(self._seen_nonces) > MAX_SEEN_NONCES:
            self._seen_nonces.popitem(last=False)

    # ------------------------------------------------------------------ snapshot requests

    def on_snapshot(self, envelope: list[bytes], request: Snapshot, now: float) -> None:
        """A ``Snapshot`` request: ready if its barrier came first, else it waits (bounded)."""
        seen = self._seen_nonces.pop(request.nonce, None)
        if seen is not None and seen == request.namespace:
            # Started after the turn: the state is then what the turn's flush made durable.
            self._ready.append((envelope, request))
            return
        if len(self.pending) >= MAX_PENDING_SNAPSHOTS:
            self.send_reply(envelope, Error("StorageError", "too many pending snapshots"))
            return
        peer = envelope[0]
        if sum(1 for env, _, _ in self.pending.values() if env[0] == peer) \
                >= MAX_PENDING_SNAPSHOTS_PER_PEER:
            self.send_reply(envelope, Error(
                "StorageError", f"more than {MAX_PENDING_SNAPSHOTS_PER_PEER} snapshot requests "
                "of this peer are waiting for their barrier"))
            return
        self.pending[request.nonce] = (envelope, request, now)

    def expire(self, now: float) -> None:
        """Refuse the snapshot requests whose barrier has not come within SNAPSHOT_WAIT."""
        while self.pending:
            nonce, (envelope, request, since) = next(iter(self.pending.items()))
            if now - since < SNAPSHOT_WAIT:
                return
            del self.pending[nonce]
            self.send_reply(envelope, Error(
                "StorageError",
                f"snapshot of {request.namespace!r}: the subscription barrier never arrived",
            ))

    def refuse_all(self, reply: Reply) -> None:
        """Answer every snapshot request waiting, ready or being sent with ``reply`` and drop
        them (their freezes released). A group member that stepped down calls it: its state
        may hold records that were never committed (the turn whose commit failed is not rolled
        back; a standby applies what it acked), so it must not send any of it to a node. The
        nodes re-ask the primary that ``reply`` (``NotPrimary``) names."""
        waiting = [envelope for envelope, _, _ in self.pending.values()]
        waiting += [envelope for envelope, _ in self._ready]
        for envelope, job in self._jobs:
            job.freeze.close()
            waiting.append(envelope)
        self.pending.clear()
        self._ready.clear()
        self._jobs.clear()
        for envelope in waiting:
            self.send_reply(envelope, reply)

    def step(self) -> None:
        """Start the snapshots that became ready (after the turn), then send one chunk of the
        oldest one being sent."""
        if self._ready:
            ready, self._ready = self._ready, []
            for envelope, request in ready:
                job = self.core.snapshot_job(request)
                if isinstance(job, Error):
                    self.send_reply(envelope, job)
                else:
                    self._jobs.append((envelope, job))
        if self._jobs:
            envelope, job = self._jobs.popleft()
            self.send_reply(envelope, job.next_chunk(time.monotonic(), SNAPSHOT_CHUNK))
            if not job.done:
                self._jobs.append((envelope, job))
