"""BrokerCore: ``run_turn`` (decide, apply, records) -> log append and flush -> commit_turn or
rollback, as the broker shell drives it; and the steps (decide, commit) on their own."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from broker.core import MAX_BATCH_ITEMS, MAX_PATTERN_DELETE, BrokerCore, Decision, DedupTable
from broker.log import MemoryLog
from broker.protocol import (
    BatchHeader,
    Delete,
    DeleteMany,
    DeletePattern,
    DigestReply,
    DropNamespace,
    Error,
    FetchReply,
    KeyDeleted,
    KeyExpired,
    KeySet,
    Open,
    OpenReply,
    Read,
    ReadReply,
    Set,
    SetMany,
    SetMaxKeys,
    Snapshot,
    WriteOk,
    WriteRequest,
    read_batch_header,
)
from broker.records import BatchRecord, NamespaceRecord
from broker.state import decode_entry

NS = "ns"
EPOCH = "epoch-a"


class Client:
    """Builds write requests with increasing request numbers, like one node does."""

    def __init__(self, client_id: bytes = b"node-1", max_keys: int = 0, ns: str = NS) -> None:
        self.client_id = client_id
        self.max_keys = max_keys
        self.ns = ns
        self._no = itertools.count(1)

    def set(self, key: str, value: bytes = b"1", ttl: float | None = None) -> Set:
        return Set(self.client_id, next(self._no), self.ns, self.max_keys, key, value, ttl)

    def set_many(self, items: list[tuple[str, bytes]], ttl: float | None = None) -> SetMany:
        return SetMany(self.client_id, next(self._no), self.ns, self.max_keys, items, ttl)

    def delete(self, key: str) -> Delete:
        return Delete(self.client_id, next(self._no), self.ns, self.max_keys, key)


@dataclass
class Result:
    """One request's outcome in a turn: its reply, the events it logged, whether resent."""

    reply: object
    events: list
    duplicate: bool


def shell(core: BrokerCore, request: WriteRequest, now: float = 0.0,
          wall: float = 1000.0) -> Result:
    """The broker shell's write path for a one-request turn: run_turn -> append -> flush ->
    commit_turn (the expiry due at ``now`` runs first, as in the broker)."""
    turn = core.run_turn([("tag", request)], now, wall)
    core.log.append_records(turn.records, turn.now)
    core.log.flush()
    core.commit_turn(turn)
    (out,) = turn.replies
    assert out.tag == "tag"
    events = [e for r in turn.records if type(r) is BatchRecord
              and (r.client, r.request_no) == (request.client_id, request.request_no)
              for e in r.events]
    return Result(out.reply, events, out.resent is not None)


def step(core: BrokerCore, request: WriteRequest, now: float, wall: float = 1000.0) -> Decision:
    """decide -> commit on their own, without the turn's expiry pass: how the core treats a
    key that is due but not yet expired by event (the broker never gets there)."""
    decision = core.decide(request, now, wall)
    core.commit(decision, now)
    return decision


def fingerprint(core: BrokerCore, ns: str = NS) -> tuple[int, str] | None:
    state = core.namespaces.get(ns)
    return None if state is None else (state.seq, state.digest())


# --------------------------------------------------------------------------- set


def test_set_returns_write_ok_with_seq_and_stores_the_value() -> None:
    core, c = BrokerCore(EPOCH), Client()
    d1 = shell(core, c.set("a", b'"x"'))
    d2 = shell(core, c.set("b", b"[1]"))
    assert d1.reply == WriteOk(EPOCH, 1, True)
    assert d2.reply == WriteOk(EPOCH, 2, True)
    assert d1.events == [KeySet(1, "a", b'"x"', 1000.0, 1000.0, None)]
    state = core.namespaces[NS]
    assert state.seq == 2
    assert state.entry("a").value == b'"x"'
    assert core.log.read(NS, 1, 10, 0.0) == d1.events + d2.events


def test_created_at_is_kept_on_overwrite_and_modified_at_moves() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a", b"1"), wall=1000.0)
    d = shell(core, c.set("a", b"2"), wall=2000.0)
    (event,) = d.events
    assert (event.created_at, event.modified_at) == (1000.0, 2000.0)
    entry = core.namespaces[NS].entry("a")
    assert (entry.created_at, entry.modified_at, entry.version) == (1000.0, 2000.0, 2)


def test_overwriting_an_expired_key_starts_a_new_created_at() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a", b"1", ttl=5.0), now=0.0, wall=1000.0)
    d = step(core, c.set("a", b"2"), now=6.0, wall=1006.0)  # due but not yet expired
    assert d.events[0].created_at == 1006.0


def test_decide_is_pure_until_commit() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a"))
    before = fingerprint(core)
    d = core.decide(c.set("b"), 0.0, 1000.0)
    assert isinstance(d.reply, WriteOk)
    assert fingerprint(core) == before
    assert core.log.read(NS, 2, 10, 0.0) == []
    # A write to a new namespace does not create it before commit either.
    other = Client(b"n2", ns="other")
    d2 = core.decide(other.set("x"), 0.0, 1000.0)
    assert d2.create_max_keys == 0
    assert "other" not in core.namespaces
    core.commit(d2, 0.0)
    assert core.namespaces["other"].seq == 1


