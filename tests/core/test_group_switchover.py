"""The pure core of a planned switchover (broker/group.py; docs/operations.md): the primary
hands over only to an in-sync standby that acked everything, takes no write meanwhile, and
steps down on success; the target leads only on a config naming it with a term it never
promised and the leader key its own. No sockets, no etcd, no clock."""

from __future__ import annotations

from broker.coordination import GroupConfig
from broker.group import (
    BecomePrimary,
    BecomeStandby,
    FollowPrimary,
    GroupCore,
    HandOff,
    PersistTerm,
)
from tests.core.test_group_core import primary


def in_sync_primary() -> GroupCore:
    """Primary "a" of term 1 with "b" and "c" installed, acked at lsn 3, in the sync set."""
    g = primary("a", sync=("b", "c"))
    for m in ("b", "c"):
        g.on_follow(m, 1, 0.0)
    g.appended(3)
    for m in ("b", "c"):
        g.on_ack(m, 1, 3, 0.1)
    return g


def test_the_primary_hands_over_only_once_the_target_acked_everything() -> None:
    g = in_sync_primary()
    assert g.request_switchover("b", 1, 0.2, 10.0) == ""
    assert g.handing_over
    g.appended(1)  # an expiry turn shipped, not yet acked by b
    assert g.tick(0.3) == []
    g.on_ack("c", 1, 4, 0.3)
    actions = g.on_ack("b", 1, 4, 0.4)
    assert actions == [HandOff(GroupConfig(term=2, primary="b", sync_set=(), epoch="e" * 16),
                               8, "b")]
    assert g.tick(0.5) == []  # one transaction at a time
    out = g.on_handoff_result(True, 9)
    assert out[0] == PersistTerm(2) and isinstance(out[1], BecomeStandby)
    assert FollowPrimary("b", 2) in out
    assert not g.is_primary and not g.handing_over and g.promised == 2


def test_a_switchover_is_refused_for_a_target_outside_the_sync_set_or_another_term() -> None:
    g = primary("a", sync=("b",))
    assert "not in the sync set" in g.request_switchover("c", 1, 0.0, 10.0)
    assert "is the primary already" in g.request_switchover("a", 1, 0.0, 10.0)
    assert "term 0" in g.request_switchover("b", 0, 0.0, 10.0)
    assert not g.handing_over
    assert "not the primary" in GroupCore("b").request_switchover("b", 1, 0.0, 10.0)


def test_a_failed_or_timed_out_switchover_takes_writes_again() -> None:
    g = in_sync_primary()
    assert g.request_switchover("b", 1, 0.2, 1.0) == ""
    g.forget_follower("b")  # b went away: nothing is handed over
    assert g.tick(0.5) == [] and g.handing_over
    assert g.tick(1.3) == [] and not g.handing_over and g.is_primary
    g2 = in_sync_primary()
    g2.request_switchover("c", 1, 0.2, 10.0)
    assert isinstance(g2.tick(0.3)[0], HandOff)
    assert g2.on_handoff_result(False, 0) == []
    assert g2.is_primary and not g2.handing_over


def test_the_target_leads_only_on_a_handoff_config_with_its_leader_key() -> None:
    b = GroupCore("b")
    b.on_config(GroupConfig(term=1, primary="a", sync_set=("b",)), 5)
    b.on_leader("a")
    handoff = GroupConfig(term=2, primary="b", sync_set=())
    assert b.on_leader("b") == []  # the transaction's first put: not yet the config
    actions = b.on_config(handoff, 9)
    assert actions[-1] == BecomePrimary(2) and b.is_primary and b.term == 2
    # Config first, then the leader key: the same outcome.
    c = GroupCore("c")
    c.on_config(GroupConfig(term=1, primary="a", sync_set=("c",)), 5)
    c.on_leader("a")
    assert not any(isinstance(x, BecomePrimary) for x in c.on_config(
        GroupConfig(term=2, primary="c"), 9))
    assert c.on_leader("c") == [BecomePrimary(2)]
    # A restarted former primary whose old leader key is still there promised that term
    # already: it does not take office on it.
    a = GroupCore("a")
    a.promised = 3
    a.on_leader("a")
    assert not any(isinstance(x, BecomePrimary) for x in a.on_config(
        GroupConfig(term=3, primary="a", sync_set=("b",)), 9))
    assert not a.is_primary
