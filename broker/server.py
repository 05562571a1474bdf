"""The broker's socket loop: one thread, one ``zmq.Poller``, no decisions of its own.

Sockets: a ROUTER (requests, frames ``[identity, ..., b"", body]``) on every ``bind``
endpoint; an XPUB (events, ``XPUB_MANUAL``: broker/subscriptions.py); an inproc PAIR for
``stop()`` from another thread. Each pass: subscriptions, then a turn -- the core turns the
writes (and the expiry due) into one ``Turn`` (broker/turn.py), which is appended and flushed
once (group commit) before its replies and publishes are sent -- then snapshots, housekeeping
and timers (heartbeats). Garbage on any socket is logged and, where a reply is owed,
answered with an ``Error``; it never ends the loop. Config and bind policy:
broker/config.py; access rules: broker/access.py; building, start-up and stop:
broker/lifecycle.py.
"""

from __future__ import annotations

import logging
import time

import msgspec
import zmq

from broker.access import user_id
from broker.config import BrokerConfig, default_pub_endpoint
from broker.core import BrokerCore
from broker.errors import ProtocolError
from broker.frames import garbage_log, split_envelope
from broker.lifecycle import BrokerLifecycle
from broker.protocol import (
    PROTOCOL_VERSION,
    Digest,
    Error,
    Fetch,
    Head,
    HeadReply,
    Heartbeat,
    Hello,
    HelloReply,
    Open,
    Read,
    Reply,
    Snapshot,
    Stats,
    StatsReply,
    WriteOk,
    WriteRequest,
    published_codec,
    reply_codec,
    request_codec,
    topic_for,
)
from broker.turn import TURN_TYPES, persist
from broker.zmtp import readable, recv_message, send_message

__all__ = ["Broker", "BrokerConfig", "default_pub_endpoint"]  # re-exported: the old home

logger = logging.getLogger("sharedmem.broker")

MAX_REQUESTS_PER_TURN = 512