@pytest.mark.parametrize("ttl", [-1.0, float("nan"), float("inf"), float("-inf")])
def test_bad_ttl_is_refused(ttl: float) -> None:
    core, c = BrokerCore(EPOCH), Client()
    d = shell(core, c.set("a", ttl=ttl))
    assert isinstance(d.reply, Error) and d.reply.kind == "InvalidValue"
    assert d.events == []
    assert NS not in core.namespaces  # a refused write does not even create the namespace


def test_zero_ttl_means_never_expires() -> None:
    core, c = BrokerCore(EPOCH), Client()
    d = shell(core, c.set("a", ttl=0))
    assert d.events[0].ttl is None
    assert core.namespaces[NS].live("a", 1e12) is not None


@pytest.mark.parametrize(
    ("request_", "kind"),
    [
        (Set(b"c", 1, NS, 0, "", b"1"), "InvalidKey"),
        (Set(b"c", 1, NS, 0, "a\x00", b"1"), "InvalidKey"),
        (Set(b"c", 1, NS, 0, "k" * 1025, b"1"), "InvalidKey"),
        (Set(b"c", 1, NS, 0, "a", b"{not json"), "InvalidValue"),
        (Set(b"c", 1, NS, 0, "a", b'"' + b"x" * 100 + b'"'), "InvalidValue"),
        (Set(b"c", 1, "bad ns", 0, "a", b"1"), "InvalidNamespace"),
        (Delete(b"c", 1, NS, 0, ""), "InvalidKey"),
    ],
)
def test_invalid_requests_are_refused_with_their_kind(request_: WriteRequest, kind: str) -> None:
    core = BrokerCore(EPOCH, max_value_bytes=64)
    shell(core, Set(b"other", 1, NS, 0, "seed", b"1"))
    before = fingerprint(core)
    d = shell(core, request_)
    assert isinstance(d.reply, Error)
    assert d.reply.kind == kind
    assert d.events == []
    assert fingerprint(core) == before
    assert core.counters["refused"] == 1


# --------------------------------------------------------------------------- capacity


def test_max_keys_refusal_changes_nothing() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=2)
    shell(core, c.set("a"))
    shell(core, c.set("b"))
    before = fingerprint(core)
    log_before = core.log.read(NS, 1, 100, 0.0)
    d = shell(core, c.set("c"))
    assert isinstance(d.reply, Error)
    assert d.reply.kind == "StorageError"
    assert "'ns'" in d.reply.message and "max_keys 2" in d.reply.message
    assert d.events == []
    assert fingerprint(core) == before
    assert core.log.read(NS, 1, 100, 0.0) == log_before
    assert "c" not in core.namespaces[NS].entries
    # Overwriting an existing key adds no key, so it is allowed at capacity ...
    assert isinstance(shell(core, c.set("a", b"2")).reply, WriteOk)
    # ... and a delete makes room.
    shell(core, c.delete("b"))
    assert isinstance(shell(core, c.set("c")).reply, WriteOk)
    assert sorted(core.namespaces[NS].entries) == ["a", "c"]


def test_max_keys_zero_is_unlimited() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=0)
    for i in range(50):
        assert isinstance(shell(core, c.set(f"k{i}")).reply, WriteOk)
    assert len(core.namespaces[NS].entries) == 50


# --------------------------------------------------------------------------- set_many


def test_set_many_is_one_contiguous_batch() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a", b"0"), wall=500.0)
    d = shell(core, c.set_many([("a", b"1"), ("b", b"2"), ("a", b"3")]), wall=900.0)
    assert d.reply == WriteOk(EPOCH, 4, True)
    assert [e.seq for e in d.events] == [2, 3, 4]
    assert all(type(e) is KeySet for e in d.events)
    # created_at: kept for a live key, the same within the batch for a repeated key.
    assert [e.created_at for e in d.events] == [500.0, 900.0, 500.0]
    state = core.namespaces[NS]
    assert state.entry("a").value == b"3"
    assert state.seq == 4


def test_set_many_capacity_is_checked_for_the_whole_batch() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=3)
    shell(core, c.set("a"))
    before = fingerprint(core)
    d = shell(core, c.set_many([("b", b"1"), ("c", b"1"), ("d", b"1")]))  # 1 + 3 > 3
    assert isinstance(d.reply, Error) and d.reply.kind == "StorageError"
    assert "adds 3" in d.reply.message
    assert fingerprint(core) == before
    assert sorted(core.namespaces[NS].entries) == ["a"]  # not even b and c
    # Existing keys and repeats within the batch are not new keys.
    d = shell(core, c.set_many([("a", b"2"), ("b", b"1"), ("c", b"1"), ("b", b"2")]))
    assert isinstance(d.reply, WriteOk)
    assert sorted(core.namespaces[NS].entries) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("items", "kind"),
    [
        ([("ok1", b"1"), ("", b"1"), ("ok2", b"1")], "InvalidKey"),
        ([("ok1", b"1"), ("ok2", b"1"), ("bad\n", b"1")], "InvalidKey"),
        ([("ok1", b"1"), ("ok2", b"{")], "InvalidValue"),
        ([], "InvalidValue"),
    ],
)
def test_set_many_one_bad_item_refuses_all(items: list[tuple[str, bytes]], kind: str) -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("seed"))
    before = fingerprint(core)
    d = shell(core, c.set_many(items))
    assert isinstance(d.reply, Error) and d.reply.kind == kind
    assert d.events == []
    assert fingerprint(core) == before
    assert "ok1" not in core.namespaces[NS].entries


