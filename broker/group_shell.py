"""The I/O of a broker-group member: the replication sockets, the etcd threads, the TERM file.

Everything it decides comes from ``broker.group.GroupCore``; this module moves messages and
time in and out, and runs on the broker's loop thread except for two etcd threads:

- the *lease* thread grants the member's lease, puts ``members/<name>`` under it and keeps it
  alive every TTL/3; a lost lease is reported to the loop (the primary then steps down) and a
  new one granted;
- the *action* thread runs the etcd calls the core asks for (the campaign transaction, the
  sync-set CAS guarded by the leader key, a revoke), which may block for seconds;
- the etcd watch (its own thread, from ``EtcdCoordinator``) reports every change of the
  group's keys.

They talk to the loop only through ``self._inbox`` (a queue the loop drains each turn); sockets
are touched by the loop thread alone.

Sockets: the primary's replication ROUTER (bound on ``repl_endpoint``, always open) receives
Follow and Ack from standbys and sends Install and Append; a standby's DEALER (identity
``<member>#<token>``, new for every connection) connects to the followed primary's replication
endpoint; the primary routes to the connection a member last followed on and hears that member
only there.

Who may speak on the link (docs/security.md, docs/groups.md): with ``--config`` the ROUTER is a
CURVE server in a ZAP domain of its own that admits only the ``[members]`` keys, every message
must carry the User-Id of the member it names, and a standby's DEALER accepts only the followed
primary's listed key as the server's. Without ``--config`` the link is loopback-only and its
peers are not authenticated, so what a message could change is bounded instead: Install and
Append count only on the DEALER to the followed primary (nobody else can write to it), and a
Refuse of a higher term only makes the primary read the group's keys from etcd, which alone
decides whether its term is over.

The commit rule lives in ``commit``: the turn's records are shipped, appended and flushed
locally, and then only the replication link is served until every sync-set member acked them
(or the term ended: then nothing of the turn is answered).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from broker.access import user_id
from broker.coordination import (
    Absent,
    CoordinationError,
    EtcdCoordinator,
    EtcdTLS,
    GroupConfig,
    GroupKeys,
    InvalidGroupValue,
    KeyValue,
    Lease,
    LeaseLost,
    MemberRecord,
    ModRevisionIs,
    Put,
    ValueIs,
    WatchEvent,
)
from broker.durable import DurableLog
from broker.errors import ProtocolError, StorageError
from broker.group import (
    Action,
    BecomePrimary,
    BecomeStandby,
    Campaign,
    ChangeConfig,
    FollowPrimary,
    GroupCore,
    HandOff,
    PersistTerm,
    Verdict,
)
from broker.install import install_image
from broker.protocol import Hello, NotPrimary, Reply, Stats
from broker.records import LogRecord
from broker.recovery import TERM_FILE, apply_record, write_small_file
from broker.replication import (
    Ack,
    Append,
    Follow,
    Install,
    InstallImage,
    Refuse,
    ReplCodec,
    ReplMessage,
    RetainedLog,
    chunks,
)
from broker.switchover import SwitchoverRequest, switchover_key
from broker.turn import Turn, persist
from broker.zmtp import NOBLOCK, POLLIN, readable, recv_message, send_message

if TYPE_CHECKING:
    from broker.server import Broker

log = logging.getLogger("sharedmem.broker.group")

FOLLOW_RETRY = 1.0  # seconds of silence before a standby not yet installed sends Follow again
# (a Follow can reach the new primary before it has learnt it won: then it is ignored)
INSTALL_GRACE = 2 * FOLLOW_RETRY  # a repeated Follow this soon after an Install is not one more
REPL_HWM = 100_000  # messages queued per follower before it counts as gone
RECONNECT_AFTER = 3 * FOLLOW_RETRY  # unanswered Follows for this long: reconnect the DEALER
REFUSE_CHECK_EVERY = 0.5  # seconds: an unauthenticated Refuse asks etcd at most this often
TIMERS_EVERY = 0.005  # seconds: the link's timers run at most this often between turns


def default_repl_endpoint(endpoint: str) -> str:
    """The replication endpoint beside a request endpoint: tcp port + 2."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"a group member needs a tcp:// --bind, got {endpoint!r}")
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if port in ("0", "*"):
        raise ValueError("a group member needs a fixed --bind port (or --repl-bind)")
    return f"tcp://{host}:{int(port) + 2}"


@dataclass(frozen=True)
class GroupSettings:
    """The command line's group options (docs/groups.md)."""

    group: str
    member: str
    etcd: tuple[str, ...]
    lease_ttl: int = 2
    min_sync: int = 1
    repl_bind: str | None = None
    ack_timeout: float | None = None  # default: the lease TTL
    etcd_tls: EtcdTLS | None = None  # --etcd-cacert/--etcd-cert/--etcd-key

    def __post_init__(self) -> None:
        if self.lease_ttl < 1:
            raise ValueError(f"--lease-ttl must be >= 1 second, got {self.lease_ttl}")
        if self.min_sync < 0:
            raise ValueError(f"--min-sync must be >= 0, got {self.min_sync}")
        if self.etcd_tls is not None:
            self.etcd_tls.check_endpoints(self.etcd)


