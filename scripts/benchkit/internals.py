"""The benchmark's ONLY contact with node/ and broker/ beyond the user API.

Why it exists: two workloads measure what no user call shows (where an acknowledged set's
time goes; how long compaction stalls the broker's loop). They use public but inner names:
the handle's ``Node`` (``SharedMemory.node``), its channel pool (``Node.pool``), the admin
calls of node/admin.py, and the broker core's Turn API. All of them live here, so a change of
those names is met in this one file and nowhere else.
Rule: if a name here is gone, say so and skip the split rows (never fake them); the smoke
test (tests/integration/test_bench_smoke.py) then fails on the missing rows, which points here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from node import SharedMemory

# ---------------------------------------------------------------------- node: write path


def head_round_trip(shm: SharedMemory, namespace: str) -> Callable[[int], object]:
    """An op for ``timed``: one broker round trip that writes nothing (a ``Head`` request)."""
    from node import admin

    node = shm.node
    return lambda i: admin.head(node, namespace, time.monotonic() + 10)


class SetSplit:
    """Splits ``set()`` at the reply: wraps the node's channel-pool send (``pool.call`` or
    ``call_with_events``) to record how long until the reply was in (``parts["send"]``), and
    ``wait_visible`` to count how often this node waited for the event stream
    (``parts["waits"]``; ``parts["blocked"]`` when it took > 20 us). ``supported`` is False
    when node/ no longer has those names."""

    def __init__(self, shm: SharedMemory) -> None:
        self.node = shm.node
        self.pool = getattr(self.node, "pool", None)
        self.send = next((name for name in ("call_with_events", "call")
                          if hasattr(self.pool, name)), None)
        self.supported = self.send is not None and hasattr(self.node, "wait_visible")
        self.parts: dict[str, float] = {"send": 0.0, "waits": 0, "blocked": 0}

    def reset(self) -> None:
        self.parts["waits"] = self.parts["blocked"] = 0

    def __enter__(self) -> SetSplit:
        if not self.supported:
            return self
        assert self.send is not None
        parts = self.parts
        original_send = getattr(self.pool, self.send)
        original_wait = self.node.wait_visible

        def timed_send(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return original_send(*a, **kw)
            finally:
                parts["send"] = time.perf_counter() - t

        def counted_wait(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return original_wait(*a, **kw)
            finally:
                parts["waits"] += 1
                if time.perf_counter() - t > 20e-6:
                    parts["blocked"] += 1

        setattr(self.pool, self.send, timed_send)
        self.node.wait_visible = counted_wait
        return self

    def __exit__(self, *exc: object) -> None:
        if self.supported:
            assert self.send is not None
            delattr(self.pool, self.send)  # back to the class's methods
            del self.node.wait_visible


def own_apply_modes() -> list[bool | None]:
    """The settings of "the writer's node applies its reply's events" to measure: both, or
    ``[None]`` (leave it alone) where node/ has no such switch."""
    from node.node import Node

    return [True, False] if "apply_own_writes" in Node.__init__.__code__.co_varnames else [None]


@contextmanager
def apply_own_writes(shm: SharedMemory, own: bool | None) -> Iterator[None]:
    """Set the handle's ``Node.apply_own_writes`` for a block (None: untouched)."""
    if own is None:
        yield
        return
    node = shm.node
    before = node.apply_own_writes
    node.apply_own_writes = own
    try:
        yield
    finally:
        node.apply_own_writes = before


# ---------------------------------------------------------------------- broker: compaction


@dataclass
class CompactionStall:
    """What ``compaction_stall`` measured, in seconds (lists: one item per loop turn)."""

    start: float  # on the loop: freeze (no copy) + segment rotation + thread start
    freeze: float  # of which the freeze
    copy_turns: list[float]  # on the loop: each turn's chunk of the freeze's copy
    busy_turns: list[float]  # each write turn from the start until the snapshot is written
    idle_turns: list[float]  # the same write turns with no compaction running
    background: float  # until the snapshot was written (copy, encode, write)
    old_freeze: float  # the former freeze of the same state: a full dict copy on the loop
    snapshot_chunks: list[float]  # a node snapshot job: each chunk's copy on the loop
    old_snapshot_freeze: float  # the former snapshot_job freeze: list(entries.items())


def compaction_stall(data_dir: str, total: int) -> CompactionStall:
    """Fill a durable log with ``total`` keys through the broker core (no sockets), then
    compact it while one write per loop turn goes on, as the broker's loop does: freeze and
    rotate, then per turn one write (decide, append, flush, apply) and one chunk of the
    frozen view's copy (``advance_freezes``), and ``finish_compaction``. The thread encodes
    and writes the snapshot meanwhile, competing for the GIL like the broker's. Also times
    the same write turns without a compaction, the former full-copy freezes, and a node
    snapshot job's chunks (5 000 entries, as the broker sends them).

    Stalls (freeze, copy chunks, snapshot chunks, the former freezes) are the loop thread's
    CPU time (``time.thread_time``), which other processes' load does not inflate; write
    turns are wall time, so they show the GIL shared with the snapshot thread (and load)."""
    from broker.core import BrokerCore
    from broker.durable import DurableLog
    from broker.protocol import Set, SetMany, Snapshot
    from broker.recovery import recover
    from broker.turn import persist

    # fsync "no": the write turns then show the loop and the GIL, not the disk
    log = DurableLog(data_dir, compact_bytes=1 << 40, fsync="no")
    core = BrokerCore(log=log)
    recover(core, log)
    for start in range(0, total, 5000):
        req = SetMany(b"c" * 12, start + 1, "ns", 0,
                      [(f"k{i:07d}", b'{"i":1}') for i in range(start, start + 5000)])
        persist(core, log, core.run_turn([(None, req)], 0.0, 1.0))  # as the broker's loop does
    no = total

    def write_turn() -> float:
        nonlocal no
        no += 1
        t = time.perf_counter()
        req = Set(b"w" * 12, no, "ns", 0, f"k{no % total:07d}", b'{"i":2}')
        persist(core, log, core.run_turn([(None, req)], 0.0, 1.0))
        return time.perf_counter() - t

    idle = [write_turn() for _ in range(2000)]
    state = core.namespaces["ns"]
    t = time.thread_time()
    _ = [s.entries.copy() for s in core.namespaces.values()]
    old_freeze = time.thread_time() - t
    t = time.thread_time()
    _ = list(state.entries.items())
    old_snapshot = time.thread_time() - t
    del _

    clock = time.thread_time  # the loop's own CPU: what it costs, not what load adds
    t = clock()
    build = core.frozen_view(log.segment + 1, time.monotonic(), time.time())
    freeze = clock() - t
    log.start_compaction(build)  # fsync + new segment + thread start
    start = clock() - t
    copy_turns: list[float] = []
    busy: list[float] = []
    t2 = time.perf_counter()
    while log.compacting or core.frozen:
        lat = write_turn()
        if core.frozen:
            t = clock()
            core.advance_freezes()
            copy_turns.append(clock() - t)
        busy.append(lat)
        log.finish_compaction()
    background = time.perf_counter() - t2
    assert log.compactions == 1, "the compaction failed"

    job = core.snapshot_job(Snapshot("ns", 0, 1, b"n"))
    chunks: list[float] = []
    while not isinstance(job, Exception) and not job.done:  # type: ignore[union-attr]
        write_turn()
        t = clock()
        job.next_chunk(time.monotonic(), 5000)  # type: ignore[union-attr]
        chunks.append(clock() - t)
    log.close()
    return CompactionStall(start, freeze, copy_turns, busy, idle, background, old_freeze, chunks,
                           old_snapshot)
