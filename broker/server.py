"""The broker's ZeroMQ shell: one thread, one ``zmq.Poller`` loop, no decisions of its own.

Sockets:
- ROUTER (requests) on every ``bind`` endpoint: REQ (writes, Lazy Pirate) and DEALER
  (snapshots/fetches) peers, frames ``[identity, b"", body]``;
- XPUB (events) with ``XPUB_MANUAL``: the broker accepts exact ``<ns>\\0`` subscriptions and
  records ``<ns>\\0<nonce>`` ones as the subscription barrier for snapshot requests;
- an inproc PAIR for ``stop()`` from another thread.

Each loop turn: drain subscriptions, then requests: the core turns a turn's writes (and the
expiry due) into one ``Turn`` (broker/turn.py); the shell appends its records, flushes once --
group commit -- and only then sends its replies and publishes. Then timers (heartbeats).
Garbage on any socket is logged and, where a reply is owed, answered with an ``Error``; it
never ends the loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import zmq

from broker.core import BrokerCore, SnapshotJob
from broker.durable import FSYNC_POLICIES, DurableLog
from broker.errors import ProtocolError
from broker.log import Log, MemoryLog
from broker.metrics import MetricsServer
from broker.metrics import render as render_metrics
from broker.protocol import (
    TOPIC_END,
    Delete,
    Digest,
    Error,
    Fetch,
    Head,
    Heartbeat,
    Hello,
    HelloReply,
    Open,
    OpenReply,
    Reply,
    Set,
    SetMany,
    Snapshot,
    Stats,
    StatsReply,
    Touch,
    WriteOk,
    WriteRequest,
    published_codec,
    reply_codec,
    request_codec,
    topic_for,
)
from broker.recovery import RecoveryReport
from broker.security import Security, is_loopback_endpoint
from broker.turn import persist
from broker.validation import DEFAULT_MAX_VALUE_BYTES, check_namespace

if TYPE_CHECKING:
    from broker.group_shell import GroupShell

log = logging.getLogger("sharedmem.broker")


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP-authenticated identity (z85 public key) on a message, if any."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:  # EINVAL: no such property (inproc, or a disconnect's unsubscribe)
        return None


def _who(sec: Security, user: str | None) -> str:
    c = sec.client(user)
    return f"client {c.name!r}" if c is not None else "an unauthenticated peer"


class _KnownKeys:
    """ZAP credentials provider: only listed public keys complete the CURVE handshake."""

    def __init__(self, sec: Security) -> None:
        self._sec = sec

    def callback(self, domain: str, key: bytes) -> bool:
        return self._sec.is_known_key(key)


class _RateLimitedLog:
    """Logs at most ``per_second`` garbage warnings a second, then one summary: a flood of bad
    frames must not turn into a flood of log lines (or a blocked stderr)."""

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._window = 0
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = int(time.monotonic())
        if now != self._window:
            if self._suppressed:
                log.warning("%d more bad messages were not logged", self._suppressed)
            self._window, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count <= self.per_second:
            log.warning(msg, *args)
        else:
            self._suppressed += 1


garbage_log = _RateLimitedLog()

MAX_REQUESTS_PER_TURN = 512
# Plain ints: pyzmq's enum flags cost an Enum construction per call on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
MAX_PENDING_SNAPSHOTS = 10_000
MAX_SEEN_NONCES = 10_000
MAX_PENDING_SNAPSHOTS_PER_PEER = 8
MAX_ENVELOPE_FRAMES = 8  # identity + routing frames of proxies + delimiter
SNAPSHOT_CHUNK = 5000  # entries per snapshot chunk (one chunk per loop turn)
SNAPSHOT_WAIT = 10.0  # seconds a snapshot request may wait for its barrier subscription


def default_pub_endpoint(endpoint: str) -> str:
    """Publisher endpoint beside a request endpoint: tcp port + 1, or ``<inproc>-pub``."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if port in ("0", "*"):
            return f"tcp://{host}:{port}"
        return f"tcp://{host}:{int(port) + 1}"
    return endpoint + "-pub"