def test_set_many_with_ttl_applies_to_every_item() -> None:
    core, c = BrokerCore(EPOCH), Client()
    d = shell(core, c.set_many([("a", b"1"), ("b", b"1")], ttl=3.0), now=10.0)
    assert [e.ttl for e in d.events] == [3.0, 3.0]
    state = core.namespaces[NS]
    assert state.list_keys("*", 12.9) == ["a", "b"]
    assert state.list_keys("*", 13.0) == []


# --------------------------------------------------------------------------- delete


def test_delete_reports_whether_the_key_existed() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a"))
    d = shell(core, c.delete("a"))
    assert d.reply == WriteOk(EPOCH, 2, changed=True)
    assert d.events == [KeyDeleted(2, "a")]
    assert "a" not in core.namespaces[NS].entries
    d = shell(core, c.delete("a"))
    assert d.reply == WriteOk(EPOCH, 2, changed=False)
    assert d.events == []
    assert core.namespaces[NS].seq == 2


def test_delete_of_a_due_key_removes_it_but_reports_unchanged() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a", ttl=1.0), now=0.0)
    d = step(core, c.delete("a"), now=5.0)
    assert d.events == [KeyDeleted(2, "a")]
    assert d.reply == WriteOk(EPOCH, 2, changed=False)  # a reader already saw it absent
    assert "a" not in core.namespaces[NS].entries


# --------------------------------------------------------------------------- exactly once


def test_a_retried_request_is_applied_once_with_the_identical_reply() -> None:
    core, c = BrokerCore(EPOCH), Client()
    request = c.set("a", b"1")
    first = shell(core, request)
    after_first = fingerprint(core)
    retry = shell(core, request)
    assert retry.duplicate is True
    assert retry.reply == first.reply
    assert retry.events == []
    assert fingerprint(core) == after_first
    assert core.counters["duplicates"] == 1
    assert core.counters["writes"] == 1
    assert len(core.log.read(NS, 1, 100, 0.0)) == 1


def test_a_retried_set_many_and_delete_are_applied_once() -> None:
    core, c = BrokerCore(EPOCH), Client()
    many = c.set_many([("a", b"1"), ("b", b"2")])
    r1 = shell(core, many).reply
    assert shell(core, many).reply == r1
    delete = c.delete("a")
    r2 = shell(core, delete).reply
    shell(core, Client(b"other").set("a"))  # someone else re-creates "a"
    assert shell(core, delete).reply == r2  # the retry does not delete it again
    assert "a" in core.namespaces[NS].entries
    assert core.namespaces[NS].seq == 4


def test_a_retried_refusal_gets_the_same_refusal() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=1)
    shell(core, c.set("a"))
    refused = c.set("b")
    r1 = shell(core, refused).reply
    assert isinstance(r1, Error)
    assert shell(core, refused).reply == r1
    assert fingerprint(core) == (1, core.namespaces[NS].digest())


def test_an_older_request_number_is_refused_and_changes_nothing() -> None:
    core = BrokerCore(EPOCH)
    shell(core, Set(b"n", 5, NS, 0, "a", b"1"))
    before = fingerprint(core)
    d = shell(core, Set(b"n", 4, NS, 0, "b", b"1"))
    assert isinstance(d.reply, Error)
    assert d.reply.kind == "StorageError"
    assert "4" in d.reply.message and "5" in d.reply.message
    assert fingerprint(core) == before
    # A newer number is a new request.
    assert shell(core, Set(b"n", 6, NS, 0, "b", b"1")).reply == WriteOk(EPOCH, 2)


def test_request_numbers_are_per_client() -> None:
    core = BrokerCore(EPOCH)
    shell(core, Set(b"n1", 1, NS, 0, "a", b"1"))
    d = shell(core, Set(b"n2", 1, NS, 0, "b", b"1"))
    assert d.duplicate is False
    assert d.reply == WriteOk(EPOCH, 2)


def test_dedup_table_evicts_the_least_recently_used_client() -> None:
    table = DedupTable(capacity=2)
    ok = WriteOk(EPOCH, 1)
    table.remember(b"a", 1, ok)
    table.remember(b"b", 1, ok)
    assert table.lookup(b"a", 1) is ok  # touches "a"
    table.remember(b"c", 1, ok)  # evicts "b"
    assert table.lookup(b"b", 1) is None
    assert table.lookup(b"a", 1) is ok
    assert table.lookup(b"c", 2) is None  # a newer request is not a duplicate


# --------------------------------------------------------------------------- expiry


