"""The decisions of one broker-group member, pure (docs/groups.md).

Owns: the member's role (standby or primary), its term and its promise ("ack nothing below
``promised``", persisted by the shell in the TERM file), the group config as last seen in etcd,
the primary's follower table (per member: installed?, acked lsn, last ack time), the commit
rule, which members to remove from or add to the sync set, eligibility to campaign, and what to
do with an incoming Install/Append/Ack/Refuse of another term.

Must never: open a socket, talk to etcd, read a clock or do file I/O. Every method takes ``now``
(monotonic seconds) where time matters and returns the actions the shell must carry out, in
order. The shell reports back what etcd and the link did.

Rules (why each exists):
- A turn at lsn L is committed only when the config's sync set has at least ``min_sync``
  members and every one of them, and every member being added to it, has acked L. Members being
  added count at once (before their CAS lands), so a member never enters the sync set missing a
  commit made meanwhile; members being removed count until their CAS lands.
- The sync set changes only by a config CAS (the shell's, guarded by the leader key), one at a
  time, and never below ``min_sync``.
- The promise rises before anything else: on seeing a config of a higher term, and before a
  campaign for T+1. An Install or Append of a term below it is refused (``Refuse``), which makes
  a paused or partitioned old primary step down without ever committing again.
- Only an observed absent leader key starts a campaign, and only an eligible member campaigns:
  one in ``config.sync_set``, the config's primary itself, or anyone while no config exists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec

from broker.coordination import GroupConfig


class Role(enum.Enum):
    STANDBY = "standby"
    PRIMARY = "primary"


class Verdict(enum.Enum):
    """What a standby does with an Install or Append."""

    APPLY = "apply"
    REFUSE = "refuse"  # a term below the promise: answer Refuse(promised)
    IGNORE = "ignore"  # not from the primary being followed (or not installed yet): drop it
    GAP = "gap"  # from the right primary but not the next lsn: drop it and Follow again


@dataclass
class FollowerState:
    """The primary's view of one follower."""

    installed: bool = False
    acked: int = -1  # highest lsn acked (-1: nothing, not even the Install)
    last_ack: float = 0.0  # ``now`` of the last ack (or of the Follow)


# ------------------------------------------------------------------------------ actions


@dataclass(frozen=True)
class PersistTerm:
    """Write ``term`` to the TERM file (fsynced) before anything that relies on the promise."""

    term: int


@dataclass(frozen=True)
class Campaign:
    """Run the election transaction: leader absent and config at ``revision`` -> put the
    leader key (own lease) and ``config``."""

    config: GroupConfig
    revision: int


@dataclass(frozen=True)
class ChangeConfig:
    """Config CAS at ``revision`` to ``config`` (a new sync set), guarded by the leader key."""

    config: GroupConfig
    revision: int


@dataclass(frozen=True)
class BecomePrimary:
    term: int


@dataclass(frozen=True)
class BecomeStandby:
    reason: str


@dataclass(frozen=True)
class FollowPrimary:
    """Connect to ``primary``'s replication endpoint and send Follow(term)."""

    primary: str
    term: int


@dataclass(frozen=True)
class HandOff:
    """Switchover: one transaction guarded by the leader key (``leader`` is this member) and
    the config at ``revision``: put the leader key naming ``target`` under the target's own
    lease, and ``config`` (term + 1, primary ``target``, an empty sync set)."""

    config: GroupConfig
    revision: int
    target: str


Action = (PersistTerm | Campaign | ChangeConfig | BecomePrimary | BecomeStandby | FollowPrimary
          | HandOff)