@dataclass
class BrokerConfig:
    """How a broker listens and behaves. All fields have loopback-safe defaults."""

    bind: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:7400"])
    pub_bind: list[str] | None = None  # default: beside each ``bind`` (port + 1)
    heartbeat_interval: float = 0.5
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    log_retention: int = 100_000
    hwm: int = 200_000  # SNDHWM of the publisher per subscriber, RCVHWM of the router
    pub_hwm: int | None = None  # publisher SNDHWM per subscriber (default: ``hwm``)
    data_dir: str | None = None  # None: the log lives in memory only
    fsync: str = "always"  # always | everysec | no (with data_dir)
    compact_bytes: int = 64 * 1024 * 1024  # rotate + snapshot when a segment grows past this
    security: Security | None = None  # CURVE keys and permissions (None: no authentication)
    insecure: bool = False  # allow binding a non-loopback address without CURVE
    max_message_bytes: int = 64 * 1024 * 1024  # ZMQ_MAXMSGSIZE of every broker socket
    metrics_port: int | None = None  # Prometheus text on http://metrics_host:port/metrics
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.bind:
            raise ValueError("bind: at least one endpoint is needed")
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0, got {self.heartbeat_interval}")
        if self.max_value_bytes <= 0:
            raise ValueError(f"max_value_bytes must be > 0, got {self.max_value_bytes}")
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, "
                             f"got {self.fsync!r}")
        if self.compact_bytes <= 0:
            raise ValueError(f"compact_bytes must be > 0, got {self.compact_bytes}")
        if self.security is None:
            exposed = [e for e in [*self.bind, *(self.pub_bind or [])]
                       if not is_loopback_endpoint(e)]
            if exposed and not self.insecure:
                raise ValueError(
                    f"bind: refusing to listen on {', '.join(exposed)} without CURVE "
                    "authentication; give a --config with keys, or --insecure to accept the risk")
            if exposed:
                log.warning("INSECURE: listening on %s without authentication or encryption: "
                            "anyone who reaches it can read and overwrite every namespace",
                            ", ".join(exposed))

    def pub_endpoints(self) -> list[str]:
        if self.pub_bind:
            return list(self.pub_bind)
        return [default_pub_endpoint(b) for b in self.bind]