def test_expire_due_emits_contiguous_key_expired_events() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a", ttl=5.0), now=0.0)
    shell(core, c.set("b", ttl=10.0), now=0.0)
    shell(core, c.set("c", ttl=5.0), now=0.0)
    shell(core, c.set("d"), now=0.0)
    assert core.next_deadline() == 5.0
    assert core.expire_due(4.9) == []
    (d,) = core.expire_due(5.0)
    assert d.namespace == NS
    assert d.events == [KeyExpired(5, "a"), KeyExpired(6, "c")]
    assert d.reply == WriteOk(EPOCH, 6)
    assert core.namespaces[NS].seq == 4  # nothing applied before commit
    core.log.append(NS, d.events, 5.0)
    core.commit(d, 5.0)
    state = core.namespaces[NS]
    assert state.seq == 6
    assert sorted(state.entries) == ["b", "d"]
    (d,) = core.expire_due(100.0)
    assert d.events == [KeyExpired(7, "b")]
    core.commit(d, 100.0)
    assert sorted(core.namespaces[NS].entries) == ["d"]
    assert core.expire_due(1e9) == []
    assert core.counters["expired"] == 3


def test_expire_due_skips_overwritten_and_deleted_keys() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a", ttl=5.0))
    shell(core, c.set("b", ttl=5.0))
    shell(core, c.set("a", b"2"))  # no TTL any more
    shell(core, c.delete("b"))
    assert core.expire_due(10.0) == []
    assert core.namespaces[NS].live("a", 10.0) is not None


def test_expire_due_is_per_namespace() -> None:
    core = BrokerCore(EPOCH)
    one, two = Client(b"1", ns="one"), Client(b"2", ns="two")
    shell(core, one.set("x", ttl=1.0))
    shell(core, two.set("p"))
    shell(core, two.set("q", ttl=1.0))
    decisions = {d.namespace: d for d in core.expire_due(2.0)}
    assert decisions["one"].events == [KeyExpired(2, "x")]
    assert decisions["two"].events == [KeyExpired(3, "q")]


def test_an_uncommitted_expiry_decision_is_offered_again() -> None:
    core, c = BrokerCore(EPOCH), Client()
    shell(core, c.set("a", ttl=1.0))
    (lost,) = core.expire_due(2.0)  # e.g. the log append raised: nothing committed
    assert core.namespaces[NS].seq == 1
    again = core.expire_due(2.0)
    assert [d.events for d in again] == [lost.events]


# ---------------------------------------------------------------- open / snapshot / digest


def test_open_creates_then_agrees_on_max_keys() -> None:
    core = BrokerCore(EPOCH)
    assert core.open(Open(NS, 10)) == OpenReply(EPOCH, NS, 10, 0)
    shell(core, Client(max_keys=10).set("a"))
    assert core.open(Open(NS, 10)) == OpenReply(EPOCH, NS, 10, 1)


def test_open_with_mismatched_max_keys_is_a_storage_error_naming_both() -> None:
    core = BrokerCore(EPOCH)
    core.open(Open(NS, 10))
    reply = core.open(Open(NS, 20))
    assert isinstance(reply, Error)
    assert reply.kind == "StorageError"
    assert "max_keys=10" in reply.message and "max_keys=20" in reply.message
    assert core.namespaces[NS].max_keys == 10


def test_open_with_invalid_namespace() -> None:
    reply = BrokerCore(EPOCH).open(Open("bad/ns", 0))
    assert isinstance(reply, Error) and reply.kind == "InvalidNamespace"


def test_a_snapshot_job_reflects_the_state_with_remaining_ttls_in_chunks() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=7)
    shell(core, c.set("b", b"2", ttl=10.0), now=0.0)
    shell(core, c.set("a", b"1"), now=0.0)
    shell(core, c.set("c", b"3"), now=0.0)
    job = core.snapshot_job(Snapshot(NS, 7, 42, b"nonce"))
    assert not isinstance(job, Error)
    shell(core, c.set("d", b"4"), now=1.0)  # after the freeze: not in this snapshot
    first = job.next_chunk(4.0, 2)
    assert not job.done
    second = job.next_chunk(4.0, 2)
    assert job.done
    for n, reply in enumerate((first, second)):
        assert (reply.snap_id, reply.namespace, reply.epoch, reply.seq, reply.max_keys,
                reply.chunk, reply.last) == (42, NS, EPOCH, 3, 7, n, n == 1)
    rows = {k: decode_entry(r) for part in (first, second)
            for k, r in zip(part.keys, part.rows, strict=True)}
    assert sorted(rows) == ["a", "b", "c"]
    assert rows["b"].deadline == pytest.approx(6.0)  # a row carries the seconds left
    assert rows["a"].deadline is None
    assert (rows["a"].value, rows["a"].version) == (b"1", 2)


def test_a_snapshot_job_of_a_missing_namespace_creates_it_empty() -> None:
    core = BrokerCore(EPOCH)
    job = core.snapshot_job(Snapshot("fresh", 3, 1, b"n"))
    assert not isinstance(job, Error)
    reply = job.next_chunk(0.0, 100)
    assert (reply.seq, reply.keys, reply.rows, reply.max_keys, reply.last) == (
        0, [], [], 3, True)
    assert job.done
    assert core.namespaces["fresh"].max_keys == 3


