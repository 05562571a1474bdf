"""The pure group core (broker/group.py): roles, terms and the promise, the commit rule, the
sync set, eligibility, and messages of other terms. No sockets, no etcd, no clock."""

from __future__ import annotations

import pytest

from broker.coordination import GroupConfig
from broker.errors import ProtocolError
from broker.group import (
    BecomePrimary,
    BecomeStandby,
    Campaign,
    ChangeConfig,
    FollowPrimary,
    GroupCore,
    PersistTerm,
    Role,
    Verdict,
)
from broker.protocol import KeySet
from broker.records import BatchRecord, NamespaceRecord, SnapshotFile
from broker.replication import (
    Ack,
    Append,
    Follow,
    Install,
    InstallImage,
    Refuse,
    ReplCodec,
    chunks,
)


def primary(member: str = "a", sync: tuple[str, ...] = (), min_sync: int = 1,
            term: int = 1) -> GroupCore:
    """A member that has won the election of ``term`` with ``sync`` as its config's sync set."""
    g = GroupCore(member, min_sync=min_sync, ack_timeout=2.0, epoch="e" * 16)
    g.on_config(GroupConfig(term=term - 1, primary="x", sync_set=(member,)) if term > 1
                else None, 5)
    actions = g.on_leader(None)
    campaign = next(a for a in actions if isinstance(a, Campaign))
    assert g.on_campaign_result(True, 7) == [BecomePrimary(term)]
    assert campaign.config.term == term
    if sync:
        g.on_config(GroupConfig(term=term, primary=member, sync_set=sync), 8)
    return g


def test_a_new_group_campaigns_after_promising_the_term() -> None:
    g = GroupCore("a", epoch="0123456789abcdef")
    assert g.on_leader(None) == []  # config not read yet: not eligible
    actions = g.on_config(None, 0)
    assert actions == [PersistTerm(1), Campaign(GroupConfig(term=1, primary="a", sync_set=(),
                                                            epoch="0123456789abcdef"), 0)]
    assert g.promised == 1 and g.role is Role.STANDBY
    assert g.on_leader(None) == []  # one campaign at a time
    assert g.on_campaign_result(True, 3) == [BecomePrimary(1)]
    assert g.is_primary and g.term == 1 and g.lsn == 0 and g.primary == "a"


def test_a_lost_campaign_follows_the_winner() -> None:
    g = GroupCore("b")
    g.on_config(None, 0)
    g.on_leader(None)
    g.on_leader("a")
    assert g.on_config(GroupConfig(term=1, primary="a"), 4) == [FollowPrimary("a", 1)]
    assert g.on_campaign_result(False, 4) == []
    assert g.role is Role.STANDBY and g.following == "a" and g.primary == "a"


def test_only_sync_set_members_and_the_old_primary_are_eligible() -> None:
    cfg = GroupConfig(term=4, primary="a", sync_set=("b",), epoch="e")
    for member, eligible in (("a", True), ("b", True), ("c", False)):
        g = GroupCore(member, epoch="e")
        g.on_config(cfg, 9)
        actions = g.on_leader(None)
        assert g.eligible() is eligible
        assert any(isinstance(x, Campaign) for x in actions) is eligible, member
        if eligible:
            c = next(x for x in actions if isinstance(x, Campaign))
            assert c.config.term == 5 and c.revision == 9 and c.config.epoch == "e"
            assert actions.index(PersistTerm(5)) < actions.index(c)  # promise first
            assert g.promised == 5


def test_a_member_whose_log_is_not_the_groups_never_campaigns() -> None:
    """A sync-set member restarted on a wiped (or repaired) data dir has a new epoch and none
    of the acknowledged writes: were it elected, its Install would empty every member."""
    cfg = GroupConfig(term=4, primary="a", sync_set=("b",), epoch="group-epoch")
    for member in ("a", "b"):
        g = GroupCore(member, epoch="fresh-epoch")
        g.on_config(cfg, 9)
        assert not g.eligible()
        assert not any(isinstance(x, Campaign) for x in g.on_leader(None)), member
    b = GroupCore("b", epoch="fresh-epoch")
    b.on_config(GroupConfig(term=5, primary="a", sync_set=("b",), epoch="group-epoch"), 10)
    b.on_leader("a")
    b.epoch = "group-epoch"  # the shell does this once a's Install is applied
    assert b.eligible()
    assert any(isinstance(x, Campaign) for x in b.on_leader(None))