@dataclass
class GroupCore:
    """One member's group state. ``epoch`` is the member's log epoch (the shell updates it after
    an Install); a first primary of a new group writes it into the config."""

    member: str
    min_sync: int = 1
    ack_timeout: float = 2.0
    promised: int = 0
    epoch: str = ""
    role: Role = Role.STANDBY
    term: int = 0  # primary: its term; standby: the term of the primary it follows (0: none)
    lsn: int = 0  # primary: records appended in its term; standby: its position in ``term``
    installed: bool = False  # standby: installed from the primary of ``term``
    following: str | None = None  # standby: the primary it follows
    config: GroupConfig | None = None
    config_revision: int = 0  # the config's mod_revision (0: absent)
    config_known: bool = False
    leader: str | None = None
    leader_known: bool = False
    leader_revision: int = 0  # etcd revision of the newest leader observation taken
    campaigning: bool = False
    pending_campaign: Campaign | None = None
    followers: dict[str, FollowerState] = field(default_factory=dict)
    changing: ChangeConfig | None = None  # the config CAS in flight
    adding: frozenset[str] = frozenset()  # members the CAS in flight adds
    last_sync_ok: float | None = None  # primary: when it last had every sync ack it needs
    switchover_to: str | None = None  # primary: handing leadership to this standby
    switchover_deadline: float = 0.0  # primary: give the switchover up (and write again) then
    handoff: HandOff | None = None  # primary: the switchover transaction in flight
    handoff_term: int = 0  # standby: a config naming it primary of a term it never promised

    def __post_init__(self) -> None:
        if self.min_sync < 0:
            raise ValueError(f"min_sync must be >= 0, got {self.min_sync}")
        if self.ack_timeout <= 0:
            raise ValueError(f"ack_timeout must be > 0, got {self.ack_timeout}")

    # ------------------------------------------------------------------ views

    @property
    def is_primary(self) -> bool:
        return self.role is Role.PRIMARY

    @property
    def sync_set(self) -> tuple[str, ...]:
        return self.config.sync_set if self.config is not None else ()

    @property
    def known_term(self) -> int:
        """The highest term this member knows of (what NotPrimary and HelloReply carry)."""
        return max(self.promised, self.term, self.config.term if self.config else 0)

    @property
    def primary(self) -> str | None:
        """The member believed to lead: this one, or the config's primary while its leader
        key is held."""
        if self.is_primary:
            return self.member
        if self.config is not None and self.leader == self.config.primary:
            return self.config.primary
        return None

    def eligible(self) -> bool:
        """May this member campaign? Only if it cannot lack an acknowledged write."""
        return self.config_known and not self.ineligible_reason()

    def ineligible_reason(self) -> str:
        """Why this member may not campaign ("" if it may, or the config is not read yet)."""
        cfg = self.config
        if cfg is None:
            return ""  # a new group: nothing was ever acknowledged
        if cfg.epoch and self.epoch != cfg.epoch:
            # Its log is not the group's: a wiped or repaired data dir (a new epoch) lacks the
            # acknowledged writes its name in the sync set stands for. It follows until an
            # Install gives it the group's log (and epoch) again.
            return (f"its log has epoch {self.epoch}, the group's is {cfg.epoch} (a wiped or "
                    "repaired data dir): it may lack acknowledged writes")
        if self.member not in cfg.sync_set and cfg.primary != self.member:
            return (f"it is not in the sync set ({', '.join(cfg.sync_set) or 'empty'}) of term "
                    f"{cfg.term}: it may lack acknowledged writes")
        return ""

    def committed(self, lsn: int) -> bool:
        """Is the primary's record ``lsn`` (0: the state it took office with) committed?"""
        if not self.is_primary or len(self.sync_set) < self.min_sync:
            return False
        for m in (*self.sync_set, *self.adding):
            f = self.followers.get(m)
            if f is None or not f.installed or f.acked < lsn:
                return False
        return True

    def fresh(self, now: float) -> bool:
        """Primary: has it had every sync ack it needs within ``ack_timeout``? (Heartbeats go
        out only then, so nodes cut off with a stuck primary see staleness grow.)"""
        return (self.is_primary and self.last_sync_ok is not None
                and now - self.last_sync_ok <= self.ack_timeout)

    # ------------------------------------------------------------------ etcd observations

    def on_config(self, config: GroupConfig | None, revision: int) -> list[Action]:
        """The config key as read or watched (None: absent) at ``revision``."""
        if self.config_known and revision < self.config_revision:
            return []  # older than what is known
        if not self.is_primary:
            # A config naming this member primary of a term it never promised can only be a
            # switchover's hand-off (a campaign names its own campaigner, after its promise).
            self.handoff_term = config.term if (
                config is not None and config.primary == self.member
                and config.term > self.promised) else 0
        self.config, self.config_revision, self.config_known = config, revision, True
        actions: list[Action] = []
        if config is not None and config.term > self.promised:
            self.promised = config.term
            actions.append(PersistTerm(config.term))
        if self.is_primary:
            if config is None or config.term != self.term or config.primary != self.member:
                actions += self.step_down(
                    f"the group config now says term {config.term if config else 0} "
                    f"primary {config.primary if config else None!r}")
            return actions
        return actions + self._evaluate() + self._take_handoff()

    def on_leader(self, name: str | None, revision: int = 0) -> list[Action]:
        """The leader key as read or watched (None: absent, e.g. an observed DELETE) at
        ``revision`` (its mod_revision, a DELETE's revision, or the read's when absent; 0:
        unknown). An observation older than one already taken is dropped: the watch and a
        failed transaction's read-back arrive from two threads, and a stale "X leads" taken
        after the DELETE would keep this member from ever campaigning."""
        if revision and revision < self.leader_revision:
            return []
        self.leader_revision = max(self.leader_revision, revision)
        self.leader, self.leader_known = name, True
        if self.is_primary:
            if name != self.member:
                return self.step_down(f"the leader key is now {name!r}: this lease is gone")
            return []
        return self._evaluate() + self._take_handoff()

    def on_lease_lost(self) -> list[Action]:
        """The member's lease expired or was revoked (its leader key is gone with it)."""
        if self.is_primary:
            return self.step_down("the lease expired")
        return []

    def on_campaign_result(self, won: bool, revision: int) -> list[Action]:
        """The election transaction's outcome; ``revision`` is the store's after it. (On a
        loss, first report what the transaction read back with ``on_leader``/``on_config``, so
        the member does not campaign again on what it already knows to be stale.)"""
        self.campaigning = False
        pending, self.pending_campaign = self.pending_campaign, None
        if not won or pending is None or self.config_revision > revision:
            return self._evaluate()
        self.config, self.config_revision = pending.config, revision
        self.leader = self.member
        self.role, self.term, self.lsn = Role.PRIMARY, pending.config.term, 0
        self.following, self.installed = None, False
        self.followers, self.changing, self.adding = {}, None, frozenset()
        self.last_sync_ok = None
        return [BecomePrimary(self.term)]

    def _evaluate(self) -> list[Action]:
        """Standby: follow the config's primary, or campaign when the leader key is absent."""
        actions: list[Action] = []
        cfg = self.config
        if (cfg is not None and cfg.primary != self.member and cfg.term >= self.promised
                and (self.following != cfg.primary or self.term != cfg.term)):
            self.following, self.term, self.installed, self.lsn = cfg.primary, cfg.term, False, 0
            actions.append(FollowPrimary(cfg.primary, cfg.term))
        if (self.leader_known and self.leader is None and not self.campaigning
                and self.eligible()):
            term = max((cfg.term if cfg else 0) + 1, self.promised)
            if term > self.promised:
                self.promised = term
                actions.append(PersistTerm(term))
            config = GroupConfig(term=term, primary=self.member, sync_set=(),
                                 epoch=cfg.epoch if cfg is not None and cfg.epoch else self.epoch)
            self.pending_campaign = Campaign(config, self.config_revision)
            self.campaigning = True
            actions.append(self.pending_campaign)
        return actions

    def step_down(self, reason: str) -> list[Action]:
        """Primary -> standby: answer nothing more in this term; follow whoever leads next."""
        if not self.is_primary:
            return []
        self.role = Role.STANDBY
        self.followers, self.changing, self.adding = {}, None, frozenset()
        self.switchover_to, self.handoff = None, None
        self.following, self.installed, self.last_sync_ok = None, False, None
        return [BecomeStandby(reason), *self._evaluate()]

    # ------------------------------------------------------------------ primary: the link

    def on_follow(self, member: str, term: int, now: float) -> bool:
        """A Follow arrived: True means install ``member`` now (it is (re)added as a follower
        that has acked nothing). A Follow of another term is ignored: the follower will learn
        the term from etcd."""
        if not self.is_primary or term != self.term or member == self.member:
            return False
        self.followers[member] = FollowerState(installed=False, acked=-1, last_ack=now)
        return True

    def appended(self, count: int) -> int:
        """The primary appended ``count`` records; returns the first one's lsn."""
        first = self.lsn + 1
        self.lsn += count
        return first

    def on_ack(self, member: str, term: int, lsn: int, now: float) -> list[Action]:
        """An Ack: only one of the current term from a known follower counts."""
        if not self.is_primary or term != self.term:
            return []
        f = self.followers.get(member)
        if f is None or lsn > self.lsn:
            return []
        f.installed, f.acked, f.last_ack = True, max(f.acked, lsn), now
        return self.tick(now)

    def on_refuse(self, term: int) -> list[Action]:
        """A standby knows a higher term than the primary's: promise it and step down."""
        if not self.is_primary or term <= self.term:
            return []
        actions: list[Action] = []
        if term > self.promised:
            self.promised = term
            actions.append(PersistTerm(term))
        return actions + self.step_down(f"a standby refused term {self.term}: it knows {term}")

    def forget_follower(self, member: str) -> None:
        """The link to ``member`` is gone (unreachable): it must Follow again."""
        self.followers.pop(member, None)

    def tick(self, now: float) -> list[Action]:
        """Primary, periodically and after every ack: note freshness and propose a sync-set
        change (one CAS at a time)."""
        if not self.is_primary:
            return []
        if self.committed(self.lsn):
            self.last_sync_ok = now
        if self.switchover_to is not None:
            return self._switchover_tick(now)
        if self.changing is not None or self.config is None:
            return []
        sync = list(self.sync_set)
        alive = [m for m in sync if self._live(m, now)]
        if len(alive) < self.min_sync:
            # Never below min_sync: keep the laggards that got furthest.
            laggards = sorted((m for m in sync if m not in alive),
                              key=lambda m: self.followers[m].acked if m in self.followers
                              else -2, reverse=True)
            alive += laggards[:self.min_sync - len(alive)]
        joining = sorted(m for m, f in self.followers.items()
                         if m not in sync and f.installed and f.acked >= self.lsn
                         and self._live(m, now))
        proposed = tuple(sorted([*alive, *joining]))
        if proposed == tuple(sorted(sync)):
            return []
        self.adding = frozenset(joining)
        self.changing = ChangeConfig(msgspec.structs.replace(self.config, sync_set=proposed),
                                     self.config_revision)
        return [self.changing]

    def _live(self, member: str, now: float) -> bool:
        f = self.followers.get(member)
        return f is not None and now - f.last_ack <= self.ack_timeout

    def on_config_changed(self, succeeded: bool, revision: int) -> list[Action]:
        """The sync-set CAS's outcome (on failure the watch brings the config as it is)."""
        change, self.changing, self.adding = self.changing, None, frozenset()
        if change is None or not succeeded:
            return []
        return self.on_config(change.config, revision)

    # ------------------------------------------------------------------ standby: the link

    def check_install(self, term: int) -> Verdict:
        if term < self.promised:
            return Verdict.REFUSE
        if self.is_primary or term != self.term or self.following is None:
            return Verdict.IGNORE
        return Verdict.APPLY

    def installed_at(self, lsn: int) -> None:
        """The Install of the followed primary is durable and applied, at ``lsn``."""
        self.installed, self.lsn = True, lsn

    def check_append(self, term: int, first_lsn: int) -> Verdict:
        if term < self.promised:
            return Verdict.REFUSE
        if self.is_primary or term != self.term or not self.installed:
            return Verdict.IGNORE
        if first_lsn != self.lsn + 1:
            return Verdict.GAP
        return Verdict.APPLY

    def applied(self, count: int) -> int:
        """The standby made ``count`` more records durable and applied; returns its lsn."""
        self.lsn += count
        return self.lsn

    # ------------------------------------------------------------------ switchover

    @property
    def handing_over(self) -> bool:
        """Primary: a switchover is under way, so no new write is taken."""
        return self.is_primary and self.switchover_to is not None

    def request_switchover(self, target: str, term: int, now: float, timeout: float) -> str:
        """An operator asks to hand leadership to ``target`` (the request names the term it
        saw). Returns "" when accepted, else why not. Accepted: the primary takes no new write;
        once every record is acked by the target (it is in the sync set, so every committed one
        already is), ``tick`` returns the ``HandOff``. Given up after ``timeout`` seconds."""
        if not self.is_primary:
            return "this member is not the primary"
        if term != self.term:
            return f"the request is for term {term}, this primary's term is {self.term}"
        if target == self.member:
            return f"{target} is the primary already"
        if target not in self.sync_set:
            return (f"{target} is not in the sync set {list(self.sync_set)}: only an in-sync "
                    "standby holds every acknowledged write")
        if self.switchover_to == target:
            return ""  # the same request seen again (a re-read of the key)
        if self.switchover_to is not None:
            return f"a switchover to {self.switchover_to} is under way"
        self.switchover_to, self.switchover_deadline = target, now + timeout
        return ""

    def _switchover_tick(self, now: float) -> list[Action]:
        target, cfg = self.switchover_to, self.config
        assert target is not None
        if self.handoff is not None:
            return []  # its outcome comes with on_handoff_result
        if now > self.switchover_deadline or cfg is None or target not in cfg.sync_set:
            self.switchover_to = None  # given up: writes are taken again
            return []
        f = self.followers.get(target)
        if (self.changing is not None or f is None or not f.installed or f.acked < self.lsn
                or not self._live(target, now)):
            return []
        # The target holds every record of this term (acked) and every earlier one (it was
        # installed), so a primary of term + 1 on its state lacks no acknowledged write.
        self.handoff = HandOff(GroupConfig(term=self.term + 1, primary=target, sync_set=(),
                                           epoch=cfg.epoch or self.epoch),
                               self.config_revision, target)
        return [self.handoff]

    def on_handoff_result(self, succeeded: bool, revision: int) -> list[Action]:
        """The switchover transaction's outcome (on failure writes are taken again; the watch
        brings whatever the config is now)."""
        handoff, self.handoff = self.handoff, None
        if handoff is None or not self.is_primary:
            return []
        if not succeeded:
            self.switchover_to = None
            return []
        return self.on_config(handoff.config, revision)  # names another primary: step down

    def _take_handoff(self) -> list[Action]:
        """Standby: the config names it primary of a term it never promised and the leader
        key is its own (both put by the old primary's switchover transaction): it leads now.
        Its state is the one the old primary saw acked, so it serves at once."""
        cfg = self.config
        if (self.is_primary or not self.handoff_term or cfg is None
                or cfg.term != self.handoff_term or cfg.primary != self.member
                or self.leader != self.member):
            return []
        self.handoff_term = 0
        self.role, self.term, self.lsn = Role.PRIMARY, cfg.term, 0
        self.following, self.installed = None, False
        self.followers, self.changing, self.adding = {}, None, frozenset()
        self.last_sync_ok = None
        return [BecomePrimary(self.term)]