def test_digest_reply() -> None:
    core = BrokerCore(EPOCH)
    shell(core, Client().set("a"))
    reply = core.digest(NS)
    assert isinstance(reply, DigestReply)
    assert (reply.seq, reply.keys, reply.digest) == (1, 1, core.namespaces[NS].digest())
    missing = core.digest("nope")
    assert isinstance(missing, Error) and missing.kind == "KeyNotFound"


# --------------------------------------------------------------------------- fetch and the log


def test_fetch_returns_exactly_the_missing_events() -> None:
    core, c = BrokerCore(EPOCH), Client()
    events = []
    for i in range(6):
        events += shell(core, c.set(f"k{i % 3}", str(i).encode())).events
    events += shell(core, c.delete("k0")).events
    reply = core.fetch(NS, EPOCH, 4, 10_000, 9, now=0.0)
    assert reply == FetchReply(9, NS, EPOCH, True, events[3:])
    assert [e.seq for e in reply.events] == [4, 5, 6, 7]
    # Nothing missing: available, empty.
    assert core.fetch(NS, EPOCH, 8, 10_000, 1, now=0.0) == FetchReply(1, NS, EPOCH, True, [])
    # The limit caps the answer.
    assert [e.seq for e in core.fetch(NS, EPOCH, 2, 3, 1, now=0.0).events] == [2, 3, 4]


def test_fetch_is_unavailable_when_retention_dropped_the_events() -> None:
    core, c = BrokerCore(EPOCH, log=MemoryLog(retention=4)), Client()
    for i in range(10):
        shell(core, c.set(f"k{i}"))
    assert core.log.first_seq(NS) == 7
    assert core.fetch(NS, EPOCH, 6, 100, 3, now=0.0) == FetchReply(3, NS, EPOCH, False)
    reply = core.fetch(NS, EPOCH, 7, 100, 3, now=0.0)
    assert reply.available is True
    assert [e.seq for e in reply.events] == [7, 8, 9, 10]


def test_fetch_with_another_epoch_or_namespace_is_unavailable() -> None:
    core = BrokerCore(EPOCH)
    shell(core, Client().set("a"))
    assert core.fetch(NS, "old-epoch", 1, 100, 1, now=0.0).available is False
    assert core.fetch(NS, "old-epoch", 1, 100, 1, now=0.0).epoch == EPOCH
    assert core.fetch("unknown", EPOCH, 1, 100, 1, now=0.0).available is False


def test_memory_log_re_stamps_ttl_as_remaining_seconds() -> None:
    log = MemoryLog()
    original = KeySet(1, "t", b"1", 0.0, 0.0, 10.0)
    log.append(NS, [original, KeySet(2, "p", b"1", 0.0, 0.0, None), KeyDeleted(3, "x")], 100.0)
    at = {now: log.read(NS, 1, 10, now) for now in (100.0, 104.0, 109.5, 120.0)}
    assert [evs[0].ttl for evs in at.values()] == pytest.approx([10.0, 6.0, 0.5, 0.0])
    assert all(evs[1].ttl is None for evs in at.values())
    assert all(evs[2] == KeyDeleted(3, "x") for evs in at.values())
    assert original.ttl == 10.0  # the logged event itself is not changed


def test_fetch_re_stamps_ttl_at_fetch_time() -> None:
    core = BrokerCore(EPOCH)
    shell(core, Client().set("t", ttl=30.0), now=50.0)
    (event,) = core.fetch(NS, EPOCH, 1, 10, 1, now=70.0).events
    assert event.ttl == pytest.approx(10.0)


def test_memory_log_read_bounds() -> None:
    log = MemoryLog(retention=3)
    assert log.read(NS, 1, 10, 0.0) is None
    assert log.first_seq(NS) is None
    log.append(NS, [KeySet(i, "k", b"1", 0.0, 0.0) for i in range(1, 6)], 0.0)
    assert log.first_seq(NS) == 3
    assert log.read(NS, 2, 10, 0.0) is None
    assert [e.seq for e in log.read(NS, 3, 10, 0.0)] == [3, 4, 5]
    assert [e.seq for e in log.read(NS, 4, 1, 0.0)] == [4]
    assert log.read(NS, 6, 10, 0.0) == []


# --------------------------------------------------------------------------- the Turn value