@dataclass
class _AppendBatch:
    """A standby's run of Appends drained in one pass: their records (appended to the log,
    flushed once) and the lsn to ack for them (-1: nothing to ack)."""

    records: list[LogRecord] = field(default_factory=list)
    appends: int = 0  # Appends with records in the run
    term: int = 0
    lsn: int = -1
    failed: bool = False  # an append to the log failed: follow again, ack nothing


class GroupShell:
    """A broker's group membership; ``Broker`` calls the hooks below from its loop."""

    def __init__(self, settings: GroupSettings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.keys = GroupKeys(settings.group)
        self.member = settings.member
        self.codec = ReplCodec()
        self.g = GroupCore(settings.member, min_sync=settings.min_sync,
                           ack_timeout=settings.ack_timeout or float(settings.lease_ttl))
        self.members: dict[str, MemberRecord] = {}
        self.repl_endpoint = ""
        self.stop_requested = False
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._outbox: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._lease: Lease | None = None
        self._lease_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._watch: Any = None
        self._etcd: EtcdCoordinator | None = None
        self._said_ineligible: tuple[int, str] | None = None
        self._router: zmq.Socket | None = None
        self._dealer: zmq.Socket | None = None
        self._dealer_target: tuple[str, int] | None = None  # (primary, term) connected to
        self._want_follow: tuple[str, int] | None = None
        self._last_follow = 0.0
        self._last_heard = 0.0  # standby: when the followed primary last sent anything
        self._installs: dict[str, float] = {}  # primary: when each follower's Install went
        self._primary_lsn = 0  # standby: the primary's lsn as its last Append showed it
        self._install_parts: list[bytes] = []
        self._install_key: tuple[int, int] | None = None
        self._next_link_beat = 0.0
        self._ctl: zmq.Socket | None = None
        # When the last keepalive that succeeded began (written by the lease thread, read by
        # the loop: one float, no lock needed).
        self._etcd_ok_at = time.monotonic()
        self._last_refuse_check = 0.0
        self._dealer_since = 0.0
        self._routes: dict[str, bytes] = {}  # primary: member -> identity it followed on
        self._poller: zmq.Poller | None = None
        self._commit_poller: zmq.Poller | None = None
        self._next_timers = 0.0
        self.steps_down = 0
        self.append_batches = 0  # standby: fsyncs of shipped records
        self.largest_append_batch = 0  # standby: most Appends made durable by one fsync

    # ------------------------------------------------------------------ lifecycle (loop)

    @property
    def durable(self) -> DurableLog:
        log_ = self.broker.core.log
        assert isinstance(log_, DurableLog), "a group member needs --data-dir"
        return log_

    def attach(self, ctx: zmq.Context, ctl: zmq.Socket) -> None:
        """Open the replication ROUTER, read TERM, start the etcd threads (loop thread, at
        start-up after recovery)."""
        self._ctx, self._ctl = ctx, ctl
        self.g.promised = read_term(self.durable.data_dir)
        self.g.epoch = self.broker.core.epoch
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No ROUTER_HANDOVER: a standby's identity is new on every connection (see _follow),
        # so none is needed, and a second connection claiming a connected identity is
        # refused rather than handed the route (libzmq 4.3.5 aborted with "!_io_error
        # (stream_engine_base.cpp:310)" when a route was handed over under traffic).
        router.setsockopt(zmq.SNDHWM, REPL_HWM)
        router.setsockopt(zmq.RCVHWM, REPL_HWM)
        router.setsockopt(zmq.MAXMSGSIZE, self.broker.config.max_message_bytes)
        router.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self.broker.access.secure_replication(router)  # member keys only (before the bind)
        bind = self.settings.repl_bind or default_repl_endpoint(self.broker.endpoints[0])
        router.bind(bind)
        self.repl_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router = router
        self._etcd = EtcdCoordinator(self.settings.etcd, tls=self.settings.etcd_tls)
        for target, name in ((self._lease_loop, "lease"), (self._action_loop, "action")):
            t = threading.Thread(target=target, name=f"sharedmem-group-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("group %s member %s: replication on %s, promised term %d",
                 self.settings.group, self.member, self.repl_endpoint, self.g.promised)

    def register(self, poller: zmq.Poller) -> None:
        """The loop's poller: the replication sockets are polled with the broker's."""
        self._poller = poller
        assert self._router is not None
        poller.register(self._router, zmq.POLLIN)

    def close(self) -> None:
        """Stop the threads, revoke the lease (a clean exit hands leadership on at once)."""
        self._stop.set()
        self._outbox.put(None)
        for t in self._threads:
            t.join(10)
        if self._watch is not None:
            self._watch.cancel()
        with self._lease_lock:
            lease, self._lease = self._lease, None
        if self._etcd is not None:
            if lease is not None:
                try:
                    self._etcd.revoke(lease)
                except CoordinationError as exc:
                    log.warning("could not revoke the lease at exit: %s", exc)
            self._etcd.close()
        for s in (self._router, self._dealer):
            if s is not None:
                s.close(linger=0)
        self._router = self._dealer = None

    # ------------------------------------------------------------------ hooks of the loop

    @property
    def is_primary(self) -> bool:
        return self.g.is_primary

    def fresh(self, now: float) -> bool:
        return self.g.fresh(now)

    def timeout_ms(self) -> int:
        """The loop wakes at least this often in group mode (to drain the etcd inbox)."""
        return 20

    def refusal(self, request: object) -> Reply | None:
        """A standby (or a primary handing over) answers every request but Hello and Stats
        with NotPrimary."""
        if type(request) is Hello or type(request) is Stats:
            return None
        if self.g.handing_over:
            # Not itself (a client would come straight back), nor yet the target (it refuses
            # until it has seen the hand-off): nobody, so clients back off and rotate.
            return NotPrimary(self.g.known_term, "")
        if self.g.is_primary:
            return None
        return self.not_primary()

    def not_primary(self) -> NotPrimary:
        """The refusal a standby gives: its known term and the primary it believes in."""
        return NotPrimary(self.g.known_term, self._primary_endpoint())

    def hello_fields(self) -> dict[str, Any]:
        members = [r.endpoints[0] for _, r in sorted(self.members.items()) if r.endpoints]
        return {"term": self.g.known_term, "primary": self._primary_endpoint(),
                "members": members}

    def _primary_endpoint(self) -> str:
        if self.g.is_primary:
            return self.broker.endpoints[0]
        p = self.g.primary
        rec = self.members.get(p) if p is not None else None
        return rec.endpoints[0] if rec is not None and rec.endpoints else ""

    def stats(self) -> dict[str, int]:
        g = self.g
        counters = {
            "group_primary": int(g.is_primary),
            "group_term": g.known_term,
            "group_lsn": g.lsn,
            "group_sync_set": len(g.sync_set),
            "group_in_sync_set": int(self.member in g.sync_set),
            "group_followers": len(g.followers),
            "group_steps_down": self.steps_down,
            "group_append_batches": self.append_batches,
            "group_largest_append_batch": self.largest_append_batch,
        }
        if g.is_primary:
            counters["group_max_lag"] = max(
                (g.lsn - max(f.acked, 0) for f in g.followers.values()), default=0)
        else:
            # Records behind the followed primary, as its last Append showed (-1: unknown).
            counters["group_lag"] = max(0, self._primary_lsn - g.lsn) if g.installed else -1
        return counters

    def member_table(self, now: float) -> dict[str, dict[str, int | str]]:
        """Each member as this one sees it (``StatsReply.group``, ``sharedmem stats``, the
        metrics). Only the primary knows every follower's acked position; a standby reports
        itself and the primary's position as its last Append showed it. Members known only from
        their ``members/`` record in etcd are "unknown" (role) with -1 for what is not known."""
        g = self.g
        sync = set(g.sync_set)
        table: dict[str, dict[str, int | str]] = {}
        for name, rec in self.members.items():
            table[name] = {"role": "unknown", "term": rec.term, "seq": -1, "lag": -1,
                           "sync": int(name in sync)}
        for name in sync:
            table.setdefault(name, {"role": "unknown", "term": -1, "seq": -1, "lag": -1,
                                    "sync": 1})
        if g.is_primary:
            table[self.member] = {"role": "primary", "term": g.term, "seq": g.lsn, "lag": 0,
                                  "sync": 0}
            for name, f in g.followers.items():
                live = now - f.last_ack <= g.ack_timeout
                table[name] = {"role": "standby" if f.installed and live else "unknown",
                               "term": g.term, "seq": f.acked,
                               "lag": g.lsn - max(f.acked, 0) if f.installed else -1,
                               "sync": int(name in sync)}
            return table
        installed = g.installed and g.following is not None
        table[self.member] = {"role": "standby", "term": g.known_term,
                              "seq": g.lsn if installed else -1,
                              "lag": max(0, self._primary_lsn - g.lsn) if installed else -1,
                              "sync": int(self.member in sync)}
        if g.primary is not None and g.primary != self.member:
            table[g.primary] = {"role": "primary", "term": g.term,
                                "seq": self._primary_lsn if installed else -1, "lag": 0,
                                "sync": 0}
        return table

    def on_poll(self, ready: dict[Any, int], now: float) -> None:
        """Between turns: the etcd inbox, the replication sockets, the link's timers (at most
        every TIMERS_EVERY: they act on timeouts of 0.25 s and more, and running them on every
        pass put a sync-set evaluation before each write's shipping)."""
        self._drain_inbox(now)
        if self._router is not None and self._router in ready:
            self._drain_router(now)
        if self._dealer is not None and self._dealer in ready:
            self._drain_dealer(now)
        if now >= self._next_timers:
            self._next_timers = now + TIMERS_EVERY
            self._timers(now)

    def commit(self, turn: Turn) -> bool:
        """The commit rule (docs/groups.md) for one turn of the primary: ship, append and
        flush, then serve only the replication link until every sync-set member acked the
        turn. True: send the turn's replies and publishes. False: send nothing (the term
        ended, the flush failed after shipping, or the broker is stopping)."""
        g = self.g
        n = len(turn.records)
        first = g.appended(n)
        if n:
            self._ship(Append(g.term, first, turn.records))
        if not persist(self.broker.core, self.broker.core.log, turn):
            # Shipped already: a standby may hold what the refusals would deny. Answer nothing
            # and hand the term on (the writers' retries find the outcome).
            self._do(g.step_down("the local log flush failed after the turn was shipped"))
            return False
        return self._wait_commit(g.lsn)

    # ------------------------------------------------------------------ the commit wait

    def _wait_commit(self, target: int) -> bool:
        g = self.g
        router, ctl = self._router, self._ctl
        assert router is not None and ctl is not None
        poller = self._commit_poller
        if poller is None:  # made once: a Poller per turn is a cost on every commit
            poller = self._commit_poller = zmq.Poller()
            poller.register(router, POLLIN)
            poller.register(ctl, POLLIN)
        while True:
            if not g.is_primary:
                log.warning("term %d ended with a turn unacknowledged: its writes are answered "
                            "by nobody (retries find their outcome)", g.term)
                return False
            if g.committed(target):
                g.last_sync_ok = time.monotonic()
                return True
            ready = dict(poller.poll(20))
            if ctl in ready:
                self.stop_requested = True
                return False
            now = time.monotonic()
            self._drain_inbox(now)
            if router in ready:
                self._drain_router(now)
                if g.is_primary and g.committed(target):
                    continue  # reply first: the timers can wait for the loop's next pass
            if now >= self._next_timers:  # (an ack already ran the core's tick)
                self._next_timers = now + TIMERS_EVERY
                self._timers(now)

    # ------------------------------------------------------------------ actions

    def _do(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, PersistTerm):
                write_small_file(self.durable.data_dir / TERM_FILE, f"{a.term}\n")
            elif isinstance(a, (Campaign, ChangeConfig, HandOff)):
                self._outbox.put(a)
            elif isinstance(a, BecomePrimary):
                self._close_dealer()
                self.broker.core.term = a.term
                log.warning("member %s is the primary of group %s, term %d", self.member,
                            self.settings.group, a.term)
                self._outbox.put(("member",))
            elif isinstance(a, BecomeStandby):
                self.steps_down += 1
                log.warning("member %s steps down from term %d: %s", self.member, self.g.term,
                            a.reason)
                # Give the leader key up at once (if the lease still exists), so the eligible
                # members campaign now instead of after the TTL; a new lease follows.
                self._outbox.put(("revoke",))
            elif isinstance(a, FollowPrimary):
                self._want_follow = (a.primary, a.term)
                self._primary_lsn = 0
                self._install_key, self._install_parts = None, []
                self._follow(time.monotonic())

    def _drain_inbox(self, now: float) -> None:
        g = self.g
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = item[0]
            if kind == "config":
                self._do(g.on_config(item[1], item[2]))
                self._say_why_not_campaigning()
            elif kind == "leader":
                self._do(g.on_leader(item[1], item[2]))
                self._say_why_not_campaigning()
            elif kind == "member":
                name, record = item[1], item[2]
                if record is None:
                    self.members.pop(name, None)
                else:
                    self.members[name] = record
                    if self._want_follow is not None and self._want_follow[0] == name:
                        self._follow(now)
            elif kind == "lease_lost":
                self._do(g.on_lease_lost())
            elif kind == "campaign":
                self._do(g.on_campaign_result(item[1], item[2]))
            elif kind == "changed":
                if item[1]:
                    log.info("sync set now %s (term %d)",
                             ",".join(g.changing.config.sync_set) if g.changing else "?",
                             g.term)
                self._do(g.on_config_changed(item[1], item[2]))
            elif kind in ("switchover", "handoff"):
                self._on_switchover_item(item, now)

    def _say_why_not_campaigning(self) -> None:
        """With no leader, tell the operator once per config why this member waits instead of
        campaigning (a group that stays without a primary is otherwise a mystery)."""
        g = self.g
        if g.is_primary or not g.leader_known or g.leader is not None or not g.config_known:
            return
        why = g.ineligible_reason()
        if why and self._said_ineligible != (g.config_revision, why):
            self._said_ineligible = (g.config_revision, why)
            log.warning("group %s has no leader; %s does not campaign: %s", self.settings.group,
                        g.member, why)

    # ------------------------------------------------------------------ primary side

    def _ship(self, message: Append) -> None:
        body = self.codec.encode(message)
        for member in list(self.g.followers):
            self._send_to(member, body)

    def _send_to(self, member: str, body: bytes) -> bool:
        assert self._router is not None
        route = self._routes.get(member)
        error: object = "no connection followed as it"
        if route is not None:
            try:
                send_message(self._router, (route, body))
                return True
            except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
                error = exc
        log.info("follower %s dropped (%s): it must follow again", member, error)
        self.g.forget_follower(member)
        self._routes.pop(member, None)
        return False

    def _drain_router(self, now: float) -> None:
        router = self._router
        assert router is not None
        for _ in range(10_000):
            if not readable(router):
                return
            try:
                frames = recv_message(router)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("replication: dropping a %d-frame message", len(frames))
                continue
            identity, body = frames[0].bytes, frames[1].bytes
            # A standby's routing identity is "<member>#<token>", new for every connection.
            name = identity.partition(b"#")[0].decode(errors="replace")
            secured = self.broker.access.security is not None
            if secured:
                # The key that completed the handshake names the member; the routing identity
                # (chosen by the peer) must claim that name, or the message is dropped.
                peer = self.broker.access.member(user_id(frames[1]))
                if peer is None or name != peer:
                    log.warning("replication: dropping a message from %s as %r",
                                f"member {peer}" if peer else "an unknown key",
                                identity.decode(errors="replace"))
                    continue
            msg = self._decode(body)
            if msg is None:
                continue
            # Only the connection a member last followed on speaks for it (its route).
            on_route = self._routes.get(name) == identity
            if type(msg) is Ack:
                if on_route and msg.member == name:
                    self._do(self.g.on_ack(msg.member, msg.term, msg.lsn, now))
            elif type(msg) is Follow:
                if msg.member != name:
                    continue
                sent = self._installs.get(msg.member)
                f = self.g.followers.get(msg.member)
                if on_route and sent is not None and now - sent < INSTALL_GRACE \
                        and f is not None and not f.installed:
                    continue  # its Install is on the way: a full state is costly to rebuild
                if self.g.on_follow(msg.member, msg.term, now):
                    self._routes[msg.member] = identity
                    self._installs[msg.member] = now
                    self._install(msg.member)
            elif type(msg) is Refuse:
                # Only from a follower's link: a stray peer must not end the term.
                if not on_route or name not in self.g.followers:
                    continue
                if secured:  # an authenticated member: its promise is evidence
                    self._do(self.g.on_refuse(msg.term))
                elif msg.term > self.g.term and now - self._last_refuse_check \
                        >= REFUSE_CHECK_EVERY:
                    # Unauthenticated (anyone local can claim a member's identity): the term
                    # it announces is only a reason to ask etcd, whose config decides.
                    self._last_refuse_check = now
                    log.warning("replication: an unauthenticated Refuse of term %d as %r: "
                                "asking etcd whether term %d ended", msg.term,
                                identity.decode(errors="replace"), self.g.term)
                    self._outbox.put(("check",))
            else:
                log.warning("replication: unexpected %s from a follower", type(msg).__name__)

    def _decode(self, body: bytes) -> ReplMessage | None:
        """A replication message, or None for garbage (logged): it never ends the loop."""
        try:
            return self.codec.decode(body)
        except ProtocolError as exc:
            log.warning("replication: %s", exc)
            return None

    def _install(self, member: str) -> None:
        """Send ``member`` the whole state at the current lsn (v1: every join is in full)."""
        core, g = self.broker.core, self.g
        mono, wall = time.monotonic(), time.time()
        build = core.frozen_view(0, mono, wall)
        # Built here, on the loop thread, so the copy cannot advance turn by turn as a
        # compaction's does: complete it now (an Install stalls this one turn).
        core.finish_freezes()
        snapshot = build()
        retained = []
        log_ = core.log
        for name in core.namespaces:
            first = log_.first_seq(name)
            if first is not None:
                events = log_.read(name, first, self.broker.config.log_retention, mono)
                if events:
                    retained.append(RetainedLog(name, events))
        data = self.codec.encode_image(InstallImage(snapshot, retained))
        parts = chunks(data)
        log.info("installing %s: %d bytes in %d chunks at lsn %d of term %d", member,
                 len(data), len(parts), g.lsn, g.term)
        for i, part in enumerate(parts):
            body = self.codec.encode(Install(g.term, g.lsn, i, i == len(parts) - 1, part))
            if not self._send_to(member, body):
                return

    def _timers(self, now: float) -> None:
        g = self.g
        if g.is_primary and now - self._etcd_ok_at > self.settings.lease_ttl \
                and not g.fresh(now):
            # Cut off: etcd has not answered for a TTL (the lease is gone or going) and the
            # sync set is not acking, so nothing can commit here; give the role up rather than
            # hold writers on a term that has likely ended.
            self._do(g.step_down(f"no etcd for {now - self._etcd_ok_at:.1f}s and no sync "
                                 "acks: cut off"))
        if g.is_primary:
            if now >= self._next_link_beat:
                # The link's heartbeat: followers ack their position, so a silent one is
                # removed from the sync set even while no write comes.
                self._next_link_beat = now + min(0.25, g.ack_timeout / 4)
                self._ship(Append(g.term, g.lsn + 1, []))
            self._do(g.tick(now))
        elif self._want_follow is not None:
            if g.installed and now - self._last_heard > g.ack_timeout:
                # The primary beats every ack_timeout/4: silence means the link broke (or this
                # process was paused) and the primary has dropped this follower.
                log.warning("no word from the primary for %.1fs: following again",
                            now - self._last_heard)
                g.installed = False
                # On a new connection: the old one may be alive at the TCP level but routed
                # nowhere (a peer that claimed this member's identity took the route over).
                self._close_dealer()
                self._follow(now)
            elif not g.installed and now - max(self._last_follow, self._last_heard) \
                    >= FOLLOW_RETRY:  # install chunks arriving count as progress
                if now - max(self._last_heard, self._dealer_since) > RECONNECT_AFTER:
                    self._close_dealer()  # Follows unanswered this long: a new connection
                self._follow(now)

    # ------------------------------------------------------------------ standby side

    def _follow(self, now: float) -> None:
        """(Re)connect to the wanted primary's replication endpoint and send Follow."""
        target = self._want_follow
        if target is None or self.g.is_primary:
            return
        primary, term = target
        record = self.members.get(primary)
        if record is None or len(record.endpoints) < 3:
            return  # its member record has not been seen yet: retried when it arrives
        if self._dealer is None or self._dealer_target != target:
            self._close_dealer()
            dealer = self._ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            # A new identity per connection: the primary routes to the one that last sent
            # Follow, so a reconnect never waits for the old connection to be noticed gone.
            dealer.setsockopt(zmq.IDENTITY, f"{self.member}#{secrets.token_hex(4)}".encode())
            dealer.setsockopt(zmq.RCVHWM, REPL_HWM)
            dealer.setsockopt(zmq.SNDHWM, REPL_HWM)
            dealer.setsockopt(zmq.MAXMSGSIZE, self.broker.config.max_message_bytes)
            dealer.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
            if not self.broker.access.secure_follower(dealer, primary):
                dealer.close(linger=0)
                log.error("cannot follow %s: it has no key in the config's [members]", primary)
                return
            try:
                dealer.connect(record.endpoints[2])
            except zmq.ZMQError as exc:  # a member record is data from etcd: never trusted
                dealer.close(linger=0)
                log.warning("cannot follow %s at %r: %s", primary, record.endpoints[2], exc)
                return
            self._dealer, self._dealer_target = dealer, target
            self._dealer_since = now
            if self._poller is not None:
                self._poller.register(dealer, zmq.POLLIN)
        self._last_follow = now
        self._install_key, self._install_parts = None, []
        try:
            self._dealer.send(self.codec.encode(Follow(self.member, term,
                                                       self.broker.core.epoch)), NOBLOCK)
        except zmq.Again:
            pass  # retried after FOLLOW_RETRY
        log.info("following %s (term %d) at %s", primary, term, record.endpoints[2])

    def _close_dealer(self) -> None:
        if self._dealer is not None:
            if self._poller is not None:
                self._poller.unregister(self._dealer)
            self._dealer.close(linger=0)
        self._dealer, self._dealer_target = None, None

    def _reply(self, message: Ack | Refuse | Follow) -> None:
        if self._dealer is None:
            return
        try:
            self._dealer.send(self.codec.encode(message), NOBLOCK)
        except zmq.Again:
            log.info("replication link full: %s dropped", type(message).__name__)

    def _drain_dealer(self, now: float) -> None:
        """Everything the primary has sent so far, with one fsync and one Ack for a run of
        Appends: the standby's group commit. Appends queue up here whenever this standby fell
        behind (paused, slow disk, or outside the sync set while the primary commits without
        it), and the next pass makes them all durable at once instead of one fsync each."""
        batch = _AppendBatch()
        for _ in range(10_000):
            dealer = self._dealer
            if dealer is None:
                break
            # Checking EVENTS is cheaper than ending every drain with a zmq.Again.
            if not readable(dealer):
                break
            try:
                body = dealer.recv(NOBLOCK)
            except zmq.Again:
                break
            self._last_heard = now
            msg = self._decode(body)
            if msg is None:
                continue
            if type(msg) is Append:
                if not self._on_append(msg, now, batch):
                    self._commit_batch(batch, now)  # what came before, then follow again
                    return
            elif type(msg) is Install:
                self._commit_batch(batch, now)
                batch = _AppendBatch()
                self._on_install(msg, now)
            else:
                log.warning("replication: unexpected %s from the primary", type(msg).__name__)
        self._commit_batch(batch, now)

    def _refuse(self) -> None:
        self._reply(Refuse(self.g.promised, self.g.primary or ""))

    def _on_install(self, msg: Install, now: float) -> None:
        verdict = self.g.check_install(msg.term)
        if verdict is Verdict.REFUSE:
            self._refuse()
            return
        if verdict is not Verdict.APPLY or self.g.installed:
            return
        key = (msg.term, msg.lsn)
        if msg.chunk == 0:
            self._install_key, self._install_parts = key, []
        if self._install_key != key or msg.chunk != len(self._install_parts):
            return  # a piece of another (older) install
        self._install_parts.append(msg.data)
        if not msg.last:
            return
        data = b"".join(self._install_parts)
        self._install_key, self._install_parts = None, []
        try:
            image = self.codec.decode_image(data)
            install_image(self.broker.core, self.durable, image)
        except (ProtocolError, StorageError, OSError) as exc:
            log.error("install from the primary failed (%s): following again", exc)
            self._last_follow = 0.0
            return
        self.g.epoch = self.broker.core.epoch
        self.g.installed_at(msg.lsn)
        self._last_heard = time.monotonic()
        self._reply(Ack(self.member, msg.term, msg.lsn))

    def _on_append(self, msg: Append, now: float, batch: _AppendBatch) -> bool:
        """Take one Append into ``batch`` (its records are appended to the log, not yet
        flushed). False: the link must start over (a gap), after what the batch holds."""
        g = self.g
        verdict = g.check_append(msg.term, msg.first_lsn)
        if msg.term == g.term:
            self._primary_lsn = max(self._primary_lsn, msg.first_lsn + len(msg.records) - 1)
        if verdict is Verdict.REFUSE:
            self._refuse()
            return True
        if verdict is Verdict.GAP:
            log.warning("replication gap at lsn %d (have %d): following again",
                        msg.first_lsn, g.lsn)
            self._commit_batch(batch, now)
            g.installed = False
            self._follow(now)
            return False
        if verdict is not Verdict.APPLY:
            return True
        if msg.records:
            try:
                self.durable.append_records(msg.records, now)
            except StorageError as exc:
                log.error("standby log: %s; following again", exc)
                batch.failed = True
                return False
            batch.records.extend(msg.records)
            batch.appends += 1
        batch.term, batch.lsn = msg.term, g.applied(len(msg.records))
        return True

    def _commit_batch(self, batch: _AppendBatch, now: float) -> None:
        """Flush the batch's records once (fsync), apply them, and ack its last lsn: the Ack
        still means durable and applied, for every Append it covers."""
        records, lsn, appends = batch.records, batch.lsn, batch.appends
        batch.records, batch.lsn, batch.appends = [], -1, 0
        if batch.failed:
            batch.failed = False
            self._refollow(now)
            return
        if lsn < 0:
            return
        if records:
            try:
                self.durable.flush()
            except StorageError as exc:
                log.error("standby log: %s; not acknowledged, following again", exc)
                self._refollow(now)
                return
            self.append_batches += 1
            self.largest_append_batch = max(self.largest_append_batch, appends)
            core = self.broker.core
            mono, wall = time.monotonic(), time.time()
            try:
                for rec in records:
                    apply_record(core, rec, core.epoch, mono, wall, fetch_log=False)
            except Exception:  # noqa: BLE001 - a diverged state: take a full Install
                log.exception("standby could not apply shipped records: following again")
                self._refollow(now)
                return
        self._reply(Ack(self.member, batch.term, lsn))

    def _refollow(self, now: float) -> None:
        self.g.installed = False
        self._follow(now)

    # ------------------------------------------------------------------ etcd threads

    def _record(self) -> MemberRecord:
        return MemberRecord(name=self.member,
                            endpoints=(self.broker.endpoints[0], self.broker.pub_endpoints[0],
                                       self.repl_endpoint),
                            term=self.g.known_term, seq=self.g.lsn)

    def _lease_loop(self) -> None:
        etcd = self._etcd
        assert etcd is not None
        ttl = self.settings.lease_ttl
        started = False
        while not self._stop.is_set():
            try:
                with self._lease_lock:
                    lease = self._lease
                if lease is None:
                    lease = etcd.grant_lease(ttl)
                    etcd.put(self.keys.member(self.member), self._record().encode(), lease)
                    with self._lease_lock:
                        self._lease = lease
                    log.info("lease %x granted (ttl %ds)", lease.id, lease.ttl)
                if not started:
                    self._start_watch()
                    started = True
                began = time.monotonic()
                etcd.keepalive(lease)
                self._etcd_ok_at = began
            except LeaseLost as exc:
                log.warning("lease lost: %s", exc)
                with self._lease_lock:
                    self._lease = None
                self._inbox.put(("lease_lost",))
                continue
            except CoordinationError as exc:  # unreachable: no evidence of anything
                log.warning("etcd: %s", exc)
            self._stop.wait(max(0.1, (lease.ttl if lease else ttl) / 3))

    def _start_watch(self) -> None:
        etcd = self._etcd
        assert etcd is not None
        current = etcd.get_prefix(self.keys.prefix)
        seen_leader = seen_config = False
        for kv in current.kvs:
            self._observe(WatchEvent("PUT", kv.key, kv.value, kv.mod_revision))
            seen_leader |= kv.key == self.keys.leader
            seen_config |= kv.key == self.keys.config
        if not seen_config:
            self._inbox.put(("config", None, 0))
        if not seen_leader:
            self._inbox.put(("leader", None, current.revision))
        self._watch = etcd.watch(self.keys.prefix, self._observe, prefix=True,
                                 start_revision=current.revision + 1)

    def _observe(self, event: WatchEvent) -> None:
        """A key of the group changed (watch thread): hand it to the loop."""
        keys = self.keys
        put = event.kind == "PUT"
        try:
            if event.key == keys.leader:
                self._inbox.put(("leader", event.value.decode() if put else None,
                                 event.mod_revision))
            elif event.key == keys.config:
                cfg = GroupConfig.decode(event.value) if put else None
                self._inbox.put(("config", cfg, event.mod_revision if put else 0))
            elif event.key == switchover_key(keys):
                self._inbox.put(("switchover",
                                 SwitchoverRequest.decode(event.value) if put else None))
            elif event.key.startswith(keys.members_prefix):
                name = keys.member_name(event.key)
                self._inbox.put(("member", name,
                                 MemberRecord.decode(event.value) if put else None))
        except (InvalidGroupValue, UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring an unreadable value of %s: %s", event.key, exc)

    def _action_loop(self) -> None:
        etcd = self._etcd
        assert etcd is not None
        keys = self.keys
        while not self._stop.is_set():
            action = self._outbox.get()
            if action is None:
                return
            try:
                if isinstance(action, Campaign):
                    with self._lease_lock:
                        lease = self._lease
                    if lease is None:  # being granted again: campaign once it is there
                        self._stop.wait(0.1)
                        self._inbox.put(("campaign", False, 0))
                        continue
                    # Until answered: a won campaign taken for lost would leave the group
                    # with a leader key held and nobody serving (this member never takes
                    # office in a term it already promised).
                    result = etcd.transact_until_answered(
                        [Absent(keys.leader), ModRevisionIs(keys.config, action.revision)],
                        [Put(keys.leader, self.member.encode(), lease),
                         Put(keys.config, action.config.encode())], self._stop)
                    if not result.succeeded:
                        self._report_current(result.current, result.revision)
                    self._inbox.put(("campaign", result.succeeded, result.revision))
                elif isinstance(action, ChangeConfig):
                    # Until answered: a grow that landed but is taken for failed would stop
                    # counting a member etcd lists in the sync set, and so may elect, while
                    # this primary acknowledges without it. Meanwhile the loop keeps counting
                    # the members the change adds (``changing`` stays in flight).
                    result = etcd.transact_until_answered(
                        [ModRevisionIs(keys.config, action.revision),
                         ValueIs(keys.leader, self.member.encode())],
                        [Put(keys.config, action.config.encode())], self._stop)
                    if not result.succeeded:
                        # What it lost to, so the next proposal is not made on a stale
                        # revision (or the primary learns its leader key is gone).
                        self._report_current(result.current, result.revision)
                    self._inbox.put(("changed", result.succeeded, result.revision))
                elif isinstance(action, HandOff):
                    self._hand_off(etcd, action)
                elif action == ("member",):
                    with self._lease_lock:
                        lease = self._lease
                    if lease is not None:
                        etcd.put(keys.member(self.member), self._record().encode(), lease)
                elif action == ("check",):
                    # A Refuse announced a higher term: what do the leader and config say?
                    current: dict[str, KeyValue | None] = {}
                    leader_read = etcd.get(keys.leader)
                    current[keys.leader] = leader_read.first
                    current[keys.config] = etcd.get(keys.config).first
                    self._report_current(current, leader_read.revision)
                elif action == ("revoke",):
                    with self._lease_lock:
                        lease, self._lease = self._lease, None
                    if lease is not None:
                        etcd.revoke(lease)
            except (CoordinationError, InvalidGroupValue) as exc:
                log.warning("etcd %s failed: %s", type(action).__name__, exc)
                if isinstance(action, Campaign):
                    self._inbox.put(("campaign", False, 0))
                elif isinstance(action, ChangeConfig):
                    self._inbox.put(("changed", False, 0))
                elif isinstance(action, HandOff):
                    self._inbox.put(("handoff", False, 0))


    # ------------------------------------------------------------------ switchover

    def _on_switchover_item(self, item: tuple[Any, ...], now: float) -> None:
        """Loop thread: a switchover request seen in etcd, or the hand-off's outcome."""
        g = self.g
        if item[0] == "handoff":
            succeeded, revision = item[1], item[2]
            target = g.switchover_to
            self._do(g.on_handoff_result(succeeded, revision))
            if succeeded:
                log.warning("switchover: leadership handed to %s (term %d)", target,
                            g.known_term)
            else:
                log.warning("switchover to %s failed: taking writes again", target)
            return
        request: SwitchoverRequest | None = item[1]
        if request is None or not g.is_primary:
            return
        why = g.request_switchover(request.to, request.term, now, request.timeout)
        if why:
            log.warning("switchover to %s refused: %s", request.to, why)
        else:
            log.warning("switchover to %s: taking no new write until it has acked everything",
                        request.to)

    def _hand_off(self, etcd: EtcdCoordinator, action: HandOff) -> None:
        """Action thread: the switchover transaction. The leader key moves to the target's own
        lease (read from its ``members/`` record, which lives under it), so the target keeps
        it alive as if it had won an election; guarded by this member holding the leader key
        and the config being the one the hand-off was decided on."""
        keys = self.keys
        record = etcd.get(keys.member(action.target)).first
        if record is None or not record.lease:
            log.warning("switchover: %s has no live member record", action.target)
            self._inbox.put(("handoff", False, 0))
            return
        result = etcd.transact_until_answered(
            [ValueIs(keys.leader, self.member.encode()),
             ModRevisionIs(keys.config, action.revision)],
            [Put(keys.leader, action.target.encode(), Lease(record.lease, 0)),
             Put(keys.config, action.config.encode())], self._stop)
        if not result.succeeded:
            self._report_current(result.current, result.revision)
        self._inbox.put(("handoff", result.succeeded, result.revision))

    def _report_current(self, current: Mapping[str, KeyValue | None], revision: int) -> None:
        """A failed transaction's read-back of the leader and config keys (as of etcd's
        ``revision``), to the loop."""
        keys = self.keys
        if keys.leader in current:
            leader = current[keys.leader]
            self._inbox.put(("leader", None if leader is None else leader.value.decode(),
                             revision if leader is None else leader.mod_revision))
        config = current.get(keys.config)
        if config is not None:
            self._inbox.put(("config", GroupConfig.decode(config.value), config.mod_revision))


def read_term(data_dir: Path) -> int:
    """The promised term persisted in ``data_dir`` (0 if none)."""
    path = data_dir / TERM_FILE
    return int(path.read_text().strip() or 0) if path.exists() else 0
