"""The replica's sync state machine, driven with plain-float clocks and hand-made messages."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from broker.protocol import (
    EventBatch,
    FetchReply,
    Heartbeat,
    KeyDeleted,
    KeySet,
    SnapshotReply,
)
from broker.state import pack_entry
from node.replica import (
    TRANSITIONS,
    DropBarrier,
    Phase,
    Replica,
    RequestFetch,
    RequestSnapshot,
)

NS = "ns"
A, B = "epoch-a", "epoch-b"


def ks(seq: int, key: str, value: bytes = b"1", ttl: float | None = None) -> KeySet:
    return KeySet(seq, key, value, 0.0, 0.0, ttl)


def batch(epoch: str, *events: KeySet | KeyDeleted) -> EventBatch:
    return EventBatch(NS, epoch, list(events))


def tick(r: Replica, now: float) -> list:
    """``on_tick`` without its DropBarrier actions (test_snapshot_barriers covers those)."""
    return [a for a in r.on_tick(now) if not isinstance(a, DropBarrier)]


def snap(snap_id: int, epoch: str, seq: int, entries: dict[str, bytes],
         max_keys: int = 0) -> SnapshotReply:
    keys = sorted(entries)
    rows = [pack_entry(entries[k], seq, 0.0, 0.0, None) for k in keys]
    return SnapshotReply(snap_id, NS, epoch, seq, max_keys, keys, rows)


def values(r: Replica) -> dict[str, bytes]:
    assert r.state is not None
    return {k: r.state.entry(k).value for k in r.state.entries}


def observe(r: Replica) -> tuple:
    """Everything the state machine owns, for 'unchanged' assertions."""
    return (
        r.phase,
        r.seq,
        None if r.state is None else r.state.digest(),
        r.epoch,
        r.pending_id,
        r.resyncs,
        r.repairs,
        r.head_seq,
        r.max_keys,
    )


def live_replica(epoch: str = A, seq: int = 3, entries: dict[str, bytes] | None = None,
                 now: float = 0.0) -> Replica:
    r = Replica(NS, 0, request_timeout=3.0)
    (ask,) = r.start(now)
    entries = {"a": b"1", "b": b"2"} if entries is None else entries
    assert r.on_snapshot(snap(ask.snap_id, epoch, seq, entries), now) == []
    assert r.phase is Phase.LIVE
    return r


def repairing_replica(now: float = 0.0) -> tuple[Replica, RequestFetch]:
    r = live_replica(now=now)
    (ask,) = r.on_batch(batch(A, ks(5, "e")), now)  # seq 4 missing
    assert isinstance(ask, RequestFetch)
    assert r.phase is Phase.REPAIRING
    return r, ask


def resyncing_replica(now: float = 0.0) -> tuple[Replica, RequestSnapshot]:
    r = live_replica(now=now)
    (ask,) = r.on_heartbeat(Heartbeat(NS, B, 7), now)
    assert isinstance(ask, RequestSnapshot)
    assert r.phase is Phase.RESYNCING
    return r, ask


# --------------------------------------------------------------------------- joining


def test_start_asks_for_a_snapshot() -> None:
    r = Replica(NS, 5)
    assert r.start(0.0) == [RequestSnapshot(NS, 1)]
    assert r.phase is Phase.JOINING
    assert r.state is None and r.seq == 0
    assert r.pending_id == 1


def test_joining_buffers_events_until_the_snapshot() -> None:
    r = Replica(NS, 0)
    (ask,) = r.start(0.0)
    assert r.on_batch(batch(A, ks(2, "a", b'"stale-2"')), 0.1) == []
    assert r.on_batch(batch(A, ks(3, "a", b'"stale-3"'), ks(4, "b", b'"four"')), 0.2) == []
    assert r.on_heartbeat(Heartbeat(NS, A, 4), 0.3) == []
    assert r.on_batch(batch(A, ks(5, "c", b'"five"')), 0.4) == []
    assert r.state is None and r.phase is Phase.JOINING
    assert r.head_seq == 5
    # The snapshot reflects seq 3: events <= 3 are dropped, later ones applied in order.
    actions = r.on_snapshot(snap(ask.snap_id, A, 3, {"a": b'"snap"', "z": b"0"}), 1.0)
    assert actions == []
    assert r.phase is Phase.LIVE
    assert r.seq == 5
    assert values(r) == {"a": b'"snap"', "z": b"0", "b": b'"four"', "c": b'"five"'}
    assert r.epoch == A
    assert r.pending_id is None


def test_buffered_events_of_another_epoch_are_dropped_at_install() -> None:
    r = Replica(NS, 0)
    (ask,) = r.start(0.0)
    r.on_batch(batch(B, ks(4, "other-history")), 0.0)
    r.on_batch(batch(A, ks(4, "mine")), 0.0)
    r.on_snapshot(snap(ask.snap_id, A, 3, {}), 0.0)
    assert values(r) == {"mine": b"1"}
    assert r.seq == 4


def test_buffered_gap_after_the_snapshot_asks_for_a_fetch() -> None:
    r = Replica(NS, 0)
    (ask,) = r.start(0.0)
    r.on_batch(batch(A, ks(6, "x")), 0.0)  # 4 and 5 never arrived
    actions = r.on_snapshot(snap(ask.snap_id, A, 3, {}), 0.0)
    assert actions == [RequestFetch(NS, A, 4, r.pending_id)]
    assert r.phase is Phase.REPAIRING
    assert r.seq == 3


def test_buffer_overflow_restarts_the_join() -> None:
    r = Replica(NS, 0, max_buffer=3)
    (first,) = r.start(0.0)
    r.on_batch(batch(A, ks(1, "a"), ks(2, "b")), 0.0)
    actions = r.on_batch(batch(A, ks(3, "c"), ks(4, "d")), 0.0)
    assert actions == [RequestSnapshot(NS, first.snap_id + 1)]
    assert r.phase is Phase.JOINING
    assert r.on_snapshot(snap(first.snap_id, A, 0, {}), 0.0) == []  # old id: stale
    assert r.state is None
    r.on_snapshot(snap(first.snap_id + 1, A, 1, {"a": b"1"}), 0.0)
    assert r.seq == 1  # the forgotten buffer is not replayed
    assert values(r) == {"a": b"1"}


# --------------------------------------------------------------------------- live


def test_live_applies_contiguous_batches_and_drops_duplicates() -> None:
    r = live_replica(seq=3)
    assert r.on_batch(batch(A, ks(4, "c", b"4")), 1.0) == []
    assert r.seq == 4
    digest = r.state.digest()
    assert r.on_batch(batch(A, ks(4, "c", b"changed")), 1.1) == []  # duplicate
    assert r.on_batch(batch(A, ks(2, "a", b"old"), ks(3, "b", b"old")), 1.2) == []
    assert r.state.digest() == digest
    assert r.phase is Phase.LIVE
    # A batch overlapping what we have applies only its new tail.
    assert r.on_batch(batch(A, ks(4, "c", b"dup"), ks(5, "d", b"5")), 1.3) == []
    assert r.seq == 5
    assert values(r)["c"] == b"4" and values(r)["d"] == b"5"
    assert r.last_heard == 1.3


def test_live_applies_deletes() -> None:
    r = live_replica(seq=3, entries={"a": b"1", "b": b"2"})
    r.on_batch(batch(A, KeyDeleted(4, "a")), 0.0)
    assert values(r) == {"b": b"2"}


def test_gap_asks_for_the_missing_range_and_repairs() -> None:
    r = live_replica(seq=3)
    before = r.state.digest()
    actions = r.on_batch(batch(A, ks(6, "f")), 1.0)
    assert actions == [RequestFetch(NS, A, 4, r.pending_id)]
    assert r.phase is Phase.REPAIRING
    assert r.repairs == 1
    assert r.seq == 3 and r.state.digest() == before  # nothing guessed, nothing skipped
    assert r.on_batch(batch(A, ks(7, "g")), 1.1) == []  # buffered while repairing
    assert r.on_heartbeat(Heartbeat(NS, A, 7), 1.2) == []  # no second fetch
    reply = FetchReply(actions[0].request_id, NS, A, True, [ks(4, "d"), ks(5, "e"), ks(6, "f")])
    assert r.on_fetch(reply, 1.5) == []
    assert r.phase is Phase.LIVE
    assert r.seq == 7
    assert set(values(r)) == {"a", "b", "d", "e", "f", "g"}
    assert r.pending_id is None


def test_a_fetch_shorter_than_the_known_head_asks_for_more() -> None:
    r, ask = repairing_replica()
    r.on_heartbeat(Heartbeat(NS, A, 9), 0.0)
    actions = r.on_fetch(FetchReply(ask.request_id, NS, A, True, [ks(4, "d")]), 0.0)
    assert r.seq == 5  # 4 from the log, then the buffered 5
    assert actions == [RequestFetch(NS, A, 6, r.pending_id)]
    assert r.phase is Phase.REPAIRING


def test_fetch_not_available_falls_back_to_a_snapshot() -> None:
    r, ask = repairing_replica()
    before = r.state.digest()
    actions = r.on_fetch(FetchReply(ask.request_id, NS, A, False), 2.0)
    assert actions == [RequestSnapshot(NS, r.pending_id)]
    assert r.pending_id != ask.request_id
    assert r.phase is Phase.RESYNCING
    assert r.resyncs == 1
    assert r.state.digest() == before  # the old state is still served meanwhile
    r.on_snapshot(snap(r.pending_id, A, 10, {"only": b"x"}), 2.5)
    assert r.phase is Phase.LIVE
    assert (r.seq, values(r)) == (10, {"only": b"x"})


def test_fetch_whose_events_do_not_continue_the_state_resyncs() -> None:
    r, ask = repairing_replica()
    actions = r.on_fetch(FetchReply(ask.request_id, NS, A, True, [ks(6, "x")]), 0.0)
    assert actions == [RequestSnapshot(NS, r.pending_id)]
    assert r.phase is Phase.RESYNCING
    assert r.seq == 3


def test_heartbeat_ahead_in_live_triggers_a_fetch() -> None:
    r = live_replica(seq=3)
    assert r.on_heartbeat(Heartbeat(NS, A, 3), 1.0) == []
    assert r.on_heartbeat(Heartbeat(NS, A, 2), 1.0) == []  # behind: late heartbeat
    assert r.phase is Phase.LIVE
    actions = r.on_heartbeat(Heartbeat(NS, A, 5), 2.0)
    assert actions == [RequestFetch(NS, A, 4, r.pending_id)]
    assert r.phase is Phase.REPAIRING
    assert r.head_seq == 5
    assert r.last_heard == 2.0


# --------------------------------------------------------------------------- epochs


def test_epoch_change_in_heartbeat_resyncs_from_a_fresh_snapshot() -> None:
    r = live_replica(A, seq=3, entries={"x": b"1", "y": b"2"})
    old_state = r.state
    actions = r.on_heartbeat(Heartbeat(NS, B, 1), 1.0)
    assert actions == [RequestSnapshot(NS, r.pending_id)]
    assert r.phase is Phase.RESYNCING
    assert r.resyncs == 1
    assert values(r) == {"x": b"1", "y": b"2"}  # still served until the new one is ready
    assert r.on_heartbeat(Heartbeat(NS, B, 1), 1.1) == []  # no second request
    r.on_snapshot(snap(r.pending_id, B, 1, {"z": b"3"}), 2.0)
    assert r.phase is Phase.LIVE
    assert r.epoch == B
    assert r.seq == 1  # a new history: seq may restart
    assert values(r) == {"z": b"3"}  # x and y are gone: built fresh, never merged
    assert r.state is not old_state
    assert set(old_state.entries) == {"x", "y"}  # the old one was not edited in place


def test_epoch_change_in_batch_resyncs_and_keeps_that_batch() -> None:
    r = live_replica(A, seq=7, entries={"x": b"1"})
    actions = r.on_batch(batch(B, ks(2, "n", b"new")), 1.0)
    assert actions == [RequestSnapshot(NS, r.pending_id)]
    assert r.phase is Phase.RESYNCING
    assert values(r) == {"x": b"1"}  # the other history was not applied
    r.on_batch(batch(B, ks(3, "m", b"new")), 1.1)
    r.on_snapshot(snap(r.pending_id, B, 1, {"k": b"0"}), 2.0)
    assert r.phase is Phase.LIVE
    assert r.seq == 3
    assert values(r) == {"k": b"0", "n": b"new", "m": b"new"}


def test_epoch_change_while_repairing_resyncs() -> None:
    r, ask = repairing_replica()
    actions = r.on_heartbeat(Heartbeat(NS, B, 1), 1.0)
    assert actions == [RequestSnapshot(NS, r.pending_id)]
    assert r.phase is Phase.RESYNCING
    # The answer to the abandoned fetch is stale now.
    assert r.on_fetch(FetchReply(ask.request_id, NS, A, True, [ks(4, "d")]), 1.1) == []
    assert r.seq == 3


def test_fetch_reply_does_not_replay_batches_of_another_epoch() -> None:
    r, ask = repairing_replica()  # epoch A at seq 3, fetching 4.., batch 5 buffered
    r.on_batch(batch(B, ks(6, "from-epoch-b")), 0.1)  # another history, buffered
    r.on_fetch(FetchReply(ask.request_id, NS, A, True, [ks(4, "d")]), 0.2)
    assert "from-epoch-b" not in values(r)


# --------------------------------------------------------------------------- stale replies


def test_stale_snapshot_replies_are_ignored() -> None:
    r = Replica(NS, 0, request_timeout=3.0)
    (first,) = r.start(0.0)
    (second,) = tick(r, 3.0)
    assert second.snap_id != first.snap_id
    before = observe(r)
    assert r.on_snapshot(snap(first.snap_id, A, 9, {"old": b"1"}), 3.1) == []
    assert observe(r) == before
    assert r.state is None
    r.on_snapshot(snap(second.snap_id, A, 2, {"new": b"1"}), 3.2)
    assert values(r) == {"new": b"1"}
    # A late duplicate of the installed answer is ignored too.
    before = observe(r)
    assert r.on_snapshot(snap(second.snap_id, A, 9, {"dup": b"1"}), 3.3) == []
    assert observe(r) == before


def test_stale_snapshot_while_resyncing_leaves_the_served_state() -> None:
    r, ask = resyncing_replica()
    before = observe(r)
    assert r.on_snapshot(snap(ask.snap_id - 1, B, 5, {"q": b"1"}), 1.0) == []
    assert r.on_snapshot(snap(ask.snap_id + 1, B, 5, {"q": b"1"}), 1.0) == []
    assert observe(r) == before


def test_stale_fetch_replies_are_ignored() -> None:
    r, first = repairing_replica(now=0.0)
    (second,) = tick(r, 10.0)
    assert isinstance(second, RequestFetch) and second.request_id != first.request_id
    assert second.from_seq == first.from_seq
    before = observe(r)
    assert r.on_fetch(FetchReply(first.request_id, NS, A, True, [ks(4, "d")]), 10.1) == []
    assert r.on_fetch(FetchReply(first.request_id, NS, A, False), 10.1) == []
    assert observe(r) == before
    assert r.on_fetch(FetchReply(second.request_id, NS, A, True, [ks(4, "d")]), 10.2) == []
    assert r.seq == 5 and r.phase is Phase.LIVE


# --------------------------------------------------------------------------- the table


def _in_state(sync: Phase) -> Replica:
    if sync is Phase.JOINING:
        r = Replica(NS, 0)
        r.start(0.0)
        return r
    if sync is Phase.LIVE:
        return live_replica()
    if sync is Phase.REPAIRING:
        return repairing_replica()[0]
    return resyncing_replica()[0]


def _answer_id(r: Replica) -> int:
    """The id that the replica would accept if the input were allowed in its state."""
    return r.pending_id if r.pending_id is not None else r._next_id


# Inputs that each carry an id the replica is waiting for (or just used) and a content that
# would change the state if accepted: only the transition table can reject them.
_DELIVER: dict[str, Callable[[Replica], list]] = {
    "snapshot": lambda r: r.on_snapshot(snap(_answer_id(r), B, 42, {"new": b"1"}), 5.0),
    "fetch": lambda r: r.on_fetch(
        FetchReply(_answer_id(r), NS, r.epoch or A, True, [ks(r.seq + 1, "new")]), 5.0
    ),
    "probe": lambda r: r.on_probe(B, 42, 5.0),
}

_ALL_INPUTS = frozenset().union(*TRANSITIONS.values())
_REFUSED = [
    (sync, kind)
    for sync in Phase
    for kind in sorted(_ALL_INPUTS - TRANSITIONS[sync])
    if kind in _DELIVER
]


def test_every_state_has_a_row_and_refuses_something() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert {"snapshot", "fetch"} <= _ALL_INPUTS
    assert {sync for sync, _ in _REFUSED} == set(Phase)


@pytest.mark.parametrize(("sync", "kind"), _REFUSED, ids=[f"{s.name}-{k}" for s, k in _REFUSED])
def test_inputs_not_in_the_table_are_ignored_and_change_nothing(sync: Phase, kind: str) -> None:
    r = _in_state(sync)
    assert r.phase is sync
    before = observe(r)
    state_before = r.state
    assert _DELIVER[kind](r) == []
    assert observe(r) == before
    assert r.state is state_before
    assert r.phase is sync


@pytest.mark.parametrize("sync", [Phase.JOINING, Phase.RESYNCING])
def test_snapshot_is_in_the_table_where_it_is_accepted(sync: Phase) -> None:
    assert "snapshot" in TRANSITIONS[sync]
    r = _in_state(sync)
    _DELIVER["snapshot"](r)
    assert r.phase is Phase.LIVE and r.seq == 42


# --------------------------------------------------------------------------- timers


def test_on_tick_re_asks_a_snapshot_with_a_new_id_after_the_timeout() -> None:
    r = Replica(NS, 0, request_timeout=3.0)
    (first,) = r.start(10.0)
    assert tick(r, 12.99) == []
    assert r.pending_id == first.snap_id
    (second,) = tick(r, 13.0)
    assert second == RequestSnapshot(NS, first.snap_id + 1)
    assert r.pending_id == second.snap_id
    assert tick(r, 15.0) == []  # the timeout restarted with the new request
    (third,) = tick(r, 16.0)
    assert third.snap_id == second.snap_id + 1
    assert r.phase is Phase.JOINING


def test_on_tick_re_asks_a_fetch_and_a_resync_snapshot() -> None:
    r, ask = repairing_replica(now=0.0)
    assert tick(r, 2.0) == []
    (again,) = tick(r, 3.0)
    assert again == RequestFetch(NS, A, 4, ask.request_id + 1)
    assert r.phase is Phase.REPAIRING
    r2, ask2 = resyncing_replica(now=0.0)
    (again2,) = tick(r2, 3.0)
    assert again2 == RequestSnapshot(NS, ask2.snap_id + 1)
    assert r2.phase is Phase.RESYNCING


def test_on_tick_in_live_does_not_re_ask() -> None:
    r = live_replica(now=0.0)
    r.on_heartbeat(Heartbeat(NS, A, r.seq), 100.0)
    assert tick(r, 100.5) == []
    assert r.phase is Phase.LIVE and r.pending_id is None


# --------------------------------------------------------------------------- probes


def test_silence_in_live_sends_a_probe_and_its_answer_is_acted_on() -> None:
    from node.replica import RequestProbe

    r = live_replica(now=0.0)
    r.on_heartbeat(Heartbeat(NS, A, r.seq), 0.0)
    assert tick(r, r.silence_timeout) == []  # not yet silent
    (probe,) = tick(r, r.silence_timeout + 0.1)
    assert probe == RequestProbe(NS, 0)
    assert tick(r, r.silence_timeout + 0.2) == []  # one probe per silence interval
    assert r.on_probe(A, r.seq, 2.0) == []  # nothing new
    (ask,) = r.on_probe(A, r.seq + 2, 2.1)
    assert ask == RequestFetch(NS, A, r.seq + 1, r.pending_id)
    r2 = live_replica(now=0.0)
    (resync,) = r2.on_probe(B, 0, 1.0)
    assert isinstance(resync, RequestSnapshot)
    assert r2.phase is Phase.RESYNCING


def test_a_batch_of_another_epoch_while_repairing_leads_to_a_snapshot_not_a_merge() -> None:
    """Epochs are random ids: the replica cannot tell a dead history from a newer one, so a
    batch of another epoch seen while repairing ends in a snapshot, and is never applied."""
    r = live_replica(B, seq=3, entries={})
    r.on_batch(batch(B, ks(5, "x")), 0.0)  # gap: fetch 4..
    r.on_batch(batch(A, ks(100, "stale")), 0.1)  # a message of another epoch
    reply = FetchReply(r.pending_id, NS, B, True, [ks(4, "d"), ks(5, "x")])
    actions = r.on_fetch(reply, 0.2)
    assert [type(a) for a in actions] == [RequestSnapshot]
    assert r.phase is Phase.RESYNCING
    assert "stale" not in r.state.entries
    snap = SnapshotReply(r.pending_id, NS, B, 5, 0, [], [])
    r.on_snapshot(snap, 0.3)
    assert r.phase is Phase.LIVE and r.epoch == B and r.seq == 5
    assert "stale" not in r.state.entries
    assert r.pending_id is None


# ---------------------------------------------------------------- chunked snapshots and barriers


def chunks(snap_id: int, epoch: str, seq: int, entries: dict[str, bytes], size: int
           ) -> list[SnapshotReply]:
    whole = snap(snap_id, epoch, seq, entries)
    starts = range(0, len(whole.keys), size) or range(1)
    return [SnapshotReply(snap_id, NS, epoch, seq, whole.max_keys, whole.keys[i:i + size],
                          whole.rows[i:i + size], n, n == len(starts) - 1)
            for n, i in enumerate(starts)]


def test_a_chunked_snapshot_is_installed_whole_at_its_last_chunk() -> None:
    nonces = iter([b"n1", b"n2"])
    r = Replica(NS, 0, nonce_source=lambda: next(nonces))
    (ask,) = r.start(0.0)
    assert isinstance(ask, RequestSnapshot) and ask.nonce == b"n1"
    parts = chunks(ask.snap_id, A, 5, {f"k{i}": b"1" for i in range(7)}, size=3)
    assert len(parts) == 3
    assert r.on_snapshot_chunk(parts[0], 1.0) == []
    assert r.on_snapshot_chunk(parts[1], 2.0) == []
    assert r.state is None and r.phase is Phase.JOINING  # nothing half-installed
    assert tick(r, 4.5) == []  # each chunk refreshed the request's timeout
    assert r.on_snapshot_chunk(parts[2], 5.0) == [DropBarrier(NS, b"n1")]
    assert r.phase is Phase.LIVE and r.seq == 5
    assert sorted(r.state.entries) == [f"k{i}" for i in range(7)]


def test_a_chunk_out_of_order_drops_the_collection_and_the_request_is_asked_again() -> None:
    nonces = iter([b"n1", b"n2"])
    r = Replica(NS, 0, request_timeout=3.0, nonce_source=lambda: next(nonces))
    (ask,) = r.start(0.0)
    parts = chunks(ask.snap_id, A, 5, {f"k{i}": b"1" for i in range(7)}, size=3)
    r.on_snapshot_chunk(parts[0], 0.5)
    assert r.on_snapshot_chunk(parts[2], 0.6) == [DropBarrier(NS, b"n1")]  # chunk 1 missing
    assert r.state is None
    (again,) = tick(r, 3.6)
    assert isinstance(again, RequestSnapshot) and again.nonce == b"n2"
    assert again.snap_id != ask.snap_id


def test_a_snapshot_with_a_malformed_row_is_dropped_and_asked_again() -> None:
    """Rows are stored as they arrive (broker/state.py), so one not in the stored form drops
    the snapshot before anything is installed, chunked or whole."""
    nonces = iter([b"n1", b"n2", b"n3"])
    r = Replica(NS, 0, request_timeout=3.0, nonce_source=lambda: next(nonces))
    (ask,) = r.start(0.0)
    parts = chunks(ask.snap_id, A, 5, {f"k{i}": b"1" for i in range(7)}, size=3)
    bad = msgspec.structs.replace(parts[1], rows=[b"\x07" + bytes(40), *parts[1].rows[1:]])
    assert r.on_snapshot_chunk(parts[0], 0.5) == []
    assert r.on_snapshot_chunk(bad, 0.6) == []
    assert r.on_snapshot_chunk(parts[2], 0.7) == [DropBarrier(NS, b"n1")]
    assert r.state is None and r.phase is Phase.JOINING
    (again,) = tick(r, 3.8)
    assert isinstance(again, RequestSnapshot) and again.nonce == b"n2"
    whole = snap(again.snap_id, A, 5, {"a": b"1"})
    assert r.on_snapshot(msgspec.structs.replace(whole, rows=[b"\x00" * 5]), 3.9) == []
    assert r.state is None
    assert r.on_snapshot(whole, 4.0) == [] and r.phase is Phase.LIVE and values(r) == {
        "a": b"1"}


def test_barriers_of_answered_or_abandoned_snapshots_are_dropped() -> None:
    nonces = iter([b"n1", b"n2", b"n3"])
    r = Replica(NS, 0, request_timeout=1.0, nonce_source=lambda: next(nonces))
    (first,) = r.start(0.0)
    (second,) = r.on_tick(1.5)  # re-asked: the first request is abandoned...
    assert isinstance(second, RequestSnapshot) and second.nonce == b"n2"
    assert r.on_tick(1.6) == [DropBarrier(NS, b"n1")]  # ...and its barrier dropped
    # a late last chunk of the abandoned request is stale: nothing is installed
    assert r.on_snapshot_chunk(chunks(first.snap_id, A, 1, {"a": b"1"}, 5)[0], 1.7) == []
    assert r.state is None
    # closing the namespace drops what is still held
    assert r.close() == [DropBarrier(NS, b"n2")]
    assert r.close() == []


# --------------------------------------------------------------------------- broker-group terms


def tbatch(term: int, *events: KeySet | KeyDeleted, epoch: str = A) -> EventBatch:
    return EventBatch(NS, epoch, list(events), term)


def test_a_batch_of_a_lower_term_is_dropped_and_changes_nothing() -> None:
    r = live_replica(seq=3)
    assert r.on_batch(tbatch(2, ks(4, "a", b"new")), 1.0) == []
    assert r.term == 2 and r.seq == 4
    before = observe(r)
    heard = r.last_heard
    # A deposed primary (term 1) publishes seq 5: not applied, not buffered, not "heard".
    assert r.on_batch(tbatch(1, ks(5, "a", b"deposed")), 2.0) == []
    assert observe(r) == before and r.last_heard == heard
    assert values(r)["a"] == b"new" and r.stale_dropped == 1


def test_a_heartbeat_of_a_lower_term_is_dropped_and_asks_nothing() -> None:
    r = live_replica(seq=3)
    assert r.on_heartbeat(Heartbeat(NS, A, 3, 5), 1.0) == []
    assert r.term == 5
    before, heard = observe(r), r.last_heard
    # Ahead of us, so from term 5 it would start a repair; from term 4 it is ignored.
    assert r.on_heartbeat(Heartbeat(NS, A, 9, 4), 2.0) == []
    assert observe(r) == before and r.last_heard == heard and r.stale_dropped == 1
    (fetch,) = r.on_heartbeat(Heartbeat(NS, A, 9, 5), 3.0)
    assert isinstance(fetch, RequestFetch) and fetch.from_seq == 4


def test_a_higher_term_continues_the_same_epoch_without_a_resync() -> None:
    """A failover keeps the epoch and the seqs: the new primary's first batch just applies."""
    r = live_replica(seq=3)
    r.on_batch(tbatch(1, ks(4, "a", b"x")), 1.0)
    assert r.on_batch(tbatch(2, ks(5, "b", b"y")), 2.0) == []
    assert r.on_heartbeat(Heartbeat(NS, A, 5, 2), 3.0) == []
    assert (r.seq, r.term, r.resyncs, r.repairs, r.phase) == (5, 2, 0, 0, Phase.LIVE)
    assert values(r) == {"a": b"x", "b": b"y"}