def test_a_turn_lists_records_then_replies_and_one_publish_per_namespace() -> None:
    from broker.protocol import HelloReply, published_codec
    from broker.records import NamespaceRecord

    core, a, b = BrokerCore(EPOCH), Client(b"a"), Client(b"b", ns="other")
    shell(core, a.set("t", ttl=1.0), now=0.0)
    hello = HelloReply(EPOCH, [], 1, 0.5)
    turn = core.run_turn([("r1", a.set("x")), ("r2", b.set("y")), ("r3", a.set("z")),
                          ("r4", Open("third", 5))], now=2.0, wall=1002.0,
                         held=[("h", hello)])
    # records: the expiry first (due at now), the new namespace before the batch that uses it
    kinds = [(type(r).__name__, r.namespace) for r in turn.records]
    assert kinds == [("BatchRecord", NS), ("BatchRecord", NS), ("NamespaceRecord", "other"),
                     ("BatchRecord", "other"), ("BatchRecord", NS), ("NamespaceRecord", "third")]
    assert turn.records[0].events == [KeyExpired(2, "t")]
    assert isinstance(turn.records[5], NamespaceRecord)
    # replies: held first, then each request's, in order, with the tag it came with
    assert [o.tag for o in turn.replies] == ["h", "r1", "r2", "r3", "r4"]
    assert turn.replies[1].reply == WriteOk(EPOCH, 3)
    assert turn.replies[3].reply == WriteOk(EPOCH, 4)
    assert turn.replies[4].reply == OpenReply(EPOCH, "third", 5, 0)
    # a fresh write's reply carries its own batch; the publishes merge per namespace
    codec = published_codec()
    assert codec.decode(turn.replies[1].events).events == [KeySet(3, "x", b"1", 1002.0, 1002.0)]
    published = {ns: codec.decode(body) for ns, body, _ in turn.publishes}
    assert [p.namespace for p in turn.publishes] == [NS, "other"]
    assert [e.seq for e in published[NS].events] == [2, 3, 4]
    assert [e.seq for e in published["other"].events] == [1]
    # a namespace with one batch this turn publishes exactly the bytes its reply carried
    assert turn.publishes[1].body == turn.replies[2].events
    # each publish's header frame states its batch's term, epoch and seq range
    assert [read_batch_header(p.header) for p in turn.publishes] == [
        BatchHeader(0, 2, 4, EPOCH), BatchHeader(0, 1, 1, EPOCH)]


def test_rollback_restores_everything_and_refuses_the_turn() -> None:
    from broker.protocol import HelloReply

    core, c = BrokerCore(EPOCH), Client()
    first = c.set("a", b"1")
    shell(core, first)
    before = fingerprint(core)
    hello = HelloReply(EPOCH, [], 1, 0.5)
    retry_of_durable = first
    fresh = c.set("b")
    turn = core.run_turn([("retry", retry_of_durable), ("fresh", fresh),
                          ("new-ns", Client(ns="brand-new").set("x")),
                          ("retry-fresh", fresh)], now=0.0, wall=1.0,
                         held=[("hello", hello), ("head", OpenReply(EPOCH, NS, 0, 2))])
    assert fingerprint(core) != before
    core.rollback(turn, "disk full")
    assert fingerprint(core) == before
    assert "brand-new" not in core.namespaces
    assert turn.records == [] and turn.publishes == []
    replies = {o.tag: o.reply for o in turn.replies}
    refusal = Error("StorageError", "disk full")
    assert replies == {
        "hello": hello,  # reads no state
        "head": refusal,  # read the rolled-back state
        "retry": WriteOk(EPOCH, 1),  # its write was durable before this turn
        "fresh": refusal,
        "new-ns": refusal,
        "retry-fresh": refusal,  # its original was rolled back with the turn
    }
    # the dedup table is back too: the fresh write is decided anew, not answered from memory
    assert shell(core, fresh).reply == WriteOk(EPOCH, 2)
    assert shell(core, fresh).duplicate


def test_a_namespace_created_between_turns_is_logged_by_the_next_turn() -> None:
    from broker.records import NamespaceRecord

    core = BrokerCore(EPOCH)
    job = core.snapshot_job(Snapshot("between", 4, 1, b"n"))
    assert not isinstance(job, Error)
    turn = core.run_turn([], now=0.0, wall=1.0)
    assert turn.records == [NamespaceRecord("between", 4)]
    core.rollback(turn, "disk full")  # the namespace stays, so its record waits for the next
    assert "between" in core.namespaces
    assert core.run_turn([], now=0.0, wall=1.0).records == [NamespaceRecord("between", 4)]


# --------------------------------------------------------------------------- bulk (issue 12)


def _fill(core: BrokerCore, c: Client, keys: list[str]) -> None:
    shell(core, c.set_many([(k, b"1") for k in keys]))


def test_delete_many_is_one_batch_of_consecutive_deletes_of_the_stored_keys() -> None:
    core, c = BrokerCore(EPOCH), Client()
    _fill(core, c, ["a", "b", "c"])
    r = shell(core, DeleteMany(c.client_id, 100, NS, 0, ["c", "zz", "a", "c"]))
    assert r.reply == WriteOk(EPOCH, 5, True, count=2)
    assert r.events == [KeyDeleted(4, "c"), KeyDeleted(5, "a")]  # absent and repeated skipped
    assert sorted(core.namespaces[NS].entries) == ["b"]
    none = shell(core, DeleteMany(c.client_id, 101, NS, 0, ["zz"]))
    assert none.reply == WriteOk(EPOCH, 5, False, count=0) and none.events == []


def test_delete_many_checks_every_key_and_its_bound_before_deleting_any() -> None:
    core, c = BrokerCore(EPOCH), Client()
    _fill(core, c, ["a"])
    bad = shell(core, DeleteMany(c.client_id, 100, NS, 0, ["a", ""]))
    assert isinstance(bad.reply, Error) and bad.reply.kind == "InvalidKey"
    big = shell(core, DeleteMany(c.client_id, 101, NS, 0, ["a"] * (MAX_BATCH_ITEMS + 1)))
    assert isinstance(big.reply, Error) and big.reply.kind == "InvalidValue"
    assert "a" in core.namespaces[NS].entries


