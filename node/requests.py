"""A request channel to the broker: one REQ socket driven by the Lazy Pirate pattern.

Owns: one socket, one ``client_id`` and its request counter. On a timeout the socket is closed
with LINGER 0 (a REQ cannot send again before it receives), reopened, and the *same bytes* are
resent, so the broker's dedup table answers a repeat instead of applying it twice.

With a broker group the endpoint comes from the node's shared ``SharedRoute`` before every
send: a ``NotPrimary`` reply re-sends at once to the primary it names, a timeout rotates to the
next member (after a jittered pause). Both resend the same bytes, so the same
``(client_id, request_no)`` reaches the new primary, whose dedup table was rebuilt from the
shipped log: exactly-once survives a failover.

Must never: be used by two threads at once (``ChannelPool`` hands each caller its own), or
report a write whose reply never came as refused: that is ``BrokerUnavailable`` with
``outcome_unknown=True`` (a ``NotPrimary`` is a refusal that changed nothing; a timeout is not).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from broker.errors import AccessDenied, BrokerUnavailable, InvalidValue, ProtocolError
from broker.protocol import (
    EventBatch,
    NotPrimary,
    Reply,
    Request,
    WriteOk,
    published_codec,
    reply_codec,
    request_codec,
)
from broker.zmtp import POLLIN, recv_message, send_message
from node.routing import Route, rotation_delay

logger = logging.getLogger("sharedmem.node")

CurveKeys = tuple[bytes, bytes, bytes]  # (our public, our secret, the broker's public), z85

_AUTH_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def apply_curve(sock: zmq.Socket, curve: CurveKeys | None) -> None:
    """Make ``sock`` a CURVE client of the broker (before connect)."""
    if curve is None:
        return
    public, secret, server = curve
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server


class SharedRoute:
    """A ``Route`` shared by the node's request channels and its I/O thread, behind a lock
    (each call is a few dict and list operations, never I/O)."""

    def __init__(self, seeds: Sequence[str]) -> None:
        self._route = Route(seeds)
        self._lock = threading.Lock()

    @property
    def seeds(self) -> tuple[str, ...]:
        return self._route.seeds

    def target(self) -> str:
        with self._lock:
            return self._route.target()

    def view(self) -> tuple[int, str, list[str], int]:
        """(term, primary, members, changes), one consistent reading."""
        with self._lock:
            r = self._route
            return r.term, r.primary, list(r.members), r.changes

    def candidates(self) -> int:
        with self._lock:
            return len(self._route.members)

    def on_hello(self, answered_by: str, term: int, primary: str, members: Sequence[str]
                 ) -> bool:
        with self._lock:
            return self._route.on_hello(answered_by, term, primary, members)

    def on_not_primary(self, asked: str, term: int, primary: str) -> str:
        with self._lock:
            nxt = self._route.on_not_primary(asked, term, primary)
        logger.info("%s is not the primary (term %d); next: %s", asked, term, nxt)
        return nxt

    def on_timeout(self, asked: str) -> str:
        with self._lock:
            return self._route.on_timeout(asked)

    def note_term(self, term: int) -> bool:
        with self._lock:
            return self._route.note_term(term)


class RequestChannel:
    """REQ socket + Lazy Pirate retries. Not thread-safe: one caller at a time.

    ``route``: the node's shared route, or one endpoint (then a route of its own)."""

    def __init__(self, ctx: zmq.Context, route: SharedRoute | str, *,
                 retry_interval: float = 1.0, curve: CurveKeys | None = None,
                 watch_handshake: bool = False) -> None:
        self._ctx = ctx
        self.route = SharedRoute([route]) if isinstance(route, str) else route
        self._curve = curve
        # Watch the handshake (AccessDenied instead of a timeout): always with CURVE keys, and
        # on request for the first contact (a broker may demand CURVE of a client without).
        self._watch_handshake = watch_handshake or curve is not None
        self._monitor: zmq.Socket | None = None
        self.endpoint = self.route.target()  # where the socket is (or will be) connected
        self.client_id = os.urandom(12)
        self.retry_interval = retry_interval
        self._request_no = 0
        self._sock: zmq.Socket | None = None
        self._requests = request_codec()
        self._replies = reply_codec()
        self._published = published_codec()
        self.last_batch: EventBatch | None = None  # events of the last write, if sent along

    def _socket(self) -> zmq.Socket:
        target = self.route.target()
        if self._sock is not None and target != self.endpoint:
            self._reset()  # the route moved on (another channel learned of a new primary)
        if self._sock is None:
            self.endpoint = target
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            apply_curve(s, self._curve)
            if self._watch_handshake and self.endpoint.startswith("tcp://"):
                # A refused key just reconnects forever; the monitor turns it into AccessDenied.
                self._monitor = s.get_monitor_socket(_AUTH_FAILED)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _reset(self) -> None:
        if self._monitor is not None:
            assert self._sock is not None
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _wait(self, sock: zmq.Socket, timeout_ms: int) -> bool:
        """Wait for a reply; raise AccessDenied when the broker refuses our key."""
        if self._monitor is None:
            # zmq_poll directly: Socket.poll builds a Poller (and enum flags) on every call.
            return bool(zmq.zmq_poll([(sock, POLLIN)], timeout_ms))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        if self._monitor in ready:
            from zmq.utils.monitor import recv_monitor_message

            event = recv_monitor_message(self._monitor)
            if event["event"] & _AUTH_FAILED:
                self._reset()
                if self._curve is None:
                    raise AccessDenied(
                        f"broker at {self.endpoint} requires CURVE authentication; give this "
                        "node keys (curve_key_file and broker_key_file)")
                raise AccessDenied(
                    f"broker at {self.endpoint} refused this node's CURVE key "
                    f"(handshake failed: {event['value']})")
        return sock in ready

    def close(self) -> None:
        self._reset()

    def next_request_no(self) -> int:
        self._request_no += 1
        return self._request_no

    def call(self, build: Callable[[bytes, int], Request] | Request, deadline: float,
             *, is_write: bool = False, max_bytes: int = 0) -> Reply:
        """Send one request and return its reply, retrying until ``deadline`` (monotonic).

        ``build(client_id, request_no)`` makes a write request (the number is fixed once, so
        every resend is the same request); a plain Request is sent as is. ``max_bytes``: the
        broker's message limit (0 = unknown); a bigger request raises InvalidValue unsent,
        because the broker would drop it unanswered and the caller would wait for nothing.
        """
        self.last_batch = None
        request = build(self.client_id, self.next_request_no()) if callable(build) else build
        data = self._requests.encode(request)
        if max_bytes and len(data) > max_bytes:
            raise InvalidValue(
                f"{type(request).__name__} request is {len(data)} bytes, over the broker's "
                f"message limit of {max_bytes} bytes; nothing was sent (split it up)")
        attempt = 0
        unanswered = 0  # sends whose reply never came: only these make the outcome unknown
        pause_until = 0.0  # a jittered pause before the next member (rotation_delay)
        while True:
            now = time.monotonic()
            # After refusals only, a resend with too little time left to hear its answer would
            # turn "nothing was applied" into "may or may not": give up with the refusal instead.
            if now >= deadline or (attempt and not unanswered
                                   and deadline - now < self.retry_interval / 2):
                self._reset()
                raise BrokerUnavailable(
                    f"broker at {self.endpoint} did not answer {type(request).__name__} in time"
                    + ("; the write may or may not have been applied (a retry is safe)"
                       if is_write and unanswered else "")
                    + ("" if unanswered or not attempt else
                       "; every member asked answered that it is not the primary (nothing "
                       "was applied)"),
                    outcome_unknown=is_write and unanswered > 0,
                )
            if now < pause_until:
                time.sleep(min(pause_until, deadline) - now)  # jitter before the next member
                continue
            sock = self._socket()
            try:
                send_message(sock, (data,))
            except zmq.Again:
                # Not connected yet and nothing queued: wait a little, bounded by the deadline.
                self._reset()
                time.sleep(min(0.05, max(0.0, deadline - now)))  # poll
                continue
            attempt += 1
            wait = min(self.retry_interval * min(attempt, 4), deadline - now)
            if self._wait(sock, max(1, int(wait * 1000))):
                frames = recv_message(sock, 0)  # the poll said it is there: never blocks
                try:
                    reply = self._replies.decode(frames[0])
                    if type(reply) is NotPrimary:
                        # A standby: nothing changed. Same bytes to the primary it names
                        # (or, mid-election, to the next member after a short pause).
                        asked = self.endpoint
                        nxt = self.route.on_not_primary(asked, reply.term, reply.primary)
                        self._reset()
                        if not reply.primary or nxt == asked:
                            pause_until = time.monotonic() + max(0.01, rotation_delay(
                                2, self.retry_interval, random.random))
                        continue
                    if len(frames) > 1 and type(reply) is WriteOk:
                        batch = self._published.decode(frames[1])
                        if type(batch) is EventBatch:
                            self.last_batch = batch
                    return reply
                except ProtocolError:
                    logger.warning("undecodable reply from %s; retrying", self.endpoint)
            unanswered += 1  # no reply, or one we could not read: the outcome is unknown
            logger.debug("no reply from %s after %.2fs (attempt %d); reopening",
                      self.endpoint, wait, attempt)
            asked = self.endpoint
            self._reset()
            if self.route.on_timeout(asked) != asked:
                pause_until = time.monotonic() + rotation_delay(
                    self.route.candidates(), self.retry_interval, random.random)


class ChannelPool:
    """Hands each calling thread a channel of its own, so writers never share a REQ socket."""

    def __init__(self, factory: Callable[[], RequestChannel]) -> None:
        self._factory = factory
        self.max_request_bytes = 0  # the broker's limit from its Hello reply (0 = unknown)
        self._free: list[RequestChannel] = []
        self._all: list[RequestChannel] = []
        self._lock = threading.Lock()
        self._closed = False

    def call(self, build: Any, deadline: float, *, is_write: bool = False) -> Reply:
        return self.call_with_events(build, deadline, is_write=is_write)[0]

    def call_with_events(self, build: Any, deadline: float, *, is_write: bool = False
                         ) -> tuple[Reply, EventBatch | None]:
        """Like ``call``, plus the events a write reply carried (None if it carried none)."""
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("this node is closed")
            if self._free:
                channel = self._free.pop()
            else:
                channel = self._factory()
                self._all.append(channel)
        try:
            reply = channel.call(build, deadline, is_write=is_write,
                                 max_bytes=self.max_request_bytes)
            return reply, channel.last_batch
        finally:
            with self._lock:
                if self._closed:
                    channel.close()
                else:
                    self._free.append(channel)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for channel in self._free:
                channel.close()
            self._free.clear()
