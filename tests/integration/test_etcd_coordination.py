"""Issue 10 groundwork: ``broker/coordination.py`` against a real 3-member etcd on loopback.

Every etcd test runs against etcd processes this test started (tests/etcd_cluster.py) and
reads etcd's answers back through a second, independent coordinator or a watch, so a client
that only believed itself would fail. The tests that kill etcd members get a cluster of their
own (the ``etcd_cluster`` fixture); the rest share one per module, each in a group of its own.
The first tests need no etcd at all: key layout, value codecs, and that the single-broker path
never imports etcd3gw.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from broker.coordination import (
    Absent,
    CoordinationUnavailable,
    EtcdCoordinator,
    GroupConfig,
    GroupKeys,
    InvalidGroupValue,
    Lease,
    LeaseLost,
    MemberRecord,
    ModRevisionIs,
    Put,
    TxnResult,
    ValueIs,
    WatchEvent,
    parse_endpoints,
)
from tests.conftest import ROOT, child_env, wait_until
from tests.etcd_cluster import EtcdCluster, free_ports, require_etcd

_groups = itertools.count()


def new_keys() -> GroupKeys:
    """A group of its own for each test on the shared cluster."""
    return GroupKeys(f"g{next(_groups)}")


class Recorder:
    """A watch callback that keeps every event, for conditions with deadlines."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: WatchEvent) -> None:
        with self.lock:
            self.events.append(event)

    def kinds(self, key: str) -> list[str]:
        with self.lock:
            return [e.kind for e in self.events if e.key == key]


# ------------------------------------------------------------------------ no etcd needed


def test_group_keys_follow_cluster_md_layout() -> None:
    keys = GroupKeys("orders")
    assert keys.prefix == "/sharedmem/orders/"
    assert keys.leader == "/sharedmem/orders/leader"
    assert keys.config == "/sharedmem/orders/config"
    assert keys.member("10.0.0.1:7400") == "/sharedmem/orders/members/10.0.0.1:7400"
    assert keys.member_name(keys.member("b1")) == "b1"
    with pytest.raises(ValueError, match="invalid group name"):
        GroupKeys("a/b")
    with pytest.raises(ValueError, match="invalid member name"):
        keys.member("")
    with pytest.raises(ValueError, match="not a member key"):
        keys.member_name(keys.leader)


def test_group_config_round_trips_and_garbage_is_refused() -> None:
    config = GroupConfig(term=3, primary="b1", sync_set=("b2",), epoch="e1")
    assert GroupConfig.decode(config.encode()) == config
    member = MemberRecord(name="b1", endpoints=("tcp://127.0.0.1:7400",), term=3, seq=9)
    assert MemberRecord.decode(member.encode()) == member
    with pytest.raises(InvalidGroupValue, match="does not decode"):
        GroupConfig.decode(b'{"term": "x"}')
    with pytest.raises(InvalidGroupValue, match="negative term"):
        GroupConfig.decode(b'{"term": -1, "primary": "b1"}')


def test_endpoint_list_is_checked() -> None:
    assert parse_endpoints("http://127.0.0.1:2379, http://h2:2379/") == (
        "http://127.0.0.1:2379", "http://h2:2379")
    for bad in ("127.0.0.1:2379", "tcp://h:1", "http://h", "http://h:1/v3", ""):
        with pytest.raises(ValueError, match="etcd endpoint"):
            parse_endpoints(bad)