class Broker(BrokerLifecycle):
    """A broker running its loop on a thread of its own (``start``) or the caller's (``run``);
    building, start-up, sockets and stop: broker/lifecycle.py."""

    def __init__(self, config: BrokerConfig | None = None, *, context: zmq.Context | None = None,
                 core: BrokerCore | None = None) -> None:
        super().__init__(config, context=context, core=core)
        self._requests, self._replies = request_codec(), reply_codec()
        self._published = published_codec()
        self._rate_mark = (self.started_at, 0)
        self._events_per_s = 0
        self.drop_write_replies = 0  # fault injection (tests): drop the next N write replies
        # The turn being received: its writes (for the core), and the replies made meanwhile,
        # which wait for the turn's log flush.
        self._in_turn = False
        self._writes: list[tuple[object, WriteRequest | Open]] = []
        self._held: list[tuple[object, Reply]] = []

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poller = zmq.Poller()
        for s in (self.router, self.xpub, self.ctl):
            poller.register(s, zmq.POLLIN)
        hb_interval = self.config.heartbeat_interval
        next_heartbeat = time.monotonic()
        event_log, subs = self.core.log, self.subscriptions
        group = self.group
        if group is not None:
            group.register(poller)
        while True:
            now = time.monotonic()
            # A group standby expires nothing itself: the primary's records do it.
            nd = self.core.next_deadline() if group is None or group.is_primary else None
            wake = next_heartbeat if nd is None else min(next_heartbeat, nd)
            timeout_ms = max(0, int((wake - now) * 1000) + 1)
            if event_log.compacting:
                timeout_ms = min(timeout_ms, 50)
            if subs.busy or self.core.frozen:
                timeout_ms = 0
            if group is not None:
                timeout_ms = min(timeout_ms, group.timeout_ms())
            ready = dict(poller.poll(min(timeout_ms, 1000)))
            if self.ctl in ready or (group is not None and group.stop_requested):
                return
            if group is not None:
                group.on_poll(ready, time.monotonic())
            if self.xpub in ready:
                subs.drain()
            now = time.monotonic()
            if self.router in ready or (nd is not None and nd <= now):
                self._turn(drain=self.router in ready)
                if group is not None and group.stop_requested:
                    return
            if group is None or group.is_primary:
                subs.step()
            elif subs.busy or subs.pending:
                # Stepped down: nothing of this state may reach a node (it can hold records
                # that were never committed); the nodes re-ask the new primary.
                subs.refuse_all(group.not_primary())
            if self.core.frozen:
                self.core.advance_freezes()  # a compaction's view: one chunk per turn
            event_log.tick()  # retries an owed cut (a turn in doubt), then everysec fsyncs
            self.core.settle_in_doubt()
            if event_log.compacting:
                event_log.finish_compaction()
            elif event_log.wants_compaction():
                event_log.start_compaction(self.core.frozen_view(
                    event_log.segment + 1, time.monotonic(), time.time()))
            now = time.monotonic()
            if now >= next_heartbeat:
                if self.metrics is not None:
                    self.metrics.update(self.stats())
                self._send_heartbeats()
                subs.expire(now)
                next_heartbeat = now + hb_interval

    def _turn(self, *, drain: bool) -> None:
        """One turn: receive up to MAX_REQUESTS_PER_TURN requests; the core decides the writes
        (and the expiry due) into one ``Turn``; append its records and flush once (group
        commit); then send its replies and publishes -- refusals, and nothing published, if
        the flush failed and the core rolled the turn back."""
        self._in_turn = True
        try:
            if drain:
                router, secured = self.router, self.access.security is not None
                for i in range(MAX_REQUESTS_PER_TURN):
                    # The poll reported the first request; after it, an EVENTS read is
                    # cheaper than ending every turn with a zmq.Again (broker/zmtp.py).
                    if i and not readable(router):
                        break
                    try:
                        raw = recv_message(router)
                    except zmq.Again:
                        break
                    self._on_request([f.bytes for f in raw],
                                     user_id(raw[-1]) if secured else None)
        finally:
            self._in_turn = False
            writes, held = self._writes, self._held
            self._writes, self._held = [], []
        group = self.group
        if group is not None and not group.is_primary:
            for envelope, reply in held:  # a standby: NotPrimary, Hello, Stats; no writes
                self._send_reply(envelope, reply)  # type: ignore[arg-type]
            return
        turn = self.core.run_turn(writes, time.monotonic(), time.time(), held)
        if group is None:
            persist(self.core, self.core.log, turn)  # durable, or rolled back
        elif not group.commit(turn):  # shipped, durable here and acked by the sync set?
            return  # the term ended (or the broker stops): nothing of the turn is answered
        for out in turn.replies:
            self._send_reply(out.tag, out.reply, out.events)  # type: ignore[arg-type]
        xpub = self.xpub
        for namespace, body, header in turn.publishes:
            # [topic, body, header]: the header lets a node drop a duplicate undecoded
            # (docs/protocol.md section 2). An XPUB never blocks: a full subscriber is dropped.
            send_message(xpub, (topic_for(namespace), body, header))

    def _send_heartbeats(self) -> None:
        term = 0
        if self.group is not None:
            if not self.group.fresh(time.monotonic()):
                return  # a standby, or a primary without recent sync acks: staleness shows
            term = self.group.g.term
        for name, state in self.core.namespaces.items():
            body = self._published.encode(Heartbeat(name, self.epoch, state.seq, term))
            send_message(self.xpub, (topic_for(name), body))

    # ------------------------------------------------------------------ requests

    def _on_request(self, frames: list[bytes], user: str | None = None) -> None:
        split = split_envelope(frames)
        if split is None:
            return  # no envelope to reply to (logged)
        envelope, bodies = split
        if bodies != 1:
            self._send_reply(envelope, Error("ProtocolError",
                                             f"one body frame expected, got {bodies}"))
            return
        try:
            request = self._requests.decode(frames[-1])
        except ProtocolError as exc:
            garbage_log.warning("bad request: %s", exc)
            self._send_reply(envelope, Error(exc.kind, str(exc)))
            return
        now = time.monotonic()
        denial = self.access.check(request, user, self.core.namespaces)
        if denial is not None:
            self._send_reply(envelope, denial)
            return
        if self.group is not None:
            refusal = self.group.refusal(request)  # a standby: NotPrimary
            if refusal is not None:
                self._send_reply(envelope, refusal)
                return
        try:
            t = type(request)
            if t in TURN_TYPES:
                self._writes.append((envelope, request))  # decided by the core's run_turn
            elif t is Read:  # the state as of the last turn (its replies waited for the flush)
                self._send_reply(envelope, self.core.read(request, now))
            elif t is Hello and request.protocol != PROTOCOL_VERSION:  # refuse, clearly
                self._send_reply(envelope, Error("ProtocolError", (
                    f"this broker speaks protocol version {PROTOCOL_VERSION}, the node sent "
                    f"{request.protocol}: run the same sharedmem version on both sides")))
            elif t is Hello:
                cfg = self.config
                self._send_reply(envelope, HelloReply(
                    self.epoch, self.pub_endpoints, cfg.max_value_bytes, cfg.heartbeat_interval,
                    max_message_bytes=cfg.max_message_bytes,
                    **(self.group.hello_fields() if self.group is not None else {})))
            elif t is Snapshot:
                self.subscriptions.on_snapshot(envelope, request, now)
            elif t is Fetch:
                self._send_reply(envelope, self.core.fetch(
                    request.namespace, request.epoch, request.from_seq, request.limit,
                    request.request_id, now))
            elif t is Head:
                st = self.core.namespaces.get(request.namespace)
                self._send_reply(envelope, HeadReply(self.epoch, request.namespace,
                                                     st.seq if st else 0))
            elif t is Stats:
                self._send_reply(envelope, self.access.filter_stats(self.stats(), user))
            elif t is Digest:
                self._send_reply(envelope, self.core.digest(request.namespace))
        except Exception as exc:  # noqa: BLE001 - never let one request end the broker
            logger.exception("internal error handling %s", type(request).__name__)
            self._send_reply(envelope, Error("StorageError", f"internal broker error: {exc!r}"))

    def stats(self) -> StatsReply:
        """The core's counters plus the shell's: subscribers, fsyncs, compactions, rates."""
        base = self.core.stats()
        now = time.monotonic()
        counters = dict(base.counters)
        counters["subscribers"] = sum(self.subscriptions.subscribers.values())
        counters["uptime_ms"] = int((now - self.started_at) * 1000)
        counters["pending_snapshots"] = len(self.subscriptions.pending)
        counters.update(self.core.log.stats())
        if self.group is not None:
            counters.update(self.group.stats())
        # events per second over the window since the previous Stats call (at least 1 s)
        events = counters["events"]
        t0, e0 = self._rate_mark
        if now - t0 >= 1.0:
            self._events_per_s = int((events - e0) / (now - t0))
            self._rate_mark = (now, events)
        counters["events_per_s"] = self._events_per_s
        members = self.group.member_table(now) if self.group is not None else {}
        return StatsReply(base.epoch, base.namespaces, counters, members)

    def _send_reply(self, envelope: list[bytes], reply: Reply, extra: bytes | None = None
                    ) -> None:
        if self._in_turn:  # held back until the turn's log flush succeeded
            self._held.append((envelope, reply))
            return
        if self.group is not None and type(reply) is WriteOk:
            reply = msgspec.structs.replace(reply, term=self.group.g.term)
        if self.drop_write_replies > 0 and type(reply) is WriteOk:
            self.drop_write_replies -= 1
            logger.info("fault injection: dropping a write reply")
            return
        frames = [*envelope, self._replies.encode(reply)]
        if extra is not None:
            frames.append(extra)
        try:
            send_message(self.router, frames)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (peer not reading)
            logger.info("reply to a vanished or full peer dropped: %s", exc)