def test_a_stale_leader_observation_after_the_delete_is_dropped() -> None:
    """The watch and a failed transaction's read-back come from two threads: a read-back
    saying "a leads" (from before the lease ran out) must not undo the DELETE seen after it,
    or this member would never campaign."""
    g = GroupCore("b", epoch="e")
    g.on_config(GroupConfig(term=2, primary="a", sync_set=("b",), epoch="e"), 3)
    g.on_leader("a", 10)
    actions = g.on_leader(None, 20)  # the DELETE: campaign
    assert any(isinstance(x, Campaign) for x in actions)
    assert g.on_leader("a", 10) == [] and g.leader is None  # the stale read-back
    assert g.on_leader("c", 25) == [] and g.leader == "c"  # a newer one is taken


def test_a_present_leader_key_starts_no_campaign() -> None:
    g = GroupCore("b")
    g.on_config(GroupConfig(term=2, primary="a", sync_set=("b",)), 3)
    assert not any(isinstance(x, Campaign) for x in g.on_leader("a"))


def test_lower_term_append_and_install_are_refused() -> None:
    g = GroupCore("b")
    g.on_config(GroupConfig(term=2, primary="a", sync_set=("b",)), 3)
    assert g.check_install(2) is Verdict.APPLY
    g.installed_at(10)
    assert g.check_append(2, 11) is Verdict.APPLY
    # b campaigns for term 3 (a's leader key vanished): from now on a's term-2 appends are refused
    g.on_leader(None)
    assert g.promised == 3
    assert g.check_append(2, 11) is Verdict.REFUSE
    assert g.check_install(2) is Verdict.REFUSE
    assert g.check_append(1, 11) is Verdict.REFUSE
    assert g.lsn == 10  # nothing applied


def test_append_checks_gap_and_follows_term() -> None:
    g = GroupCore("b")
    g.on_config(GroupConfig(term=2, primary="a"), 3)
    assert g.check_append(2, 1) is Verdict.IGNORE  # not installed yet
    g.installed_at(5)
    assert g.check_append(2, 7) is Verdict.GAP
    assert g.check_append(3, 6) is Verdict.IGNORE  # a term it does not follow (yet)
    assert g.check_append(2, 6) is Verdict.APPLY
    assert g.applied(3) == 8
    assert g.check_append(2, 9) is Verdict.APPLY


def test_a_turn_never_commits_without_every_sync_members_ack() -> None:
    g = primary(sync=("b", "c"))
    for m in ("b", "c"):
        assert g.on_follow(m, 1, now=0.0)
    first = g.appended(3)
    assert first == 1 and g.lsn == 3
    assert not g.committed(3)
    g.on_ack("b", 1, 3, now=0.1)
    assert not g.committed(3), "c has not acked"
    g.on_ack("c", 1, 2, now=0.1)
    assert not g.committed(3) and g.committed(2)
    g.on_ack("c", 1, 3, now=0.2)
    assert g.committed(3)


def test_nothing_commits_below_min_sync() -> None:
    g = primary(sync=(), min_sync=1)
    assert not g.committed(0), "a new primary commits nothing without a sync-set member"
    g0 = primary(sync=(), min_sync=0)
    assert g0.committed(0)
    g0.appended(1)
    assert g0.committed(1)


def test_acks_of_another_term_or_stranger_count_nothing() -> None:
    g = primary(sync=("b",), term=3)
    g.on_follow("b", 3, now=0.0)
    g.appended(1)
    assert g.on_ack("b", 2, 1, now=0.1) == []
    assert g.on_ack("z", 3, 1, now=0.1) == []
    assert g.on_ack("b", 3, 5, now=0.1) == []  # beyond what was shipped: bogus
    assert not g.committed(1)
    assert not g.on_follow("c", 2, now=0.1)  # Follow of an old term: ignored