def test_delete_pattern_deletes_exactly_the_live_matches_in_one_batch() -> None:
    core, c = BrokerCore(EPOCH), Client()
    _fill(core, c, ["user_1", "user_2", "user_x", "userz", "admin"])
    r = shell(core, DeletePattern(c.client_id, 100, NS, 0, "user_[0-9]"))
    assert r.reply == WriteOk(EPOCH, 7, True, count=2)
    assert [type(e) for e in r.events] == [KeyDeleted, KeyDeleted]
    assert [e.seq for e in r.events] == [6, 7]
    assert sorted(core.namespaces[NS].entries) == ["admin", "user_x", "userz"]
    nothing = shell(core, DeletePattern(c.client_id, 101, NS, 0, "nope*"))
    assert nothing.reply == WriteOk(EPOCH, 7, False, count=0)


def test_delete_pattern_refuses_a_bad_pattern_and_an_oversized_match_whole() -> None:
    core, c = BrokerCore(EPOCH), Client()
    bad = shell(core, DeletePattern(c.client_id, 1, NS, 0, "user_[a"))
    assert isinstance(bad.reply, Error) and bad.reply.kind == "PatternError"
    keys = [f"k{i:06d}" for i in range(MAX_PATTERN_DELETE + 1)]
    for i in range(0, len(keys), MAX_BATCH_ITEMS):
        shell(core, SetMany(c.client_id, 10 + i, NS, 0, [(k, b"1") for k in
                                                       keys[i:i + MAX_BATCH_ITEMS]]))
    before = fingerprint(core)
    big = shell(core, DeletePattern(c.client_id, 10**6, NS, 0, "k*"))
    assert isinstance(big.reply, Error) and big.reply.kind == "StorageError"
    assert str(MAX_PATTERN_DELETE) in big.reply.message
    assert fingerprint(core) == before  # nothing deleted


def test_drop_namespace_deletes_every_key_and_keeps_the_namespace_and_its_seq() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=7)
    _fill(core, c, ["a", "b"])
    r = shell(core, DropNamespace(c.client_id, 100, NS))
    assert r.reply == WriteOk(EPOCH, 4, True, count=2)
    state = core.namespaces[NS]
    assert (state.entries, state.seq, state.max_keys) == ({}, 4, 7)
    missing = shell(core, DropNamespace(c.client_id, 101, "other"))
    assert isinstance(missing.reply, Error) and missing.reply.kind == "KeyNotFound"
    assert "other" not in core.namespaces


def test_set_max_keys_changes_the_limit_through_the_log_and_refuses_below_the_count() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=5)
    _fill(core, c, ["a", "b", "c"])
    low = shell(core, SetMaxKeys(c.client_id, 100, NS, 2))
    assert isinstance(low.reply, Error) and low.reply.kind == "StorageError"
    assert "holds 3 keys" in low.reply.message
    assert core.namespaces[NS].max_keys == 5
    turn = core.run_turn([("t", SetMaxKeys(c.client_id, 101, NS, 3))], 0.0, 1000.0)
    assert turn.records == [NamespaceRecord(NS, 3)] and turn.publishes == []
    core.log.append_records(turn.records, 0.0)
    core.commit_turn(turn)
    assert turn.replies[0].reply == WriteOk(EPOCH, 3, True)
    assert core.namespaces[NS].max_keys == 3
    full = shell(core, Set(c.client_id, 102, NS, 0, "d", b"1"))
    assert isinstance(full.reply, Error) and "max_keys 3" in full.reply.message
    same = shell(core, SetMaxKeys(c.client_id, 103, NS, 3))
    assert same.reply == WriteOk(EPOCH, 3, False)


def test_a_rolled_back_set_max_keys_restores_the_limit_and_logs_nothing() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=5)
    _fill(core, c, ["a"])
    turn = core.run_turn([("t", SetMaxKeys(c.client_id, 100, NS, 9))], 0.0, 1000.0)
    core.rollback(turn, "disk full")
    assert core.namespaces[NS].max_keys == 5
    assert turn.replies[0].reply == Error("StorageError", "disk full")
    nxt = core.run_turn([], 0.0, 1000.0)
    assert nxt.records == []  # the refused limit is not carried into the next turn


def test_read_answers_from_the_broker_state_without_creating_anything() -> None:
    core, c = BrokerCore(EPOCH), Client(max_keys=50)
    shell(core, c.set("a", b'"x"'))
    shell(core, c.set("t", b"2", ttl=10.0), now=0.0)
    got = core.read(Read(NS, "get", ["a", "t", "zz", "a"]), now=4.0)
    assert isinstance(got, ReadReply)
    assert (got.found, got.seq, got.keys_count, got.max_keys) == (True, 2, 2, 50)
    assert [(e.key, e.value, e.version, e.size) for e in got.entries] == [
        ("a", b'"x"', 1, 3), ("t", b"2", 2, 1)]
    assert got.entries[1].ttl == pytest.approx(6.0)
    meta = core.read(Read(NS, "metadata", ["a"]), now=4.0)
    assert isinstance(meta, ReadReply) and meta.entries[0].value == b""
    assert meta.entries[0].size == 3
    expired = core.read(Read(NS, "exists", ["t"]), now=11.0)
    assert isinstance(expired, ReadReply) and expired.entries == []
    listed = core.read(Read(NS, "list", pattern="[a-s]*"), now=4.0)
    assert isinstance(listed, ReadReply) and listed.keys == ["a"]
    absent = core.read(Read("nope", "info"), now=0.0)
    assert absent == ReadReply(EPOCH, "nope", False)
    assert "nope" not in core.namespaces


