"""A node: the local replicas of the namespaces a process opened, fed by one I/O thread.

Owns: per broker address, one SUB socket (events) and one DEALER socket (snapshots and log
fetches), both used only by the node's I/O thread; a pool of REQ channels for writes, used by
the calling threads; and the ``Replica`` of every open namespace. The I/O thread applies events
under ``lock`` and signals ``changed``; readers take ``lock`` briefly, so a read reflects
exactly the events up to some seq (a batch is never half-visible).

With a broker group (a seed list, docs/groups.md) the node's ``SharedRoute`` says where
requests go; the SUB is connected to every member's event endpoint (only the primary
publishes), and the DEALER follows the route's target: it is reconnected when the primary
changes, and the pending snapshot/fetch is asked again there at once. When the primary is
unknown (a higher term seen on the stream, or the stream went silent), the I/O thread asks the
members in turn with ``Hello`` until one names the primary.

Must never: apply a write before the broker has ordered it (read-your-writes: the write's own
events from its reply when the replica is exactly at their predecessor, else waiting for the
reply's seq on the stream), or block the I/O thread on a user request. The snapshot protocol
(ids, barrier nonces, chunk assembly) is ``Replica``'s; this module carries out its actions.
"""

from __future__ import annotations

import logging
import os
import socket as pysocket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import urlsplit

import zmq

from broker.errors import BrokerUnavailable, ProtocolError
from broker.protocol import (
    TOPIC_END,
    Error,
    EventBatch,
    Fetch,
    FetchReply,
    HeadReply,
    Heartbeat,
    Hello,
    HelloReply,
    NotPrimary,
    Open,
    OpenReply,
    Request,
    Snapshot,
    SnapshotReply,
    WriteOk,
    published_codec,
    read_batch_header,
    reply_codec,
    request_codec,
    topic_for,
)
from broker.zmtp import readable, recv_message, send_message, set_heartbeats
from node.config import seed_list
from node.heap import TRIM_AFTER_KEYS, release_freed_heap
from node.probe import refused
from node.replica import Action, DropBarrier, Replica, RequestFetch, RequestProbe, RequestSnapshot
from node.replies import expect, raise_if_error
from node.requests import ChannelPool, CurveKeys, RequestChannel, SharedRoute, apply_curve
from node.routing import derived_pub_endpoint
from node.watch import Watcher, change_from_event

logger = logging.getLogger("sharedmem.node")

TICK = 0.1  # seconds between housekeeping passes of the I/O thread
SUB_HWM = 1_000_000


SyncState = Literal["joining", "live", "repairing", "resyncing"]  # the values of replica.Phase


@dataclass(frozen=True)
class NamespaceStatus:
    """What a node knows about one namespace's freshness."""

    namespace: str
    sync: SyncState
    seq: int
    head_seq: int
    lag: int
    last_heard_age: float | None
    resyncs: int
    repairs: int
    term: int = 0  # highest broker-group term seen on this namespace's stream (0: single)
    skipped: int = 0  # batches dropped by their header alone, never decoded (own writes' copies)


def pick_pub_endpoint(broker: str, offered: list[str]) -> str:
    """The publisher endpoint to connect to, given the broker address we reached.

    A wildcard or different host in the offer is replaced by the host we used to reach the
    broker: if we can reach its requests there, its events are there too.
    """
    if not offered:
        raise BrokerUnavailable(f"broker at {broker} offers no event endpoint")
    scheme = broker.split("://", 1)[0]
    same_scheme = [e for e in offered if e.split("://", 1)[0] == scheme] or offered
    if scheme != "tcp":
        return same_scheme[0]
    host = urlsplit(broker).hostname or "127.0.0.1"
    for e in same_scheme:
        if urlsplit(e).hostname == host:
            return e
    port = urlsplit(same_scheme[0]).port
    netloc = f"[{host}]" if ":" in host else host
    return f"tcp://{netloc}:{port}"