def test_a_caught_up_follower_is_added_and_counts_before_its_cas_lands() -> None:
    g = primary(sync=(), min_sync=1)
    g.on_follow("b", 1, now=0.0)
    actions = g.on_ack("b", 1, 0, now=0.1)  # installed at lsn 0 = caught up
    assert actions == [ChangeConfig(GroupConfig(term=1, primary="a", sync_set=("b",),
                                                epoch="e" * 16), 7)]
    assert g.tick(0.2) == []  # one CAS at a time
    g.appended(1)
    g.on_follow("c", 1, now=0.2)
    g.on_ack("c", 1, 1, now=0.3)
    assert not g.committed(1), "config not changed yet: below min_sync"
    assert g.on_config_changed(True, 11) == []
    assert g.sync_set == ("b",) and g.config_revision == 11
    assert not g.committed(1), "b has not acked lsn 1"
    g.on_ack("b", 1, 1, now=0.4)
    assert g.committed(1)


def test_a_member_being_added_is_needed_for_commits_meanwhile() -> None:
    g = primary(sync=("b",))
    for m in ("b", "c"):
        g.on_follow(m, 1, now=0.0)
    g.on_ack("b", 1, 0, now=0.1)
    actions = g.on_ack("c", 1, 0, now=0.1)
    assert any(isinstance(a, ChangeConfig) and a.config.sync_set == ("b", "c")
               for a in actions) or g.adding == frozenset({"c"})
    assert g.adding == frozenset({"c"})
    g.appended(1)
    g.on_ack("b", 1, 1, now=0.2)
    assert not g.committed(1), "c is being added: a commit meanwhile needs it too"
    g.on_ack("c", 1, 1, now=0.2)
    assert g.committed(1)


def test_a_silent_sync_member_is_removed_but_never_below_min_sync() -> None:
    g = primary(sync=("b", "c"), min_sync=1)
    for m in ("b", "c"):
        g.on_follow(m, 1, now=0.0)
    for m in ("b", "c"):
        assert g.on_ack(m, 1, 0, now=0.0) == []
    g.appended(1)
    g.on_ack("b", 1, 1, now=1.0)
    assert g.tick(1.5) == []  # c within its ack timeout
    assert not g.committed(1)
    (change,) = g.tick(2.5)
    assert isinstance(change, ChangeConfig) and change.config.sync_set == ("b",)
    assert not g.committed(1), "removal counts only once the CAS landed"
    g.on_config_changed(True, 20)
    assert g.committed(1)
    # b falls silent too: min_sync 1 keeps it; commits wait instead of acking with less
    g.appended(1)
    assert g.tick(10.0) == []
    assert g.sync_set == ("b",) and not g.committed(2)


def test_min_sync_keeps_the_laggard_that_got_furthest() -> None:
    g = primary(sync=("b", "c"), min_sync=1)
    g.on_follow("b", 1, now=0.0)
    g.on_follow("c", 1, now=0.0)
    g.appended(2)
    g.on_ack("b", 1, 1, now=0.0)
    g.on_ack("c", 1, 2, now=0.0)
    (change,) = g.tick(5.0)
    assert isinstance(change, ChangeConfig) and change.config.sync_set == ("c",)


def test_a_failed_cas_changes_nothing() -> None:
    g = primary(sync=("b", "c"))
    g.on_follow("b", 1, now=0.0)
    (change,) = g.on_ack("b", 1, 0, now=5.0)  # c never followed: it goes
    assert isinstance(change, ChangeConfig) and change.config.sync_set == ("b",)
    assert g.on_config_changed(False, 0) == []
    assert g.sync_set == ("b", "c")


def test_refuse_of_a_higher_term_makes_the_primary_step_down() -> None:
    g = primary(sync=("b",), term=2)
    assert g.on_refuse(2) == []  # not higher
    actions = g.on_refuse(3)
    assert actions[0] == PersistTerm(3) and isinstance(actions[1], BecomeStandby)
    assert g.role is Role.STANDBY and g.promised == 3 and g.followers == {}
    assert not g.committed(0)