class Broker:
    """A broker running its loop on a thread of its own (``start``) or the caller's (``run``)."""

    def __init__(self, config: BrokerConfig | None = None, *, context: zmq.Context | None = None,
                 core: BrokerCore | None = None) -> None:
        self.config = config or BrokerConfig()
        cfg = self.config
        if core is None:
            log_: Log = (
                DurableLog(cfg.data_dir, fsync=cfg.fsync, retention=cfg.log_retention,
                           compact_bytes=cfg.compact_bytes)
                if cfg.data_dir else MemoryLog(cfg.log_retention)
            )
            core = BrokerCore(max_value_bytes=cfg.max_value_bytes, log=log_)
        self.core = core
        self.recovery: RecoveryReport | None = None
        # A secure broker gets a context of its own: ZAP's handler is per context.
        self._own_ctx = context is None and self.config.security is not None
        self._ctx = context or (zmq.Context() if self._own_ctx else zmq.Context.instance())
        self._auth: object | None = None
        self._pending_per_peer: dict[bytes, int] = {}
        self._ctl_endpoint = f"inproc://sharedmem-broker-ctl-{id(self)}-{os.getpid()}"
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._startup_error: BaseException | None = None
        self.endpoints: list[str] = []
        self.pub_endpoints: list[str] = []
        self._requests = request_codec()
        self._replies = reply_codec()
        self._published = published_codec()
        self._pending_snapshots: OrderedDict[bytes, tuple[list[bytes], Snapshot, float]] = (
            OrderedDict()
        )
        self._seen_nonces: OrderedDict[bytes, str] = OrderedDict()
        self.subscribers: dict[str, int] = {}
        self._in_turn = False
        self._ready_snapshots: list[tuple[list[bytes], Snapshot]] = []
        self._snapshot_jobs: deque[tuple[list[bytes], SnapshotJob]] = deque()
        self.metrics: MetricsServer | None = None
        self._started = time.monotonic()
        self._rate_mark = (self._started, 0)
        self._events_per_s = 0
        self.drop_write_replies = 0  # fault injection (tests): drop the next N write replies
        # The turn being received: its writes (for the core), and the replies made meanwhile,
        # which wait for the turn's log flush.
        self._writes: list[tuple[object, WriteRequest | Open]] = []
        self._held: list[tuple[object, Reply]] = []
        # Broker groups (broker/group_shell.py): set before start() for --group; None: single.
        self.group: GroupShell | None = None

    @property
    def epoch(self) -> str:
        return self.core.epoch

    @property
    def stopped(self) -> bool:
        """True once the loop has ended (after ``stop()``, a failed start, or a crash)."""
        return self._stopped.is_set()

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> Broker:
        """Run the loop on a daemon thread; returns once bound (raises the bind error)."""
        self._thread = threading.Thread(target=self.run, name="sharedmem-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("broker did not start in time")
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and close its sockets; idempotent."""
        if self._ready.is_set() and not self._stopped.is_set() and self._startup_error is None:
            ctl = self._ctx.socket(zmq.PAIR)
            ctl.setsockopt(zmq.LINGER, 0)
            try:
                ctl.connect(self._ctl_endpoint)
                ctl.send(b"stop")
                self._stopped.wait(timeout)
            finally:
                ctl.close(linger=0)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._own_ctx and self._stopped.is_set() and not self._ctx.closed:
            self._ctx.destroy(linger=0)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_sockets(self) -> None:
        cfg = self.config
        sec = cfg.security
        if sec is not None:
            # ZAP handler first: a CURVE server with no handler running accepts anyone.
            from zmq.auth.thread import ThreadAuthenticator

            auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("sharedmem.broker.zap"))
            auth.start()
            auth.configure_curve_callback(domain="sharedmem",
                                          credentials_provider=_KnownKeys(sec))
            self._auth = auth
        self._router = self._ctx.socket(zmq.ROUTER)
        self._xpub = self._ctx.socket(zmq.XPUB)
        self._ctl = self._ctx.socket(zmq.PAIR)
        for s in (self._router, self._xpub, self._ctl):
            s.setsockopt(zmq.LINGER, 0)
        for s in (self._router, self._xpub):
            s.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
            if sec is not None:
                s.curve_server = True
                s.curve_secretkey = sec.secret_key
                s.curve_publickey = sec.public_key
                s.zap_domain = b"sharedmem"
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.RCVHWM, cfg.hwm)
        self._router.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self._xpub.setsockopt(zmq.SNDHWM, cfg.pub_hwm or cfg.hwm)
        for sock in (self._router, self._xpub):
            # ZMTP heartbeats close dead TCP links (a cut cable sends no RST); the application
            # heartbeat on the stream is what tells nodes about lost messages.
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self._ctl.bind(self._ctl_endpoint)
        if cfg.metrics_port is not None:
            self.metrics = MetricsServer(cfg.metrics_host, cfg.metrics_port)
        for ep in cfg.bind:
            self._router.bind(ep)
            self.endpoints.append(self._router.getsockopt_string(zmq.LAST_ENDPOINT))
        for ep in cfg.pub_endpoints():
            self._xpub.bind(ep)
            self.pub_endpoints.append(self._xpub.getsockopt_string(zmq.LAST_ENDPOINT))

    def _close_sockets(self) -> None:
        for name in ("_router", "_xpub", "_ctl"):
            s = getattr(self, name, None)
            if s is not None:
                s.close(linger=0)
        if self._auth is not None:
            self._auth.stop()  # type: ignore[attr-defined]
            self._auth = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def run(self) -> None:
        """The event loop; returns after ``stop()``."""
        try:
            self.recovery = self.core.log.recover(self.core)
            if self.recovery is not None:
                log.info("recovered epoch %s: snapshot %s, %d segments, %d records, %d torn "
                         "bytes dropped", self.recovery.epoch, self.recovery.snapshot,
                         self.recovery.segments, self.recovery.records,
                         self.recovery.torn_bytes)
            self._open_sockets()
            if self.group is not None:
                self.group.attach(self._ctx, self._ctl)
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            if self.group is not None:
                self.group.close()
            self._close_sockets()
            self.core.log.close()
            self._ready.set()
            self._stopped.set()
            return
        log.info("broker epoch %s: requests on %s, events on %s", self.epoch,
                 ", ".join(self.endpoints), ", ".join(self.pub_endpoints))
        self._ready.set()
        try:
            self._loop()
        finally:
            if self.group is not None:
                self.group.close()
            self._close_sockets()
            self.core.log.close()
            self.core.log.mark_clean()
            self._stopped.set()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._xpub, zmq.POLLIN)
        poller.register(self._ctl, zmq.POLLIN)
        hb_interval = self.config.heartbeat_interval
        next_heartbeat = time.monotonic()
        log_ = self.core.log
        group = self.group
        if group is not None:
            group.register(poller)
        while True:
            now = time.monotonic()
            wake = next_heartbeat
            # A group standby expires nothing itself: the primary's records do it.
            nd = self.core.next_deadline() if group is None or group.is_primary else None
            if nd is not None:
                wake = min(wake, nd)
            timeout_ms = max(0, int((wake - now) * 1000) + 1)
            if log_.compacting:
                timeout_ms = min(timeout_ms, 50)
            if self._snapshot_jobs or self._ready_snapshots:
                timeout_ms = 0
            if group is not None:
                timeout_ms = min(timeout_ms, group.timeout_ms())
            ready = dict(poller.poll(min(timeout_ms, 1000)))
            if self._ctl in ready or (group is not None and group.stop_requested):
                return
            if group is not None:
                group.on_poll(ready, time.monotonic())
            if self._xpub in ready:
                self._drain_subscriptions()
            now = time.monotonic()
            if self._router in ready or (nd is not None and nd <= now):
                self._turn(drain=self._router in ready)
                if group is not None and group.stop_requested:
                    return
            if self._ready_snapshots:
                self._start_snapshots()
            if self._snapshot_jobs:
                self._pump_snapshots()
            log_.tick()
            if log_.compacting:
                log_.finish_compaction()
            elif log_.wants_compaction():
                self._start_compaction()
            now = time.monotonic()
            if now >= next_heartbeat:
                if self.metrics is not None:
                    self.metrics.text = render_metrics(self.stats())
                self._send_heartbeats()
                self._expire_pending_snapshots(now)
                next_heartbeat = now + hb_interval

    def _turn(self, *, drain: bool) -> None:
        """One turn: receive up to MAX_REQUESTS_PER_TURN requests; the core decides the writes
        (and the expiry due) into one ``Turn``; append its records and flush once (group
        commit); then send its replies and publishes -- refusals, and nothing published, if
        the flush failed and the core rolled the turn back."""
        self._in_turn = True
        try:
            if drain:
                router = self._router
                for _ in range(MAX_REQUESTS_PER_TURN):
                    # Checking EVENTS is cheaper than ending every turn with a zmq.Again.
                    if not router.getsockopt(_EVENTS) & _POLLIN:
                        break
                    try:
                        if self.config.security is None:
                            frames, user = router.recv_multipart(_NOBLOCK), None
                        else:
                            raw = router.recv_multipart(_NOBLOCK, copy=False)
                            frames, user = [f.bytes for f in raw], _user_id(raw[-1])
                    except zmq.Again:
                        break
                    self._on_request(frames, user)
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
        xpub = self._xpub
        for namespace, body in turn.publishes:
            xpub.send_multipart([topic_for(namespace), body])

    def _start_compaction(self) -> None:
        log_ = self.core.log
        build = self.core.frozen_view(log_.segment + 1, time.monotonic(), time.time())
        log_.start_compaction(build)

    def _send_heartbeats(self) -> None:
        term = 0
        if self.group is not None:
            if not self.group.fresh(time.monotonic()):
                return  # a standby, or a primary without recent sync acks: staleness shows
            term = self.group.g.term
        for name, state in self.core.namespaces.items():
            body = self._published.encode(Heartbeat(name, self.epoch, state.seq, term))
            self._xpub.send_multipart([topic_for(name), body])

    # ------------------------------------------------------------------ subscriptions

    def _drain_subscriptions(self) -> None:
        while True:
            try:
                if self.config.security is None:
                    msg, user = self._xpub.recv(zmq.NOBLOCK), None
                else:
                    frame = self._xpub.recv(zmq.NOBLOCK, copy=False)
                    msg, user = frame.bytes, _user_id(frame)
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
        sec = self.config.security
        if subscribe and sec is not None and not sec.allowed(user, name, "read"):
            # Refusal is silent on this socket; the request channel says AccessDenied.
            log.warning("refused subscription to %r by %s", name, _who(sec, user))
            return
        if not nonce:
            # Exact namespace topic: accept (XPUB_MANUAL applies it to the peer just read).
            if subscribe:
                self._xpub.setsockopt(zmq.SUBSCRIBE, topic)
                self.subscribers[name] = self.subscribers.get(name, 0) + 1
            else:
                self._xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
                self.subscribers[name] = max(0, self.subscribers.get(name, 0) - 1)
            return
        if not subscribe:
            return  # nonce topics were never applied, nothing to remove
        pending = self._pending_snapshots.pop(nonce, None)
        if pending is not None:
            envelope, request, _ = pending
            if request.namespace == name:
                self._ready_snapshots.append((envelope, request))
            return
        self._seen_nonces[nonce] = name
        while len(self._seen_nonces) > MAX_SEEN_NONCES:
            self._seen_nonces.popitem(last=False)

    def _expire_pending_snapshots(self, now: float) -> None:
        while self._pending_snapshots:
            nonce, (envelope, request, since) = next(iter(self._pending_snapshots.items()))
            if now - since < SNAPSHOT_WAIT:
                return
            del self._pending_snapshots[nonce]
            self._send_reply(envelope, Error(
                "StorageError",
                f"snapshot of {request.namespace!r}: the subscription barrier never arrived",
            ))

    # ------------------------------------------------------------------ requests

    def _on_request(self, frames: list[bytes], user: str | None = None) -> None:
        # [identity, ..., b"", body]: the envelope ends at the first empty frame
        try:
            delim = frames.index(b"", 1)
        except ValueError:
            garbage_log.warning("dropping request with %d frames: no envelope delimiter",
                                len(frames))
            return
        envelope = frames[: delim + 1]
        if len(envelope) > MAX_ENVELOPE_FRAMES:
            garbage_log.warning("dropping request with a %d-frame envelope", len(envelope))
            return
        if len(frames) - len(envelope) != 1:
            self._send_reply(envelope, Error(
                "ProtocolError", f"one body frame expected, got {len(frames) - len(envelope)}"))
            return
        try:
            request = self._requests.decode(frames[-1])
        except ProtocolError as exc:
            garbage_log.warning("bad request: %s", exc)
            self._send_reply(envelope, Error(exc.kind, str(exc)))
            return
        now = time.monotonic()
        if self.config.security is not None:
            denial = self._check_access(request, user)
            if denial is not None:
                self._send_reply(envelope, denial)
                return
        if self.group is not None:
            refusal = self.group.refusal(request)
            if refusal is not None:
                self._send_reply(envelope, refusal)
                return
        try:
            t = type(request)
            if t is Set or t is SetMany or t is Delete or t is Touch or t is Open:
                self._writes.append((envelope, request))  # decided by the core's run_turn
            elif t is Hello:
                self._send_reply(envelope, HelloReply(
                    self.epoch, self.pub_endpoints, self.config.max_value_bytes,
                    self.config.heartbeat_interval,
                    **(self.group.hello_fields() if self.group is not None else {}),
                ))
            elif t is Snapshot:
                self._on_snapshot(envelope, request, now)
            elif t is Fetch:
                self._send_reply(envelope, self.core.fetch(
                    request.namespace, request.epoch, request.from_seq, request.limit,
                    request.snap_id, now,
                ))
            elif t is Head:
                st = self.core.namespaces.get(request.namespace)
                self._send_reply(envelope, OpenReply(self.epoch, request.namespace,
                                                     st.max_keys if st else 0,
                                                     st.seq if st else 0))
            elif t is Stats:
                stats = self.stats()
                sec = self.config.security
                if sec is not None:
                    stats = StatsReply(stats.epoch, {
                        k: v for k, v in stats.namespaces.items() if sec.allowed(user, k, "read")
                    }, stats.counters)
                self._send_reply(envelope, stats)
            elif t is Digest:
                self._send_reply(envelope, self.core.digest(request.namespace))
        except Exception as exc:  # noqa: BLE001 - never let one request end the broker
            log.exception("internal error handling %s", type(request).__name__)
            self._send_reply(envelope, Error("StorageError", f"internal broker error: {exc!r}"))

    def stats(self) -> StatsReply:
        """The core's counters plus the shell's: subscribers, fsyncs, compactions, rates."""
        base = self.core.stats()
        now = time.monotonic()
        counters = dict(base.counters)
        counters["subscribers"] = sum(self.subscribers.values())
        counters["uptime_ms"] = int((now - self._started) * 1000)
        counters["pending_snapshots"] = len(self._pending_snapshots)
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
        return StatsReply(base.epoch, base.namespaces, counters)

    def _start_snapshots(self) -> None:
        ready, self._ready_snapshots = self._ready_snapshots, []
        for envelope, request in ready:
            job = self.core.snapshot_job(request)
            if isinstance(job, Error):
                self._send_reply(envelope, job)
            else:
                self._snapshot_jobs.append((envelope, job))

    def _pump_snapshots(self) -> None:
        """One chunk of the oldest snapshot per loop turn: writes interleave with big ones."""
        envelope, job = self._snapshot_jobs.popleft()
        self._send_reply(envelope, job.next_chunk(time.monotonic(), SNAPSHOT_CHUNK))
        if not job.done:
            self._snapshot_jobs.append((envelope, job))

    def _check_access(self, request: object, user: str | None) -> Error | None:
        """AccessDenied for a request the authenticated client may not make, else None."""
        sec = self.config.security
        assert sec is not None
        namespace = getattr(request, "namespace", None)
        if namespace is None:
            return None  # Hello, Stats (filtered per namespace)
        t = type(request)
        if t is Set or t is SetMany or t is Delete or t is Touch:
            need = "write"
        elif t is Open and namespace not in self.core.namespaces:
            need = "write"  # opening a namespace that does not exist creates it
        else:
            need = "read"
        if sec.allowed(user, namespace, need):
            return None
        return Error("AccessDenied",
                     f"{_who(sec, user)} may not {need} namespace {namespace!r}")

    def _on_snapshot(self, envelope: list[bytes], request: Snapshot, now: float) -> None:
        seen = self._seen_nonces.pop(request.nonce, None)
        if seen is not None and seen == request.namespace:
            # Started after the turn: the state is then what the turn's flush made durable.
            self._ready_snapshots.append((envelope, request))
            return
        if len(self._pending_snapshots) >= MAX_PENDING_SNAPSHOTS:
            self._send_reply(envelope, Error("StorageError", "too many pending snapshots"))
            return
        peer = envelope[0]
        if sum(1 for env, _, _ in self._pending_snapshots.values() if env[0] == peer) \
                >= MAX_PENDING_SNAPSHOTS_PER_PEER:
            self._send_reply(envelope, Error(
                "StorageError", f"more than {MAX_PENDING_SNAPSHOTS_PER_PEER} snapshot requests "
                "of this peer are waiting for their barrier"))
            return
        self._pending_snapshots[request.nonce] = (envelope, request, now)

    def _send_reply(self, envelope: list[bytes], reply: Reply, extra: bytes | None = None
                    ) -> None:
        if self._in_turn:  # held back until the turn's log flush succeeded
            self._held.append((envelope, reply))
            return
        if self.group is not None and type(reply) is WriteOk:
            reply = msgspec.structs.replace(reply, term=self.group.g.term)
        if self.drop_write_replies > 0 and type(reply) is WriteOk:
            self.drop_write_replies -= 1
            log.info("fault injection: dropping a write reply")
            return
        frames = [*envelope, self._replies.encode(reply)]
        if extra is not None:
            frames.append(extra)
        try:
            self._router.send_multipart(frames, _NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (peer not reading)
            log.info("reply to a vanished or full peer dropped: %s", exc)