class Node:
    """Replicas of one broker's (or broker group's) namespaces in this process. Use
    ``acquire_node`` to share.

    ``address``: one request endpoint, or a seed list (comma-separated, or a sequence)."""

    def __init__(self, address: str | Sequence[str], ctx: zmq.Context, *,
                 connect_timeout: float = 10.0, retry_interval: float = 1.0,
                 heartbeat_timeout: float | None = None, receive_hwm: int = SUB_HWM,
                 curve: CurveKeys | None = None, apply_own_writes: bool = True) -> None:
        self.seeds = seed_list(address)
        self.address = ",".join(self.seeds)  # as configured (one address stays as it was)
        self.route = SharedRoute(self.seeds)
        # Apply a write's events from its reply when the replica is exactly at their
        # predecessor (docs/architecture.md §5); False always waits for the stream (benchmarks
        # compare the two).
        self.apply_own_writes = apply_own_writes
        self._ctx = ctx
        self.receive_hwm = receive_hwm
        self.retry_interval = retry_interval
        # Fault injection (tests): while set, the I/O thread stops reading its SUB socket, as a
        # busy or stalled consumer would; events then pile up and overflow the high-water marks.
        self.pause_reading = threading.Event()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.replicas: dict[str, Replica] = {}
        self.watchers: dict[str, list[Watcher]] = {}
        self._refs: dict[str, int] = {}
        self.curve = curve
        self._pool = ChannelPool(lambda: RequestChannel(ctx, self.route,
                                                        retry_interval=retry_interval,
                                                        curve=curve))
        deadline = time.monotonic() + connect_timeout
        try:
            answered, hello = self._hello_seeds(deadline, connect_timeout)
        except BaseException:
            self._pool.close()
            raise
        self.route.on_hello(answered, hello.term, hello.primary, hello.members)
        # Event endpoint per member: what its own Hello offers (it knows its binds, wildcards
        # included); the group's layout (port + 1) for a member that cannot be asked now.
        self._pubs: dict[str, str] = {answered: pick_pub_endpoint(answered, hello.pub_endpoints)}
        self.pub_endpoint = self._pubs[answered]
        for member in self.route.view()[2]:
            if member not in self._pubs:
                self._pubs[member] = self._member_pub_endpoint(member, deadline)
        self.max_value_bytes = hello.max_value_bytes
        self._pool.max_request_bytes = hello.max_message_bytes  # refused before sending
        self.heartbeat_timeout = heartbeat_timeout or max(3 * hello.heartbeat_interval, 1.0)
        self._commands: deque[tuple[str, str, list[Action]]] = deque()
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_r.setblocking(False)
        self._closed = False
        self.connected = True
        self.decoded = 0  # event-stream messages decoded (a batch skipped by header is not)
        self._thread = threading.Thread(target=self._run, name="sharedmem-node-io", daemon=True)
        self._io_ready = threading.Event()
        self._thread.start()
        self._io_ready.wait(5.0)

    def _hello_seeds(self, deadline: float, connect_timeout: float) -> tuple[str, HelloReply]:
        """Hello to the seeds in turn: skip those that refuse the connection (fast, node/probe),
        give each of the others a share of the time left (the last one all of it); the first
        answer wins. A standby answers Hello too, naming the primary and the members."""
        seeds = self.seeds
        live = [s for s in seeds if not refused(s, timeout=min(1.0, connect_timeout))]
        if not live:
            if len(seeds) == 1:
                raise BrokerUnavailable(f"no broker at {seeds[0]}: connection refused (start "
                                        "one, e.g. scripts/broker, or check the address)")
            raise BrokerUnavailable(f"no broker at any of {', '.join(seeds)}: connection "
                                    "refused at each (start one, or check the addresses)")
        silent: list[str] = []
        for i, seed in enumerate(live):
            share = (deadline - time.monotonic()) / (len(live) - i)
            first = RequestChannel(self._ctx, seed, retry_interval=self.retry_interval,
                                   curve=self.curve, watch_handshake=True)
            try:
                hello = first.call(Hello(os.urandom(12)), time.monotonic() + max(0.0, share))
            except BrokerUnavailable:
                silent.append(seed)
                continue
            finally:
                first.close()
            if isinstance(hello, Error):  # e.g. another protocol version: say what it said
                raise_if_error(hello)
            if not isinstance(hello, HelloReply):
                raise BrokerUnavailable(f"broker at {seed} answered Hello with {hello!r}")
            if len(seeds) > 1:
                logger.info("seed %s answered (term %d, primary %r, members %s)", seed, hello.term,
                         hello.primary, hello.members)
            return seed, hello
        if len(seeds) == 1:
            raise BrokerUnavailable(f"broker at {seeds[0]} did not answer within "
                                    f"{connect_timeout:g}s (something accepts connections "
                                    "there but is silent: a stopped or overloaded broker, or "
                                    "not a sharedmem broker)")
        gone = [s for s in seeds if s not in live]
        raise BrokerUnavailable(
            f"no broker of the seed list {', '.join(seeds)} answered within "
            f"{connect_timeout:g}s (silent: {', '.join(silent)}"
            + (f"; connection refused: {', '.join(gone)}" if gone else "") + ")")

    def _member_pub_endpoint(self, member: str, deadline: float) -> str:
        """Ask ``member`` for its event endpoint (one short Hello); derive it when the member
        refuses connections or stays silent, so the SUB is connected for when it comes back."""
        budget = min(deadline - time.monotonic(), max(0.5, self.retry_interval))
        if budget > 0 and not refused(member, timeout=min(0.5, budget)):
            channel = RequestChannel(self._ctx, member, retry_interval=self.retry_interval,
                                     curve=self.curve)
            try:
                reply = channel.call(Hello(os.urandom(12)), time.monotonic() + budget)
                if isinstance(reply, HelloReply) and reply.pub_endpoints:
                    return pick_pub_endpoint(member, reply.pub_endpoints)
            except BrokerUnavailable:
                pass
            finally:
                channel.close()
        derived = derived_pub_endpoint(member)
        logger.info("member %s did not answer Hello; its events are expected at %s", member,
                 derived)
        return derived

    # ------------------------------------------------------------------ user-thread API

    def request(self, build: object, deadline: float, *, is_write: bool = False) -> object:
        return self._pool.call(build, deadline, is_write=is_write)

    @property
    def pool(self) -> ChannelPool:
        """The request channels (the benchmark wraps their send to time a write's reply)."""
        return self._pool

    def write(self, namespace: str, build: object, deadline: float) -> object:
        """Send a write; on WriteOk make it visible here (read-your-writes) before returning.

        The reply carries the write's events: applied at once when the replica is exactly at
        their predecessor (the common case), else we wait for the stream to get there."""
        reply, batch = self._pool.call_with_events(build, deadline, is_write=True)
        if type(reply) is WriteOk:
            if batch is not None and batch.namespace == namespace and self.apply_own_writes:
                with self.changed:
                    r = self.replicas.get(namespace)
                    if r is not None and r.apply_own(batch, time.monotonic()):
                        if r.changes:
                            self._dispatch(r)
                        self.changed.notify_all()
                        return reply
            self.wait_visible(namespace, reply, deadline)
        return reply

    def open_namespace(self, namespace: str, max_keys: int, deadline: float,
                       *, adopt: bool = False) -> Replica:
        """Open (create or check) a namespace and wait until its replica is live. ``adopt``:
        an existing namespace is opened with its own ``max_keys`` (the replica's)."""
        reply = expect(self.request(Open(namespace, max_keys, adopt), deadline), OpenReply,
                       "Open", unexpected=ProtocolError)
        with self.lock:
            self._refs[namespace] = self._refs.get(namespace, 0) + 1
            replica = self.replicas.get(namespace)
            if replica is None:
                replica = self.replicas[namespace] = Replica(
                    namespace, reply.max_keys, silence_timeout=self.heartbeat_timeout
                )
                self._command("join", namespace)
        try:
            self.wait_live(namespace, deadline)
        except BaseException:
            self.close_namespace(namespace)
            raise
        return replica

    def close_namespace(self, namespace: str) -> None:
        with self.lock:
            n = self._refs.get(namespace, 0) - 1
            if n > 0:
                self._refs[namespace] = n
                return
            self._refs.pop(namespace, None)
            replica = self.replicas.pop(namespace, None)
            self._command("leave", namespace, replica.close() if replica is not None else [])

    def wait_until(self, ready: Callable[[], bool], deadline: float) -> bool:
        """With ``changed`` held: wait until ``ready()`` (re-checked after every apply) or the
        monotonic ``deadline``; returns ``ready()``. The one deadline wait of the node and
        the API (a replica live, a write visible, a key's version reached)."""
        return self.changed.wait_for(ready, max(0.0, deadline - time.monotonic()))

    def wait_live(self, namespace: str, deadline: float) -> None:
        def live() -> bool:
            r = self.replicas.get(namespace)
            return r is not None and r.state is not None

        with self.changed:
            if not self.wait_until(live, deadline):
                raise BrokerUnavailable(
                    f"namespace {namespace!r}: no snapshot from broker at {self.address} "
                    "in time"
                )

    def wait_visible(self, namespace: str, ok: WriteOk | HeadReply, deadline: float,
                     *, strict: bool = False) -> None:
        """Wait until the replica shows the write acknowledged by ``ok`` (read-your-writes).

        ``strict``: raise BrokerUnavailable instead of returning when the deadline passes."""
        def visible() -> bool:
            r = self.replicas.get(namespace)
            if r is None:
                return True  # namespace closed meanwhile
            return r.state is not None and r.epoch == ok.epoch and r.state.seq >= ok.seq

        with self.changed:
            if self.wait_until(visible, deadline):
                return
            r = self.replicas[namespace]
            if strict:
                raise BrokerUnavailable(
                    f"namespace {namespace!r}: this node's replica did not reach seq "
                    f"{ok.seq} of epoch {ok.epoch} in time (at seq {r.seq}, {r.phase.value})")
            # The write *was* applied (we hold its acknowledgement); only our replica has not
            # shown it yet -- or the broker incarnation that applied it is gone (in-memory
            # restart). Reporting it as refused would be a lie.
            logger.warning(
                "namespace %r: write acknowledged at seq %d (epoch %s) not yet visible; "
                "replica at seq %d (epoch %s, %s)", namespace, ok.seq, ok.epoch, r.seq,
                r.epoch, r.phase.value)

    def status(self, namespace: str, now: float) -> NamespaceStatus:
        with self.lock:
            r = self.replicas[namespace]
            age = None if r.last_heard is None else now - r.last_heard
            head = max(r.head_seq, r.seq)
            return NamespaceStatus(namespace, cast(SyncState, r.phase.value), r.seq, head,
                                   head - r.seq, age, r.resyncs, r.repairs, r.term, r.skipped)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._command("stop", "")
        self._thread.join(5.0)
        self._pool.close()
        self._wake_r.close()
        self._wake_w.close()

    def _command(self, op: str, namespace: str, actions: list[Action] | None = None) -> None:
        self._commands.append((op, namespace, actions or []))
        try:
            self._wake_w.send(b"x")
        except OSError:  # closed or full: the I/O thread is awake or gone anyway
            pass

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        dealer = self._ctx.socket(zmq.DEALER)
        for s in (sub, dealer):
            s.setsockopt(zmq.LINGER, 0)
            apply_curve(s, self.curve)
        sub.setsockopt(zmq.RCVHWM, self.receive_hwm)
        for s in (sub, dealer):
            set_heartbeats(s)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        for endpoint in dict.fromkeys(self._pubs.values()):
            sub.connect(endpoint)
        self._dealer_target = self.route.target()
        dealer.connect(self._dealer_target)
        self._sub, self._dealer = sub, dealer
        self._hello_sent: float | None = None  # when the dealer's Hello went out, unanswered
        self._last_hello = float("-inf")
        self._published = published_codec()
        self._replies = reply_codec()
        self._requests = request_codec()
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        sub_registered = True
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._io_ready.set()
        next_tick = time.monotonic() + TICK
        try:
            while True:
                timeout = max(0.0, next_tick - time.monotonic())
                ready = dict(poller.poll(int(timeout * 1000) + 1))
                if self._wake_r.fileno() in ready:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                if self._commands and not self._run_commands():
                    return
                if self.pause_reading.is_set() == sub_registered:
                    if sub_registered:
                        poller.unregister(sub)
                    else:
                        poller.register(sub, zmq.POLLIN)
                    sub_registered = not sub_registered
                if sub in ready:
                    self._drain_sub()
                if dealer in ready:
                    self._drain_dealer()
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + TICK
        except Exception:  # pragma: no cover - logged; readers then see the node as stale
            logger.exception("node I/O thread failed")
        finally:
            sub.close(linger=0)
            dealer.close(linger=0)

    def _run_commands(self) -> bool:
        while self._commands:
            op, namespace, leftover = self._commands.popleft()
            if op == "stop":
                return False
            if op == "join":
                self._sub.setsockopt(zmq.SUBSCRIBE, topic_for(namespace))
                with self.lock:
                    r = self.replicas.get(namespace)
                    actions = r.start(time.monotonic()) if r is not None else []
                self._carry_out(actions)
            elif op == "leave":
                self._carry_out(leftover)  # the closed replica's barrier subscriptions
                with self.lock:
                    if namespace in self.replicas:
                        continue  # reopened meanwhile
                self._sub.setsockopt(zmq.UNSUBSCRIBE, topic_for(namespace))
        return True

    def _drain_sub(self) -> None:
        """Apply a burst of event-stream messages: one lock hold, one ``changed`` notification.

        The burst is received before the lock is taken, so a writer applying its own write is
        not held up by our socket calls; the poller reported the socket readable, so the first
        ``recv`` needs no ``EVENTS`` check. A batch whose header frame shows it holds nothing
        new (``Replica.skip_batch``: the stream copy of this node's own write, or a deposed
        primary's) is dropped before its body is decoded."""
        sub = self._sub
        burst: list[list[zmq.Frame]] = []
        for _ in range(10_000):
            try:
                burst.append(recv_message(sub))
            except zmq.Again:
                break
            if not readable(sub):  # cheaper than a zmq.Again
                break
        if not burst:
            return
        actions: list = []
        changed = False
        with self.changed:
            for frames in burst:
                n = len(frames)
                topic = frames[0].bytes
                if n == 3:
                    r = (self.replicas.get(topic[:-1].decode(errors="replace"))
                         if topic[-1:] == TOPIC_END else None)
                    header = read_batch_header(frames[2].bytes) if r is not None else None
                    if r is not None and header is not None:
                        if header.term > r.term:
                            self.route.note_term(header.term)  # a new primary: the tick finds
                        if r.skip_batch(header.epoch, header.term, header.last_seq,
                                        time.monotonic()):
                            continue
                elif n != 2:
                    logger.warning("dropping event-stream message with %d frames", n)
                    continue
                changed = True
                try:
                    msg = self._published.decode(frames[1])
                except ProtocolError as exc:
                    logger.warning("dropping bad event-stream message: %s", exc)
                    continue
                self.decoded += 1
                r = self.replicas.get(msg.namespace)
                if r is None or topic != topic_for(msg.namespace):
                    continue
                if msg.term > r.term:
                    self.route.note_term(msg.term)  # a new primary: the tick finds where
                now = time.monotonic()
                if type(msg) is EventBatch:
                    actions += r.on_batch(msg, now)
                elif type(msg) is Heartbeat:
                    actions += r.on_heartbeat(msg, now)
                if r.changes:
                    self._dispatch(r)
            if changed:  # skipped batches change nothing a waiter waits for
                self.changed.notify_all()
        self._carry_out(actions)

    def _drain_dealer(self) -> None:
        actions: list = []
        dealer = self._dealer
        installed = 0  # keys of the largest state installed in this pass
        while True:
            try:
                frames = recv_message(dealer)
            except zmq.Again:
                break
            if len(frames) != 2 or len(frames[0]) != 0:
                logger.warning("dropping malformed snapshot-channel reply")
                continue
            try:
                reply = self._replies.decode(frames[1])
            except ProtocolError as exc:
                logger.warning("dropping bad snapshot-channel reply: %s", exc)
                continue
            if isinstance(reply, (HelloReply, NotPrimary)):
                actions += self._on_route_reply(reply)
                continue
            with self.changed:
                if isinstance(reply, SnapshotReply):
                    r = self.replicas.get(reply.namespace)
                    if r is not None:
                        old_epoch, old = r.epoch, r.state
                        actions += r.on_snapshot_chunk(reply, time.monotonic())
                        if r.state is not old and r.state is not None:
                            installed = max(installed, len(r.state.entries))
                        if old is not None and old_epoch is not None and r.epoch != old_epoch:
                            # A new broker history (e.g. an in-memory broker restarted): say
                            # what this node's replica lost, not just "broker is back".
                            logger.warning(
                                "namespace %r was reset: the broker has a new history (epoch "
                                "%s, was %s); %d keys at seq %d replaced by %d keys at seq %d",
                                r.namespace, r.epoch, old_epoch, len(old.entries), old.seq,
                                len(r.state.entries) if r.state else 0, r.seq)
                elif isinstance(reply, FetchReply):
                    r = self.replicas.get(reply.namespace)
                    if r is not None:
                        actions += r.on_fetch(reply, time.monotonic())
                elif isinstance(reply, OpenReply):
                    r = self.replicas.get(reply.namespace)
                    if r is not None:
                        actions += r.on_probe(reply.epoch, reply.seq, time.monotonic())
                elif isinstance(reply, Error):
                    logger.warning("broker refused a snapshot or fetch request: %s: %s", reply.kind,
                                   reply.message)
                for r in self.replicas.values():
                    if r.changes:
                        self._dispatch(r)
                self.changed.notify_all()
        self._carry_out(actions)
        if installed >= TRIM_AFTER_KEYS:
            old = None  # a replaced state is garbage by now: its memory goes back too
            release_freed_heap()

    def _on_route_reply(self, reply: HelloReply | NotPrimary) -> list[Action]:
        """A Hello answer, or a standby's refusal of a snapshot/fetch/probe, on the DEALER:
        update the route; the DEALER follows it at once (and what was pending is re-asked)."""
        asked = self._dealer_target
        if isinstance(reply, HelloReply):
            self._hello_sent = None
            self.route.on_hello(asked, reply.term, reply.primary, reply.members)
        else:
            self.route.on_not_primary(asked, reply.term, reply.primary)
        return self._follow_route(time.monotonic())

    def _follow_route(self, now: float) -> list[Action]:
        """Connect the SUB to members not yet connected; move the DEALER to the route's target
        and re-ask there whatever snapshot/fetch was pending."""
        _, primary, members, _ = self.route.view()
        for member in members:
            if member not in self._pubs:
                self._pubs[member] = endpoint = derived_pub_endpoint(member)
                logger.info("new group member %s: subscribing to its events at %s", member,
                         endpoint)
                self._sub.connect(endpoint)
        target = self.route.target()
        if target == self._dealer_target:
            return []
        logger.info("snapshot/fetch channel moves from %s to %s", self._dealer_target, target)
        try:
            self._dealer.disconnect(self._dealer_target)
        except zmq.ZMQError:
            pass
        self._dealer.connect(target)
        self._dealer_target = target
        self._hello_sent = None
        actions: list[Action] = []
        with self.lock:
            for r in self.replicas.values():
                actions += r.reask(now)
        return actions

    def _ask_route(self, now: float) -> list[Action]:
        """In a group whose primary is unknown, or whose stream went silent: Hello over the
        DEALER; a Hello unanswered for ``hello_timeout`` rotates to the next member."""
        term, primary, members, _ = self.route.view()
        if len(members) < 2 or (primary and self.connected):
            self._hello_sent = None
            return []
        hello_timeout = max(0.5, 2 * self.retry_interval)
        actions: list[Action] = []
        if self._hello_sent is not None and now - self._hello_sent > hello_timeout:
            self._hello_sent = None
            self.route.on_timeout(self._dealer_target)
            actions += self._follow_route(now)
        if self._hello_sent is None and now - self._last_hello > hello_timeout:
            self._hello_sent = self._last_hello = now
            self._send_dealer(Hello(os.urandom(12)))
        return actions

    def _dispatch(self, r: Replica) -> None:
        """Hand the replica's recorded changes to the namespace's watchers (under ``lock``)."""
        changes, r.changes = r.changes, []
        for watcher in self.watchers.get(r.namespace, ()):
            watcher.note_epoch(r.epoch)
            pattern = watcher.pattern
            if pattern.exact:  # one key (a fan-out probe, a config key): no call per event
                key = pattern.prefix
                for event, resync in changes:
                    if event.key == key:
                        watcher.push(change_from_event(event, resync=resync))
                continue
            matches = pattern.matches
            for event, resync in changes:
                if matches(event.key):
                    watcher.push(change_from_event(event, resync=resync))

    def add_watcher(self, namespace: str, watcher: Watcher) -> None:
        """Register under ``lock`` (the caller holds it and takes the backlog meanwhile)."""
        self.watchers.setdefault(namespace, []).append(watcher)
        r = self.replicas.get(namespace)
        if r is not None:
            r.record = True
            watcher.note_epoch(r.epoch)

    def remove_watcher(self, namespace: str, watcher: Watcher) -> None:
        with self.lock:
            ws = self.watchers.get(namespace, [])
            if watcher in ws:
                ws.remove(watcher)
            r = self.replicas.get(namespace)
            if r is not None and not ws:
                r.record = False
                r.changes.clear()

    def _tick(self, now: float) -> None:
        actions: list = []
        with self.changed:
            heard = [r.last_heard for r in self.replicas.values() if r.last_heard is not None]
            was = self.connected
            self.connected = not heard or now - max(heard) <= self.heartbeat_timeout
            if was != self.connected:
                logger.warning("broker at %s %s", self.address,
                            "is back" if self.connected else "went silent")
            for r in self.replicas.values():
                actions += r.on_tick(now)
        actions += self._follow_route(now)
        actions += self._ask_route(now)
        self._carry_out(actions)

    def _carry_out(self, actions: list[Action]) -> None:
        for a in actions:
            if type(a) is RequestSnapshot:
                with self.lock:
                    r = self.replicas.get(a.namespace)
                    max_keys = r.max_keys if r is not None else 0
                # Barrier: this subscription follows <ns>\0 on the same pipe, so when the broker
                # sees it, the namespace subscription is active and nothing after the snapshot
                # can be missed.
                self._sub.setsockopt(zmq.SUBSCRIBE, topic_for(a.namespace) + a.nonce)
                self._send_dealer(Snapshot(a.namespace, max_keys, a.snap_id, a.nonce))
            elif type(a) is DropBarrier:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, topic_for(a.namespace) + a.nonce)
            elif type(a) is RequestFetch:
                self._send_dealer(Fetch(a.namespace, a.epoch, a.from_seq, a.request_id))
            elif type(a) is RequestProbe:
                self._send_dealer(Open(a.namespace, a.max_keys, adopt=True))

    def _send_dealer(self, req: Request) -> None:
        try:
            send_message(self._dealer, (b"", self._requests.encode(req)))
        except zmq.Again:
            logger.info("snapshot channel busy; the request will be retried")