def test_single_broker_path_never_imports_etcd() -> None:
    code = ("import sys, broker, broker.server, broker.core, broker.__main__, node, node.cli\n"
            "loaded = [m for m in ('etcd3gw', 'requests', 'broker.coordination')"
            " if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# -------------------------------------------------------------------- shared etcd cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_etcd()
    c = EtcdCluster(tmp_path_factory.mktemp("etcd-shared")).start()
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def coord(cluster: EtcdCluster) -> Iterator[EtcdCoordinator]:
    c = EtcdCoordinator(cluster.endpoint_string)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def other(cluster: EtcdCluster) -> Iterator[EtcdCoordinator]:
    """A second, independent client (other endpoint order), to read back what ``coord`` did."""
    c = EtcdCoordinator(list(reversed(cluster.endpoints)))
    try:
        yield c
    finally:
        c.close()


def test_lease_grant_reads_back_the_granted_ttl(coord: EtcdCoordinator,
                                                other: EtcdCoordinator) -> None:
    lease = coord.grant_lease(5)
    assert lease.ttl == 5
    assert 0 < coord.keepalive(lease) <= 5
    # etcd raises a TTL to at least 1.5 election timeouts (750 ms here): 1 s is granted as 1.
    short = coord.grant_lease(1)
    assert short.ttl >= 1
    keys = new_keys()
    coord.put(keys.member("b1"), b"x", lease)
    found = other.get(keys.member("b1")).first
    assert found is not None and found.lease == lease.id and found.value == b"x"
    coord.revoke(lease)
    coord.revoke(short)
    with pytest.raises(LeaseLost):
        coord.keepalive(lease)
    with pytest.raises(LeaseLost):
        coord.put(keys.member("b2"), b"y", lease)
    assert other.get(keys.member("b1")).first is None
    coord.revoke(lease)  # revoking a gone lease is not an error


def test_create_if_absent_exactly_one_of_two_concurrent_contenders_wins(
        cluster: EtcdCluster) -> None:
    contenders = [EtcdCoordinator(cluster.endpoints[0]), EtcdCoordinator(cluster.endpoints[1])]
    try:
        for _ in range(10):
            keys = new_keys()
            leases = [c.grant_lease(5) for c in contenders]
            barrier = threading.Barrier(2)
            results: dict[int, bool] = {}

            def campaign(i: int, keys: GroupKeys = keys, leases: list[Lease] = leases,
                         barrier: threading.Barrier = barrier,
                         results: dict[int, bool] = results) -> None:
                barrier.wait(10)
                result = contenders[i].create_if_absent(keys.leader, f"b{i}".encode(), leases[i])
                results[i] = result.succeeded

            threads = [threading.Thread(target=campaign, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert sorted(results.values()) == [False, True], results
            winner = next(i for i, won in results.items() if won)
            held = contenders[1 - winner].get(keys.leader).first
            assert held is not None
            assert held.value == f"b{winner}".encode() and held.lease == leases[winner].id
            for c, lease in zip(contenders, leases, strict=True):
                c.revoke(lease)
    finally:
        for c in contenders:
            c.close()


def test_campaign_transaction_leader_absent_and_config_unchanged(coord: EtcdCoordinator,
                                                                 other: EtcdCoordinator) -> None:
    """The campaign transaction (docs/groups.md): put leader and config{term+1} only if the
    leader is absent and the config is what the campaigner read. A second campaigner on the
    same read loses."""
    keys = new_keys()
    first = GroupConfig(term=1, primary="b0", sync_set=("b1", "b2"), epoch="e")
    assert coord.compare_and_swap(keys.config, first.encode(), 0).succeeded
    read = coord.get(keys.config).first
    assert read is not None

    def campaign(c: EtcdCoordinator, me: str) -> bool:
        lease = c.grant_lease(5)
        new = GroupConfig(term=first.term + 1, primary=me, sync_set=("b0",), epoch="e")
        return c.transact(
            [Absent(keys.leader), ModRevisionIs(keys.config, read.mod_revision)],
            [Put(keys.leader, me.encode(), lease), Put(keys.config, new.encode())],
        ).succeeded

    assert campaign(coord, "b1") is True
    assert campaign(other, "b2") is False
    stored = other.get(keys.config).first
    assert stored is not None
    assert GroupConfig.decode(stored.value) == GroupConfig(term=2, primary="b1",
                                                           sync_set=("b0",), epoch="e")
    leader = other.get(keys.leader).first
    assert leader is not None and leader.value == b"b1"


def test_leader_key_vanishes_on_revoke_and_a_watcher_sees_the_delete(
        coord: EtcdCoordinator, other: EtcdCoordinator) -> None:
    keys = new_keys()
    seen = Recorder()
    handle = other.watch(keys.leader, seen)
    lease = coord.grant_lease(5)
    assert coord.create_if_absent(keys.leader, b"b1", lease).succeeded
    coord.revoke(lease)
    wait_until(lambda: seen.kinds(keys.leader) == ["PUT", "DELETE"], timeout=10,
               message="the watcher sees PUT then DELETE of the leader key")
    assert other.get(keys.leader).first is None
    handle.cancel()


def test_leader_key_expires_with_its_lease_while_a_kept_alive_one_stays(
        coord: EtcdCoordinator, other: EtcdCoordinator) -> None:
    keys = new_keys()
    seen = Recorder()
    handle = other.watch(keys.prefix, seen, prefix=True)
    dying = coord.grant_lease(1)
    kept = coord.grant_lease(1)
    assert coord.create_if_absent(keys.leader, b"b1", dying).succeeded
    coord.put(keys.member("b2"), b"alive", kept)

    def leader_deleted() -> bool:
        coord.keepalive(kept)  # only the member key's lease is renewed while we wait
        return "DELETE" in seen.kinds(keys.leader)

    wait_until(leader_deleted, timeout=15, interval=0.1,
               message="the leader key's DELETE after its lease expired")
    assert other.get(keys.leader).first is None
    member = other.get(keys.member("b2")).first
    assert member is not None and member.value == b"alive"
    assert seen.kinds(keys.member("b2")) == ["PUT"]
    handle.cancel()
    coord.revoke(kept)


def test_config_cas_on_mod_revision_a_stale_revision_loses(coord: EtcdCoordinator,
                                                           other: EtcdCoordinator) -> None:
    keys = new_keys()
    v1 = GroupConfig(term=1, primary="b1", sync_set=("b2", "b3"), epoch="e")
    assert coord.compare_and_swap(keys.config, v1.encode(), 0).succeeded
    assert not other.compare_and_swap(keys.config, v1.encode(), 0).succeeded  # not absent
    r1 = coord.get(keys.config).first
    assert r1 is not None
    v2 = GroupConfig(term=1, primary="b1", sync_set=("b2",), epoch="e")
    assert coord.compare_and_swap(keys.config, v2.encode(), r1.mod_revision).succeeded
    v3 = GroupConfig(term=2, primary="b2", sync_set=("b3",), epoch="e")
    stale = other.compare_and_swap(keys.config, v3.encode(), r1.mod_revision)
    assert not stale.succeeded
    current = stale.current[keys.config]
    assert current is not None and GroupConfig.decode(current.value) == v2
    stored = other.get(keys.config).first
    assert stored is not None and GroupConfig.decode(stored.value) == v2


def test_config_cas_guarded_by_the_leader_key_fails_once_the_lease_is_gone(
        coord: EtcdCoordinator, other: EtcdCoordinator) -> None:
    keys = new_keys()
    lease = coord.grant_lease(5)
    assert coord.create_if_absent(keys.leader, b"b1", lease).succeeded
    v1 = GroupConfig(term=1, primary="b1", sync_set=("b2", "b3"), epoch="e")
    assert coord.compare_and_swap(keys.config, v1.encode(), 0,
                                  require=ValueIs(keys.leader, b"b1")).succeeded
    read = coord.get(keys.config).first
    assert read is not None
    shrink = GroupConfig(term=1, primary="b1", sync_set=("b2",), epoch="e")
    # Another member's name in the leader key does not pass either.
    assert not coord.compare_and_swap(keys.config, shrink.encode(), read.mod_revision,
                                      require=ValueIs(keys.leader, b"b9")).succeeded
    coord.revoke(lease)
    lost = coord.compare_and_swap(keys.config, shrink.encode(), read.mod_revision,
                                  require=ValueIs(keys.leader, b"b1"))
    assert not lost.succeeded
    assert lost.current[keys.leader] is None
    stored = other.get(keys.config).first
    assert stored is not None and GroupConfig.decode(stored.value) == v1


def test_watch_of_a_prefix_sees_member_puts_and_nothing_after_cancel(
        coord: EtcdCoordinator, other: EtcdCoordinator) -> None:
    keys = new_keys()
    seen = Recorder()
    handle = other.watch(keys.members_prefix, seen, prefix=True)
    lease = coord.grant_lease(5)
    for name in ("b1", "b2"):
        coord.put(keys.member(name), MemberRecord(name=name).encode(), lease)
    wait_until(lambda: len(seen.events) == 2, timeout=10, message="two member PUTs")
    assert [keys.member_name(e.key) for e in seen.events] == ["b1", "b2"]
    assert MemberRecord.decode(seen.events[0].value).name == "b1"
    handle.cancel()
    check = Recorder()
    revision = coord.get(keys.members_prefix).revision
    check_handle = other.watch(keys.members_prefix, check, prefix=True,
                               start_revision=revision + 1)
    coord.put(keys.member("b3"), b"{}", lease)
    wait_until(lambda: check.events, timeout=10, message="the second watch sees b3")
    assert len(seen.events) == 2  # the cancelled watch got nothing more
    check_handle.cancel()
    coord.revoke(lease)


def test_dead_first_endpoint_is_passed_over(cluster: EtcdCluster) -> None:
    [dead] = free_ports(1)
    c = EtcdCoordinator([f"http://127.0.0.1:{dead}", cluster.endpoints[1]], deadline=5)
    try:
        keys = new_keys()
        lease = c.grant_lease(5)
        assert c.create_if_absent(keys.leader, b"b1", lease).succeeded
        found = c.get(keys.leader).first
        assert found is not None and found.value == b"b1"
        seen = Recorder()
        handle = c.watch(keys.leader, seen)
        c.revoke(lease)
        wait_until(lambda: seen.kinds(keys.leader) == ["DELETE"], timeout=10,
                   message="the DELETE through the second endpoint")
        handle.cancel()
    finally:
        c.close()


# ------------------------------------------------------------- faults: a cluster per test


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_kill_9_of_the_etcd_leader_operations_resume_through_the_others(
        etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader()
    # The leader's endpoint first: the client's calls and its watch are on the member killed.
    order = [leader.client_url] + [u for u in etcd_cluster.endpoints if u != leader.client_url]
    c = EtcdCoordinator(order, deadline=15)
    watcher = EtcdCoordinator(order, deadline=15)
    try:
        keys = new_keys()
        lease = c.grant_lease(5)
        assert c.create_if_absent(keys.leader, b"b1", lease).succeeded
        seen = Recorder()
        handle = watcher.watch(keys.prefix, seen, prefix=True, start_revision=1)
        wait_until(lambda: seen.kinds(keys.leader) == ["PUT"], timeout=10,
                   message="the watch replays the leader PUT")
        etcd_cluster.kill(leader)
        # Every kind of call resumes through the survivors within the client's deadline.
        assert c.keepalive(lease) > 0
        config = GroupConfig(term=1, primary="b1", sync_set=("b2",), epoch="e")
        assert c.compare_and_swap(keys.config, config.encode(), 0,
                                  require=ValueIs(keys.leader, b"b1")).succeeded
        stored = c.get(keys.config).first
        assert stored is not None and GroupConfig.decode(stored.value) == config
        # The watch moved to a surviving member and lost nothing: PUT config, DELETE leader.
        c.revoke(lease)
        wait_until(lambda: seen.kinds(keys.leader) == ["PUT", "DELETE"]
                   and seen.kinds(keys.config) == ["PUT"], timeout=20,
                   message="the watch sees the config PUT and leader DELETE after the kill")
        assert etcd_cluster.leader() is not leader
        handle.cancel()
    finally:
        c.close()
        watcher.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_all_etcd_members_down_gives_coordination_unavailable_not_a_hang(
        etcd_cluster: EtcdCluster) -> None:
    c = EtcdCoordinator(etcd_cluster.endpoint_string, deadline=2, request_timeout=0.5)
    try:
        keys = new_keys()
        lease = c.grant_lease(5)
        seen = Recorder()
        handle = c.watch(keys.prefix, seen, prefix=True)
        for member in etcd_cluster.members:
            etcd_cluster.kill(member)
        for call in (lambda: c.get(keys.leader), lambda: c.keepalive(lease),
                     lambda: c.create_if_absent(keys.leader, b"b1", lease),
                     lambda: c.watch(keys.config, seen)):
            with pytest.raises(CoordinationUnavailable) as info:
                call()
            message = str(info.value)
            assert "no etcd endpoint" in message
            # each endpoint is named (a watch names the list and its last error)
            assert all(url in message for url in etcd_cluster.endpoints), message
        handle.cancel()  # a watch retrying against dead members still stops at once
        assert seen.events == []
    finally:
        c.close()


def test_a_transaction_retried_until_answered_learns_the_outcome_of_an_unanswered_try(
        etcd_cluster: EtcdCluster, caplog: pytest.LogCaptureFixture) -> None:
    """A campaign or sync-set change whose answer never came may have applied: taking it for
    a failure could leave etcd listing a member the primary stopped counting. So it is
    retried until etcd answers, and a retry's failed compare with its puts in place counts
    as applied."""
    c = EtcdCoordinator(etcd_cluster.endpoint_string, deadline=1, request_timeout=0.5)
    try:
        keys = new_keys()
        value = GroupConfig(term=1, primary="b1", sync_set=("b2",), epoch="e").encode()
        txn = ([Absent(keys.config)], [Put(keys.config, value)])
        assert c.transact(*txn).succeeded
        # The same transaction again, as after an attempt nobody answered: applied.
        assert c.transact(*txn, unanswered=True).succeeded
        assert not c.transact(*txn).succeeded  # unmarked, a failed compare is a failure
        for member in etcd_cluster.members:
            etcd_cluster.kill(member)
        stopped = threading.Event()
        stopped.set()
        with pytest.raises(CoordinationUnavailable):  # gives up only once told to stop
            c.transact_until_answered([Absent(keys.leader)], [Put(keys.leader, b"b1")],
                                      stopped)
        results: list[TxnResult] = []
        worker = threading.Thread(target=lambda: results.append(c.transact_until_answered(
            [Absent(keys.leader)], [Put(keys.leader, b"b1")], threading.Event())))
        with caplog.at_level("WARNING", logger="broker.coordination"):
            worker.start()
            wait_until(lambda: "retrying until etcd answers" in caplog.text, 30, 0.05,
                       "an unanswered attempt while every etcd member is down")
            for member in etcd_cluster.members:
                etcd_cluster.start_member(member)
            worker.join(60)
        assert results and results[0].succeeded
        leader = c.get(keys.leader).first
        assert leader is not None and leader.value == b"b1"
    finally:
        c.close()


def test_etcd_cluster_fixture_is_three_healthy_members(etcd_cluster: EtcdCluster) -> None:
    assert len(etcd_cluster.members) == 3
    assert all(m.healthy() for m in etcd_cluster.members)
    leader = etcd_cluster.leader()
    assert leader in etcd_cluster.members
