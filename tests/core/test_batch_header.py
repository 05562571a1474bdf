"""The header frame of a published batch, and the replica's decision to drop a batch by it.

A node drops the stream copy of its own write (and any batch it already holds) from the header
alone, without decoding the body. That is only safe if the drop has exactly the effect that
``on_batch`` of the decoded batch would have had, so every case here compares the two."""

from __future__ import annotations

import copy

import pytest

from broker.protocol import (
    BATCH_HEADER,
    BatchHeader,
    EventBatch,
    FetchReply,
    batch_header,
    read_batch_header,
)
from node.replica import Phase, Replica
from tests.core.test_replica import NS, A, B, ks, live_replica, observe


def test_header_round_trip() -> None:
    frame = batch_header("0123456789abcdef", 7, 5, 9)
    assert len(frame) == BATCH_HEADER.size + 16
    assert read_batch_header(frame) == BatchHeader(7, 5, 9, "0123456789abcdef")


@pytest.mark.parametrize("frame", [
    b"",
    b"\x01" * (BATCH_HEADER.size - 1),  # too short
    b"\x02" + batch_header(A, 0, 1, 1)[1:],  # another header version
    batch_header(A, 0, 0, 0),  # no events
    batch_header(A, 0, 5, 4),  # seqs out of order
    batch_header(A, 0, 1, 1)[:BATCH_HEADER.size] + b"\xff\xfe",  # epoch not UTF-8
])
def test_unreadable_header_is_none_never_an_error(frame: bytes) -> None:
    assert read_batch_header(frame) is None


def states(r: Replica) -> tuple:
    return observe(r) + (r.term, r.last_heard, r.stale_dropped, r.phase)


def decoded_path(r: Replica, b: EventBatch, now: float) -> Replica:
    """A copy of ``r`` after ``on_batch`` of the decoded batch (the path the header skips)."""
    other = copy.deepcopy(r)
    assert other.on_batch(b, now) == []
    return other


def test_own_write_copy_is_skipped_with_the_effect_of_on_batch() -> None:
    r = live_replica(A, seq=3)
    b = EventBatch(NS, A, [ks(2, "a"), ks(3, "b")], term=2)
    expected = decoded_path(r, b, 5.0)
    assert r.skip_batch(A, 2, 3, 5.0) is True
    assert states(r) == states(expected)
    assert (r.term, r.last_heard, r.skipped) == (2, 5.0, 1)


def test_batch_with_anything_new_is_not_skipped() -> None:
    r = live_replica(A, seq=3)
    before = states(r)
    assert r.skip_batch(A, 0, 4, 1.0) is False  # seq 4 is new: decode and apply it
    assert r.skip_batch(B, 0, 2, 1.0) is False  # another epoch: on_batch resyncs
    assert states(r) == before and r.skipped == 0


@pytest.mark.parametrize("phase", [Phase.JOINING, Phase.REPAIRING, Phase.RESYNCING])
def test_not_skipped_unless_live(phase: Phase) -> None:
    r = live_replica(A, seq=3)
    r.phase = phase  # buffered or replayed there: on_batch decides, not the header
    before = states(r)
    assert r.skip_batch(A, 0, 2, 1.0) is False
    assert states(r) == before


def test_joining_replica_without_state_is_not_skipped() -> None:
    r = Replica(NS, 0)
    r.start(0.0)
    assert r.skip_batch(A, 0, 1, 1.0) is False


def test_deposed_primary_batch_is_skipped_as_stale() -> None:
    r = live_replica(A, seq=3)
    r.term = 5
    b = EventBatch(NS, A, [ks(4, "x")], term=4)  # new seqs, but from an older term
    expected = decoded_path(r, b, 9.0)
    assert r.skip_batch(A, 4, 4, 9.0) is True
    assert states(r) == states(expected)  # never applied, not heard from, counted stale
    assert (r.stale_dropped, r.seq, r.skipped) == (1, 3, 1)


def test_duplicates_after_a_repair_are_skipped() -> None:
    r = live_replica(A, seq=3)
    r.on_batch(EventBatch(NS, A, [ks(6, "g")]), 1.0)  # gap: repair 4..
    assert r.phase is Phase.REPAIRING
    # while repairing the header cannot decide: the batch is buffered as before
    assert r.skip_batch(A, 0, 7, 1.5) is False
    assert r.pending_id is not None
    r.on_fetch(FetchReply(r.pending_id, NS, A, True, [ks(4, "d"), ks(5, "e"), ks(6, "g")]),
               2.0)
    assert (r.phase, r.seq) == (Phase.LIVE, 6)
    # the stream's copies of what the repair brought are dropped undecoded
    assert r.skip_batch(A, 0, 5, 3.0) is True and r.skip_batch(A, 0, 6, 3.0) is True
    assert r.skipped == 2 and r.seq == 6


def test_skip_never_changes_the_state() -> None:
    r = live_replica(A, seq=3, entries={"a": b"1"})
    assert r.state is not None
    digest = r.state.digest()
    for last in (1, 2, 3):
        assert r.skip_batch(A, 0, last, 1.0)
    assert r.state.digest() == digest and r.changes == []
