"""NamespaceState: gap-free application, TTL as a view, the key index, snapshots, digests."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from sortedcontainers import SortedList

from broker.pattern import compile_pattern
from broker.protocol import KeyDeleted, KeyExpired, KeySet, KeyTouched
from broker.state import (
    HEADER_SIZE,
    BadSnapshotRow,
    NamespaceState,
    SeqGap,
    decode_entry,
    entry_json,
    pack_entry,
)


def ks(seq: int, key: str, value: bytes = b"1", ttl: float | None = None,
       created: float = 10.0, modified: float = 20.0) -> KeySet:
    return KeySet(seq, key, value, created, modified, ttl)


def view(state: NamespaceState) -> tuple:
    """Everything observable about a state, for 'unchanged' assertions."""
    return (
        state.seq,
        state.digest(),
        {k: (e.value, e.version, e.deadline) for k, e in
         ((k, decode_entry(raw)) for k, raw in state.entries.items())},
        list(state.index),
        state.next_deadline(),
    )


def filled(n: int = 3) -> NamespaceState:
    s = NamespaceState("ns")
    s.apply_batch([ks(i + 1, f"k{i}", str(i).encode()) for i in range(n)], now=0.0)
    return s


# --------------------------------------------------------------------------- apply_batch


def test_apply_batch_advances_seq_and_stores_entries() -> None:
    s = NamespaceState("ns", max_keys=5)
    s.apply_batch([ks(1, "a", b'"x"'), ks(2, "b", b"2")], now=0.0)
    assert s.seq == 2
    assert s.entry("a").value == b'"x"'
    assert s.entry("a").version == 1
    assert s.entry("b").version == 2
    assert list(s.index) == ["a", "b"]
    s.apply_batch([ks(3, "a", b"3", created=11.0, modified=30.0)], now=0.0)
    entry = s.entry("a")
    assert (entry.value, entry.version, entry.created_at, entry.modified_at) == (
        b"3", 3, 11.0, 30.0,
    )
    assert list(s.index) == ["a", "b"]  # an overwrite does not duplicate the index


def test_empty_batch_is_a_no_op() -> None:
    s = filled()
    before = view(s)
    s.apply_batch([], now=0.0)
    assert view(s) == before


@pytest.mark.parametrize(
    "seqs",
    [[5], [4, 6], [4, 4], [3], [1], [4, 5, 7], [2, 3, 4, 5]],
)
def test_gap_raises_and_leaves_state_unchanged(seqs: list[int]) -> None:
    s = filled(3)
    before = view(s)
    batch = [ks(seq, f"new{i}", b"9", ttl=5.0) for i, seq in enumerate(seqs)]
    with pytest.raises(SeqGap) as info:
        s.apply_batch(batch, now=0.0)
    assert view(s) == before  # all or nothing: even the contiguous head was not applied
    first_bad = next(i for i, seq in enumerate(seqs) if seq != 4 + i)
    assert info.value.expected == 4 + first_bad
    assert info.value.got == seqs[first_bad]
    assert "'ns'" in str(info.value)


def test_apply_batch_is_contiguous_across_batches() -> None:
    s = NamespaceState("ns")
    for seq in range(1, 50):
        s.apply_batch([ks(seq, f"k{seq % 7}")], now=0.0)
    assert s.seq == 49
    with pytest.raises(SeqGap):
        s.apply_batch([ks(51, "x")], now=0.0)
    assert s.seq == 49


def test_key_deleted_and_key_expired_remove_the_key() -> None:
    s = filled(3)
    s.apply_batch([KeyDeleted(4, "k0")], now=0.0)
    assert "k0" not in s.entries and "k0" not in s.index
    s.apply_batch([KeyExpired(5, "k1")], now=0.0)
    assert "k1" not in s.entries and "k1" not in s.index
    assert list(s.index) == ["k2"]
    assert s.seq == 5


def test_delete_or_expire_of_absent_key_still_advances_seq() -> None:
    s = filled(1)
    s.apply_batch([KeyDeleted(2, "nope"), KeyExpired(3, "gone")], now=0.0)
    assert s.seq == 3
    assert list(s.entries) == ["k0"]


def test_mixed_batch_applies_in_order() -> None:
    s = NamespaceState("ns")
    s.apply_batch([ks(1, "a", b"1"), KeyDeleted(2, "a"), ks(3, "a", b"3")], now=0.0)
    assert s.entry("a").value == b"3"
    assert s.entry("a").version == 3
    assert list(s.index) == ["a"]


# --------------------------------------------------------------------------- TTL as a view


def test_ttl_is_a_view_until_key_expired_arrives() -> None:
    s = NamespaceState("ns")
    s.apply_batch([ks(1, "t", ttl=10.0), ks(2, "p")], now=100.0)
    assert s.entry("t").deadline == 110.0
    assert s.live("t", 109.999) is not None
    assert s.list_keys("*", 109.999) == ["p", "t"]
    assert s.live_count(109.999) == 2
    # At the deadline the key is invisible to every read ...
    for now in (110.0, 500.0):
        assert s.live("t", now) is None
        assert s.list_keys("*", now) == ["p"]
        assert s.list_keys("t", now) == []
        assert s.list_keys("t*", now) == []
        assert s.live_count(now) == 1
    # ... but the state at seq 2 still holds it: only the event removes it.
    assert "t" in s.entries and "t" in s.index
    assert s.live("p", 500.0) is not None
    s.apply_batch([KeyExpired(3, "t")], now=500.0)
    assert "t" not in s.entries
    assert s.seq == 3


def test_ttl_counts_from_the_appliers_clock() -> None:
    a, b = NamespaceState("ns"), NamespaceState("ns")
    a.apply_batch([ks(1, "t", ttl=5.0)], now=0.0)
    b.apply_batch([ks(1, "t", ttl=5.0)], now=1000.0)
    assert a.live("t", 4.0) is not None and a.live("t", 5.0) is None
    assert b.live("t", 1004.0) is not None and b.live("t", 1005.0) is None
    assert a.digest() == b.digest()  # deadlines are not part of the digest


def test_overwrite_without_ttl_clears_the_deadline() -> None:
    s = NamespaceState("ns")
    s.apply_batch([ks(1, "t", ttl=1.0)], now=0.0)
    s.apply_batch([ks(2, "t", b"2")], now=0.0)
    assert s.entry("t").deadline is None
    assert s.live("t", 10.0) is not None


# --------------------------------------------------------------------------- due_expirations


def test_due_expirations_offers_due_keys_until_their_expire_event() -> None:
    s = NamespaceState("ns")
    s.apply_batch([ks(1, "a", ttl=1.0), ks(2, "b", ttl=2.0), ks(3, "c", ttl=3.0)], now=0.0)
    assert s.next_deadline() == 1.0
    assert s.due_expirations(0.5) == []
    assert s.due_expirations(2.0) == ["a", "b"]
    # not yet applied as KeyExpired events: offered again (a decision may have been dropped)
    assert s.due_expirations(2.0) == ["a", "b"]
    s.apply_batch([KeyExpired(4, "a"), KeyExpired(5, "b")], now=2.0)
    assert s.due_expirations(2.0) == []
    assert s.next_deadline() == 3.0
    assert s.due_expirations(10.0) == ["c"]
    s.apply_batch([KeyExpired(6, "c")], now=10.0)
    assert s.due_expirations(10.0) == []
    assert s.next_deadline() is None


def test_due_expirations_skips_stale_heap_items_after_overwrite() -> None:
    s = NamespaceState("ns")
    s.apply_batch([ks(1, "a", ttl=1.0), ks(2, "b", ttl=1.0), ks(3, "c", ttl=1.0)], now=0.0)
    s.apply_batch([ks(4, "a", b"2")], now=0.5)  # no TTL any more
    s.apply_batch([ks(5, "b", b"2", ttl=10.0)], now=0.5)  # later deadline
    s.apply_batch([KeyDeleted(6, "c")], now=0.5)
    assert s.next_deadline() == 1.0  # the stale item is still at the top; harmless
    assert s.due_expirations(5.0) == []
    assert s.due_expirations(10.5) == ["b"]


def test_due_expirations_includes_keys_from_a_snapshot() -> None:
    src = NamespaceState("ns")
    src.apply_batch([ks(1, "a", ttl=4.0), ks(2, "b")], now=0.0)
    copy = NamespaceState.from_snapshot("ns", 0, src.seq, *src.snapshot_rows(1.0), now=100.0)
    assert copy.entry("a").deadline == 103.0
    assert copy.due_expirations(102.9) == []
    assert copy.due_expirations(103.0) == ["a"]


# --------------------------------------------------------------------------- list_keys


class _SpyIndex(SortedList):
    """A key index that refuses full scans and counts range scans."""

    range_scans = 0

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("full scan of the key index")

    def irange(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        type(self).range_scans += 1
        return super().irange(*args, **kwargs)


def test_list_keys_with_prefix_uses_a_range_scan_of_the_index() -> None:
    s = NamespaceState("ns")
    keys = [f"{p}:{i}" for p in ("a", "b", "c") for i in range(50)]
    s.apply_batch([ks(i + 1, k) for i, k in enumerate(keys)], now=0.0)
    s.index = _SpyIndex(s.entries)
    _SpyIndex.range_scans = 0
    assert s.list_keys("b:*", 0.0) == sorted(f"b:{i}" for i in range(50))
    assert s.list_keys("b:1?", 0.0) == sorted(f"b:1{i}" for i in range(10))
    assert s.list_keys("c:4[5-9]", 0.0) == [f"c:4{i}" for i in range(5, 10)]
    assert s.list_keys("b:49", 0.0) == ["b:49"]  # exact: a lookup, no scan at all
    assert _SpyIndex.range_scans == 3
    with pytest.raises(AssertionError, match="full scan"):
        s.list_keys("*:1", 0.0)  # no literal prefix: scanning everything is the only way


def test_list_keys_prefix_scan_stops_at_the_prefix_boundary() -> None:
    s = NamespaceState("ns")
    keys = ["a", "ab", "ab\x7f", "abc", "abd", "ac", "b", "ab\U0001F600", "aa"]
    s.apply_batch([ks(i + 1, k) for i, k in enumerate(keys)], now=0.0)
    assert s.list_keys("ab*", 0.0) == sorted(["ab", "ab\x7f", "abc", "abd", "ab\U0001F600"])
    assert s.list_keys("ab?", 0.0) == sorted(["ab\x7f", "abc", "abd", "ab\U0001F600"])


def test_list_keys_results_are_sorted() -> None:
    s = NamespaceState("ns")
    s.apply_batch([ks(i + 1, k) for i, k in enumerate(["z", "b", "y", "a"])], now=0.0)
    assert s.list_keys("*", 0.0) == ["a", "b", "y", "z"]


@pytest.mark.parametrize("seed", range(4))
def test_list_keys_matches_brute_force_on_random_data(seed: int) -> None:
    rng = random.Random(seed)
    s = NamespaceState("ns")
    seq = 0
    now = 0.0
    for _ in range(400):
        key = "".join(rng.choice("ab:") for _ in range(rng.randint(1, 5)))
        seq += 1
        if rng.random() < 0.2 and key in s.entries:
            s.apply_batch([KeyDeleted(seq, key)], now)
        else:
            ttl = rng.choice([None, None, 1.0, 5.0])
            s.apply_batch([ks(seq, key, str(seq).encode(), ttl=ttl)], now)
        now += 0.05
    patterns = ["*", "a*", "ab*", "a:*", "ab:?", "a?b*", "*:", "[ab]:*", "a[!:]*", "b\\:*",
                "aaaaa", "ab", "::*", "?", "a*b", "b[a-b]*a"]
    for probe in (now - 3.0, now, now + 2.0, now + 100.0):
        for pattern in patterns:
            p = compile_pattern(pattern)
            expected = sorted(
                k for k, e in ((k, decode_entry(raw)) for k, raw in s.entries.items())
                if p.matches(k) and (e.deadline is None or e.deadline > probe)
            )
            assert s.list_keys(pattern, probe) == expected, (pattern, probe)
        assert s.live_count(probe) == len(s.list_keys("*", probe))
    assert s.list_keys("*", now + 100.0) != []  # some keys have no TTL


# --------------------------------------------------------------------------- snapshots & digest


def _populated() -> NamespaceState:
    s = NamespaceState("ns", max_keys=10)
    s.apply_batch([
        ks(1, "a", b'"alpha"', created=1.0, modified=1.0),
        ks(2, "b", b"[1,2]", ttl=50.0, created=2.0, modified=2.0),
        ks(3, "c", b"null", ttl=5.0),
        KeyDeleted(4, "zz"),
        ks(5, "a", b'"alpha2"', created=1.0, modified=5.0),
    ], now=100.0)
    return s


def test_snapshot_rows_are_sorted_with_remaining_ttl() -> None:
    s = _populated()
    keys, rows = s.snapshot_rows(now=120.0)
    assert keys == ["a", "b", "c"]
    a, b, c = map(decode_entry, rows)
    assert (a.value, a.version, a.created_at, a.modified_at, a.deadline) == (
        b'"alpha2"', 5, 1.0, 5.0, None,
    )
    assert rows[0] is s.entries["a"]  # no TTL: the stored object itself, not a copy
    assert b.deadline == pytest.approx(30.0)  # the row's expiry slot: the seconds left
    assert c.deadline == 0.0  # due but not yet expired: zero, never negative


def test_snapshot_round_trip_gives_equal_digest_and_entries() -> None:
    s = _populated()
    copy = NamespaceState.from_snapshot("ns", 10, s.seq, *s.snapshot_rows(110.0), now=500.0)
    assert copy.digest() == s.digest()
    assert copy.seq == s.seq == 5
    assert copy.max_keys == 10
    assert list(copy.index) == list(s.index)
    assert copy.entry("b").deadline == pytest.approx(540.0)
    assert copy.live("c", 500.0) is None  # was due at snapshot time: invisible at once
    # The copy keeps working as a state: the next event applies on top.
    copy.apply_batch([KeyExpired(6, "c")], now=500.0)
    s.apply_batch([KeyExpired(6, "c")], now=110.0)
    assert copy.digest() == s.digest()


def test_from_snapshot_is_built_fresh() -> None:
    rows = [pack_entry(b"1", 3, 0.0, 0.0, None)]
    one = NamespaceState.from_snapshot("ns", 0, 3, ["x"], rows, now=0.0)
    two = NamespaceState.from_snapshot("ns", 0, 3, ["x"], rows, now=0.0)
    one.apply_batch([ks(4, "y")], now=0.0)
    assert "y" not in two.entries
    assert list(two.index) == ["x"]


def test_empty_states_digest() -> None:
    assert NamespaceState("ns").digest() == NamespaceState("ns").digest()
    assert NamespaceState("ns").digest() != NamespaceState("other").digest()
    assert NamespaceState("ns").digest() != NamespaceState("ns", seq=1).digest()


class _Row(NamedTuple):
    key: str
    value: bytes
    version: int
    created_at: float
    modified_at: float
    ttl: float | None


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r._replace(value=b'"alphA2"'),
        lambda r: r._replace(value=b'"alpha2" '),
        lambda r: r._replace(version=r.version + 1),
        lambda r: r._replace(key="a2"),
    ],
    ids=["value", "value-length", "version", "key"],
)
def test_digest_differs_on_any_value_version_or_key_change(
    change: Callable[[_Row], _Row],
) -> None:
    s = _populated()
    keys, packed = s.snapshot_rows(100.0)
    rows = [_Row(k, e.value, e.version, e.created_at, e.modified_at, e.deadline)
            for k, e in zip(keys, map(decode_entry, packed), strict=True)]

    def rebuilt(rows: list[_Row]) -> NamespaceState:
        return NamespaceState.from_snapshot(
            "ns", 10, s.seq, [r.key for r in rows],
            [pack_entry(r.value, r.version, r.created_at, r.modified_at, r.ttl) for r in rows],
            now=100.0)

    assert rebuilt(rows).digest() == s.digest()
    rows[0] = change(rows[0])
    assert rebuilt(rows).digest() != s.digest()


def test_digest_ignores_metadata_and_deadlines() -> None:
    s = _populated()
    keys, rows = s.snapshot_rows(100.0)
    entries = [decode_entry(r) for r in rows]
    rows = [pack_entry(e.value, e.version, e.created_at + 7, e.modified_at + 7,
                       None if e.deadline is None else e.deadline + 99) for e in entries]
    other = NamespaceState.from_snapshot("ns", 0, s.seq, keys, rows, now=0.0)
    assert other.digest() == s.digest()


def test_digest_is_not_fooled_by_value_boundaries() -> None:
    one = NamespaceState("ns")
    one.apply_batch([ks(1, "a", b"12"), ks(2, "b", b"3")], now=0.0)
    two = NamespaceState("ns")
    two.apply_batch([ks(1, "a", b"1"), ks(2, "b", b"23")], now=0.0)
    assert one.digest() != two.digest()


# --------------------------------------------------------------------------- the stored entry


@pytest.mark.parametrize(("modified", "expiry", "size"), [
    (10.0, None, 17), (11.5, None, 25), (10.0, 99.0, 25), (11.5, 99.0, 33),
])
def test_a_stored_entry_is_one_bytes_object_with_a_header_of_its_flags_size(
    modified: float, expiry: float | None, size: int,
) -> None:
    raw = pack_entry(b'{"a":[1,2]}', 2**40 + 3, 10.0, modified, expiry)
    assert type(raw) is bytes and HEADER_SIZE[raw[0]] == size
    assert len(raw) == size + len(b'{"a":[1,2]}')
    e = decode_entry(raw)
    assert (e.value, e.version, e.created_at, e.modified_at, e.deadline, e.size) == (
        b'{"a":[1,2]}', 2**40 + 3, 10.0, modified, expiry, 11)
    assert entry_json(raw) == e.json() == {"a": [1, 2]}


def test_applied_events_are_stored_packed_and_touch_keeps_all_but_the_deadline() -> None:
    s = NamespaceState("ns")
    s.apply_batch([ks(1, "a", b'"v"', created=5.0, modified=5.0)], now=0.0)
    assert type(s.entries["a"]) is bytes and len(s.entries["a"]) == 17 + 3
    s.apply_batch([KeyTouched(2, "a", 4.0)], now=10.0)
    e = s.entry("a")
    assert (e.value, e.version, e.created_at, e.modified_at, e.deadline) == (
        b'"v"', 1, 5.0, 5.0, 14.0)
    assert s.due_expirations(14.0) == ["a"]
    s.apply_batch([KeyTouched(3, "a", None)], now=10.0)
    assert s.entry("a").deadline is None and s.entries["a"] == pack_entry(b'"v"', 1, 5.0, 5.0,
                                                                          None)
    assert s.due_expirations(100.0) == []  # the old deadline's heap item is stale


def test_snapshot_rows_without_ttl_are_stored_as_the_very_objects_given() -> None:
    rows = [pack_entry(b"1", 1, 0.0, 0.0, None), pack_entry(b"2", 2, 0.0, 3.0, None),
            pack_entry(b"3", 3, 0.0, 0.0, 7.0)]
    s = NamespaceState.from_snapshot("ns", 0, 3, ["a", "b", "c"], rows, now=100.0)
    assert s.entries["a"] is rows[0] and s.entries["b"] is rows[1]
    assert s.entry("c").deadline == 107.0  # the TTL slot became a deadline on this clock
    assert s.digest() == NamespaceState.from_snapshot("ns", 0, 3, ["a", "b", "c"], rows,
                                                      now=0.0).digest()


@pytest.mark.parametrize("row", [
    b"", b"\x00" * 16, b"\x04" + b"\x00" * 40, b"\x01" + b"\x00" * 20,
    b"\x03" + b"\x00" * 30,
], ids=["empty", "short", "unknown-flag", "flag-1-short", "flag-3-short"])
def test_a_malformed_snapshot_row_is_refused(row: bytes) -> None:
    with pytest.raises(BadSnapshotRow):
        NamespaceState.from_snapshot("ns", 0, 1, ["k"], [row], now=0.0)


def test_snapshot_keys_and_rows_must_pair_up() -> None:
    with pytest.raises(BadSnapshotRow):
        NamespaceState.from_snapshot("ns", 0, 1, ["k", "j"], [pack_entry(b"1", 1, 0.0, 0.0,
                                                                         None)], now=0.0)