# ---------------------------------------------------------------------- sharing per process

_nodes: dict[tuple[tuple[str, ...], CurveKeys | None], tuple[Node, int]] = {}
_nodes_lock = threading.Lock()


def acquire_node(address: str | Sequence[str], ctx: zmq.Context, *, connect_timeout: float,
                 retry_interval: float, receive_hwm: int = SUB_HWM,
                 curve: CurveKeys | None = None) -> Node:
    """The process's node for ``address`` and identity (created on first use), with one more
    reference. A seed list is keyed by its normalised tuple of entries (``seed_list``), so
    ``"tcp://a,tcp://b"`` and ``["tcp://a", "tcp://b"]`` share one node; another order or
    another subset is another node (it may name another group)."""
    k = (seed_list(address), curve)
    with _nodes_lock:
        item = _nodes.get(k)
        if item is not None and not item[0]._closed:
            node = item[0]
            if (node.retry_interval, node.receive_hwm) != (retry_interval, receive_hwm):
                logger.warning(
                    "broker %s: this process already has a node for it with retry_interval=%s "
                    "receive_hwm=%s; the new handle's retry_interval=%s receive_hwm=%s are "
                    "ignored (the first handle's settings apply)", address, node.retry_interval,
                    node.receive_hwm, retry_interval, receive_hwm)
            _nodes[k] = (node, item[1] + 1)
            return node
        node = Node(k[0], ctx, connect_timeout=connect_timeout, retry_interval=retry_interval,
                    receive_hwm=receive_hwm, curve=curve)
        _nodes[k] = (node, 1)
        return node


def release_node(node: Node) -> None:
    k = (node.seeds, node.curve)
    with _nodes_lock:
        item = _nodes.get(k)
        if item is None or item[0] is not node:
            node.close()
            return
        if item[1] > 1:
            _nodes[k] = (node, item[1] - 1)
            return
        del _nodes[k]
    node.close()
