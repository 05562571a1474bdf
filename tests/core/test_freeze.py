"""The chunked, copy-on-write freeze (broker/freeze.py): whatever changes between chunks, the
view handed out is exactly the state at the freeze's seq, each key once."""

from __future__ import annotations

import random

import pytest

from broker.core import BrokerCore, SnapshotJob
from broker.freeze import Freeze, FrozenStates
from broker.protocol import (
    Event,
    KeyDeleted,
    KeyExpired,
    KeySet,
    KeyTouched,
    SetMany,
    Snapshot,
)
from broker.state import NamespaceState, decode_entry


def random_event(rng: random.Random, state: NamespaceState, keys: list[str]) -> Event:
    """A set (new or existing key, with or without TTL), touch, delete or expiry."""
    seq = state.seq + 1
    key = rng.choice(keys)
    roll = rng.random()
    if roll < 0.45:
        ttl = rng.choice([None, None, 5.0, 0.5])
        return KeySet(seq, key, b'{"v":%d}' % seq, 1.0, 1.0 + seq, ttl)
    if roll < 0.55:
        return KeyTouched(seq, key, rng.choice([None, 3.0]))
    if roll < 0.85:
        return KeyDeleted(seq, key)
    return KeyExpired(seq, key)


def filled(rng: random.Random, keys: list[str], n: int) -> NamespaceState:
    state = NamespaceState("ns")
    for _ in range(n):
        state.apply_batch([random_event(rng, state, keys)], now=0.0)
    return state


@pytest.mark.parametrize("seed", range(20))
def test_interleaved_writes_never_change_what_a_freeze_hands_out(seed: int) -> None:
    rng = random.Random(seed)
    keys = [f"k{i:03d}" for i in range(rng.choice([5, 60, 400]))]
    state = filled(rng, keys, 600)
    # Up to three freezes open at once, taken at different seqs, each compared with a full
    # copy of the entries at its own seq.
    open_views: list[tuple[Freeze, dict[str, bytes], dict[str, bytes]]] = []
    done = 0
    for step in range(3000):
        roll = rng.random()
        if roll < 0.02 and len(open_views) < 3:
            open_views.append((Freeze(state), dict(state.entries), {}))
        elif roll < 0.25 and open_views:
            freeze, expected, got = rng.choice(open_views)
            ks, vs = freeze.take(rng.choice([1, 2, 7, 50]))
            for k, v in zip(ks, vs, strict=True):
                assert k not in got, f"step {step}: {k} handed out twice"
                got[k] = v
        elif roll < 0.30:
            # a rolled-back change: applied, then put back as the broker's rollback does
            old = {k: state.entries.get(k) for k in keys}
            seq = state.seq
            event = random_event(rng, state, keys)
            state.apply_batch([event], now=0.0)
            state.restore(event.key, old[event.key])
            state.seq = seq
        else:
            state.apply_batch([random_event(rng, state, keys)], now=0.0)
        for view in [v for v in open_views if v[0].done]:
            freeze, expected, got = view
            assert got == expected, f"step {step}: the view differs from the state at its seq"
            assert freeze not in state.freezes
            open_views.remove(view)
            done += 1
    for freeze, expected, got in open_views:
        ks, vs = freeze.take_all()
        got.update(zip(ks, vs, strict=True))
        assert got == expected
        done += 1
    assert done > 0
    assert state.freezes == []  # every finished freeze stopped shadowing


def test_an_empty_namespace_freezes_done_and_a_closed_freeze_stops_shadowing() -> None:
    empty = NamespaceState("e")
    assert Freeze(empty).done and empty.freezes == []
    state = filled(random.Random(1), ["a", "b", "c"], 30)
    freeze = Freeze(state)
    assert state.freezes == [freeze]
    freeze.close()
    assert state.freezes == [] and freeze.done


def test_a_snapshot_job_is_the_state_at_its_seq_despite_writes_between_chunks() -> None:
    rng = random.Random(5)
    core = BrokerCore("e" * 16)
    keys = [f"k{i:04d}" for i in range(2000)]
    items = [(k, b"1") for k in keys[:1500]]
    core.run_turn([(None, SetMany(b"c" * 12, 1, "ns", 0, items))], 0.0, 1.0)
    state = core.namespaces["ns"]
    at_freeze = {k: (e.value, e.version) for k, e in
                 ((k, decode_entry(raw)) for k, raw in state.entries.items())}
    job = core.snapshot_job(Snapshot("ns", 0, 9, b"n"))
    assert isinstance(job, SnapshotJob) and job.seq == state.seq
    got: dict[str, tuple[bytes, int]] = {}
    last = False
    no = 2
    while not last:
        batch = [(rng.choice(keys), b"2") for _ in range(rng.randint(1, 40))]
        core.run_turn([(None, SetMany(b"c" * 12, no, "ns", 0, batch))], 0.0, 2.0)
        for k in rng.sample(keys, 5):
            if k in state.entries:
                state.apply_batch([KeyDeleted(state.seq + 1, k)], 0.0)
        no += 1
        reply = job.next_chunk(0.0, 100)
        for k, row in zip(reply.keys, reply.rows, strict=True):
            assert k not in got
            e = decode_entry(row)
            got[k] = (e.value, e.version)
        last = reply.last
    assert job.done and got == at_freeze
    assert state.seq > job.seq


def test_frozen_states_copy_every_namespace_at_one_moment_in_steps() -> None:
    rng = random.Random(3)
    keys = [f"k{i:03d}" for i in range(300)]
    states = [filled(rng, keys, 500) for _ in range(3)] + [NamespaceState("empty")]
    expected = [dict(s.entries) for s in states]
    view = FrozenStates(states)
    steps = 0
    while view.step(37):
        assert not view.ready.is_set()
        for s in states[:3]:
            s.apply_batch([random_event(rng, s, keys)], now=0.0)
        steps += 1
    assert view.wait(0) and steps > 3
    for (_, _, _, ks, vs), exp in zip(view.copies, expected, strict=True):
        assert dict(zip(ks, vs, strict=True)) == exp and len(ks) == len(exp)
    assert all(s.freezes == [] for s in states)


@pytest.mark.parametrize("total", [0, 3, 15, 16, 10_000, 10_001, 70_000])
def test_a_compaction_view_encodes_to_the_rows_of_the_state_at_the_freeze(total: int) -> None:
    """The snapshot file's rows (encoded a slice at a time) decode to the frozen state."""
    import msgspec

    from broker.records import SnapshotFile

    core = BrokerCore("e" * 16)
    for start in range(0, total, 5000):
        items = [(f"k{i:06d}", b"%d" % i) for i in range(start, min(total, start + 5000))]
        core.run_turn([(None, SetMany(b"c" * 12, start + 1, "ns", 0, items))], 0.0, 1.0)
    core.run_turn([(None, SetMany(b"d" * 12, 1, "other", 0, [("x", b"1")]))], 0.0, 1.0)
    expected = {name: {k: (e.value, e.version) for k, e in
                       ((k, decode_entry(raw)) for k, raw in s.entries.items())}
                for name, s in core.namespaces.items()}
    build = core.frozen_view(2, 0.0, 100.0)
    core.run_turn([(None, SetMany(b"c" * 12, 10**6, "ns", 0, [("k000001", b"new")]))], 0.0, 1.0)
    while core.advance_freezes(4000):
        pass
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(build()), type=SnapshotFile)
    got = {ns.name: {r.key: (r.value, r.version) for r in ns.entries} for ns in snap.namespaces}
    assert got == expected
    assert sum(len(ns.entries) for ns in snap.namespaces) == total + 1