def test_equal_term_is_accepted_and_term_zero_is_the_single_broker() -> None:
    r = live_replica(seq=3)
    assert r.on_batch(tbatch(0, ks(4, "a")), 1.0) == [] and r.seq == 4 and r.term == 0
    assert r.on_batch(tbatch(3, ks(5, "a")), 1.0) == [] and r.term == 3
    assert r.on_batch(tbatch(3, ks(6, "a")), 1.0) == [] and r.seq == 6
    assert r.stale_dropped == 0


def test_lower_term_batches_are_not_buffered_while_joining() -> None:
    r = Replica(NS, 0)
    (ask,) = r.start(0.0)
    r.on_heartbeat(Heartbeat(NS, A, 0, 3), 0.1)  # term 3 seen while joining
    assert r.on_batch(tbatch(2, ks(1, "old")), 0.2) == []
    assert r.on_batch(tbatch(3, ks(1, "new")), 0.3) == []
    assert r.on_snapshot(snap(ask.snap_id, A, 0, {}), 0.4) == []
    assert values(r) == {"new": b"1"} and r.stale_dropped == 1


def test_own_write_of_a_lower_term_is_not_applied_from_the_reply() -> None:
    r = live_replica(seq=3)
    r.on_heartbeat(Heartbeat(NS, A, 3, 4), 1.0)
    assert not r.apply_own(tbatch(3, ks(4, "a")), 1.0)
    assert r.apply_own(tbatch(4, ks(4, "a", b"ok")), 1.0) and values(r)["a"] == b"ok"


def test_reask_re_sends_the_pending_request_at_once_with_a_new_id() -> None:
    r, fetch = repairing_replica()
    (again,) = [a for a in r.reask(0.1) if not isinstance(a, DropBarrier)]
    assert isinstance(again, RequestFetch) and again.request_id != fetch.request_id
    assert again.from_seq == fetch.from_seq and r.pending_id == again.request_id
    assert live_replica().reask(0.1) == []  # nothing pending: nothing to ask