def test_a_config_naming_another_primary_or_a_vanished_leader_ends_the_term() -> None:
    g = primary(sync=("b",), term=2)
    actions = g.on_config(GroupConfig(term=3, primary="b"), 30)
    assert PersistTerm(3) in actions and any(isinstance(a, BecomeStandby) for a in actions)
    assert FollowPrimary("b", 3) in actions
    h = primary(sync=("b",), term=2)
    assert isinstance(h.on_leader(None)[0], BecomeStandby)
    k = primary(sync=("b",), term=2)
    assert isinstance(k.on_lease_lost()[0], BecomeStandby)
    assert k.on_lease_lost() == []


def test_a_stale_config_is_ignored() -> None:
    g = GroupCore("b")
    g.on_config(GroupConfig(term=5, primary="a"), 50)
    assert g.on_config(GroupConfig(term=4, primary="c"), 40) == []
    assert g.config is not None and g.config.term == 5 and g.promised == 5


def test_freshness_needs_recent_sync_acks() -> None:
    g = primary(sync=("b",))
    g.on_follow("b", 1, now=0.0)
    assert not g.fresh(0.0)
    g.on_ack("b", 1, 0, now=1.0)
    assert g.fresh(1.0) and g.fresh(3.0) and not g.fresh(3.5)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_sync"):
        GroupCore("a", min_sync=-1)
    with pytest.raises(ValueError, match="ack_timeout"):
        GroupCore("a", ack_timeout=0)


# ------------------------------------------------------------------ the wire codec


def test_replication_messages_round_trip() -> None:
    codec = ReplCodec()
    records = [NamespaceRecord("ns", 0),
               BatchRecord("ns", 1.5, [KeySet(1, "k", b"1", 1.0, 1.0, None)], b"c", 3)]
    for msg in (Follow("b", 2, "e"), Install(2, 5, 0, True, b"xyz"), Append(2, 6, records),
                Append(2, 9, []), Ack("b", 2, 6), Refuse(3, "c")):
        assert codec.decode(codec.encode(msg)) == msg
    image = InstallImage(SnapshotFile("e" * 16, 1, 2.0, [], []))
    assert codec.decode_image(codec.encode_image(image)) == image


@pytest.mark.parametrize("data", [b"", b"\xff\x00", b"garbage", b"\x92\x01\x02",
                                  ReplCodec().encode(Ack("b", 1, 1))[:-1]])
def test_replication_garbage_raises_only_protocol_error(data: bytes) -> None:
    codec = ReplCodec()
    with pytest.raises(ProtocolError):
        codec.decode(data)
    with pytest.raises(ProtocolError):
        codec.decode_image(data)


def test_chunks_cover_the_data() -> None:
    assert chunks(b"", 4) == [b""]
    assert chunks(b"abcdefghij", 4) == [b"abcd", b"efgh", b"ij"]
    with pytest.raises(ValueError):
        chunks(b"x", 0)


def test_a_paused_primary_can_commit_nothing_once_its_standby_moved_on() -> None:
    """Two cores: P (term 1, sync {b}) pauses; b sees the leader key vanish, promises term 2
    and campaigns. P's next turn is refused by b, so it never commits, and P steps down."""
    p = primary("a", sync=("b",), term=1)
    b = GroupCore("b", epoch="e" * 16)
    b.on_config(GroupConfig(term=1, primary="a", sync_set=("b",)), 8)
    b.on_leader("a")
    assert b.check_install(1) is Verdict.APPLY
    b.installed_at(0)
    p.on_follow("b", 1, now=0.0)
    p.on_ack("b", 1, 0, now=0.0)
    first = p.appended(1)
    assert b.check_append(1, first) is Verdict.APPLY
    p.on_ack("b", 1, b.applied(1), now=0.1)
    assert p.committed(1)
    # P pauses; its lease expires; b campaigns for term 2 (promise first).
    actions = b.on_leader(None)
    assert actions[0] == PersistTerm(2) and isinstance(actions[1], Campaign)
    # P resumes and ships its next turn: b refuses it, nothing of it commits.
    first = p.appended(1)
    assert b.check_append(1, first) is Verdict.REFUSE
    assert not p.committed(2)
    assert p.tick(0.2) == []  # nothing to remove yet: b acked recently
    assert any(isinstance(a, BecomeStandby) for a in p.on_refuse(b.promised))
    assert not p.committed(2) and not p.is_primary