def test_read_refuses_bad_input_with_the_documented_kind() -> None:
    core = BrokerCore(EPOCH)
    cases = [
        (Read(NS, "steal"), "InvalidValue"),
        (Read(NS, "get", [""]), "InvalidKey"),
        (Read(NS, "list", pattern="[z"), "PatternError"),
        (Read("bad\x00ns", "info"), "InvalidNamespace"),
        (Read(NS, "get", ["a"] * (MAX_BATCH_ITEMS + 1)), "InvalidValue"),
    ]
    for request, kind in cases:
        reply = core.read(request, now=0.0)
        assert isinstance(reply, Error) and reply.kind == kind, (request, reply)


# ---------------------------------------------------------------- a turn in doubt (LogInDoubt)


class DoubtfulLog(MemoryLog):
    """A log whose next flush raises LogInDoubt (its bytes "could not be cut away") and that
    stays in doubt until the test says the cut succeeded."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False
        self.owed = False

    @property  # type: ignore[override]
    def in_doubt(self) -> bool:
        return self.owed

    def flush(self) -> None:
        from broker.log import LogInDoubt

        if self.fail_next:
            self.fail_next, self.owed = False, True
            raise LogInDoubt("write to the log failed (injected) and its bytes could not be cut")


def _turn(core: BrokerCore, *requests: WriteRequest) -> list[object]:
    from broker.turn import persist

    turn = core.run_turn([(i, r) for i, r in enumerate(requests)], 0.0, 1.0)
    persist(core, core.log, turn)
    return [out.reply for out in turn.replies]


def test_a_turn_in_doubt_answers_nothing_and_its_retry_is_not_decided_again() -> None:
    from broker.core import IN_DOUBT

    log = DoubtfulLog()
    core = BrokerCore(EPOCH, log=log)
    a, b = b"a" * 12, b"b" * 12
    assert _turn(core, Set(a, 1, NS, 0, "k", b"1", None)) == [WriteOk(EPOCH, 1)]
    log.fail_next = True
    # the write in doubt, a retry of it in the same turn, and another client's write
    replies = _turn(core, Set(a, 2, NS, 0, "k", b"2", None), Set(a, 2, NS, 0, "k", b"2", None),
                    Set(b, 1, NS, 0, "j", b"3", None))
    assert replies == []  # neither WriteOk nor StorageError: the outcome is not known yet
    assert core.namespaces[NS].seq == 1 and core.namespaces[NS].entry("k").value == b"1"
    assert core.dedup.lookup(a, 2) is IN_DOUBT and core.dedup.lookup(b, 1) is IN_DOUBT
    # retries while the log is in doubt: still no answer, and not decided as new writes
    assert _turn(core, Set(a, 2, NS, 0, "k", b"2", None)) == []
    assert core.namespaces[NS].seq == 1
    # a write of a client not in doubt is decided as usual (here the log refuses nothing)
    c = b"c" * 12
    assert _turn(core, Set(c, 1, NS, 0, "x", b"4", None)) == [WriteOk(EPOCH, 2)]
    # an older request of the client in doubt is still answered from the table
    assert _turn(core, Set(a, 1, NS, 0, "k", b"1", None)) == [WriteOk(EPOCH, 1)]
    # the cut succeeded: the writes in doubt are refused for good, their retries told so
    log.owed = False
    core.settle_in_doubt()
    assert core.dedup.in_doubt == 0
    retry = _turn(core, Set(a, 2, NS, 0, "k", b"2", None))
    assert len(retry) == 1 and isinstance(retry[0], Error) and retry[0].kind == "StorageError"
    assert core.namespaces[NS].entry("k").value == b"1"  # it was never applied


def test_writes_in_doubt_are_never_evicted_from_the_dedup_table() -> None:
    """An evicted write in doubt would be decided again as a new write, and could be refused
    while the first may still come back."""
    from broker.core import IN_DOUBT

    table = DedupTable(capacity=2)
    table.mark_in_doubt(b"a", 5)
    for i in range(10):
        table.remember(bytes([i]) * 12, 1, WriteOk(EPOCH, i))
    assert table.lookup(b"a", 5) is IN_DOUBT
    # a newer request of that client answered meanwhile is not overwritten by the refusal
    table.remember(b"b", 1, WriteOk(EPOCH, 1))
    table.mark_in_doubt(b"b", 0)
    assert table.settle_in_doubt(Error("StorageError", "cut")) == 2
    assert table.lookup(b"b", 1) == WriteOk(EPOCH, 1)
    refused = table.lookup(b"a", 5)
    assert isinstance(refused, Error) and refused.message == "cut"
