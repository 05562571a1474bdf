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


def compaction_stall(data_dir: str, total: int) -> tuple[float, float, float]:
    """Fill a durable log with ``total`` keys through the broker core (no sockets), then
    compact it as the broker's loop does. Returns seconds (freeze, stall on the loop, written
    in the background): the frozen view (dict copies) and the segment rotation happen on the
    loop; encoding and writing the snapshot on a thread."""
    from broker.core import BrokerCore
    from broker.durable import DurableLog
    from broker.protocol import SetMany
    from broker.recovery import recover
    from broker.turn import persist

    log = DurableLog(data_dir, compact_bytes=1 << 40)
    core = BrokerCore(log=log)
    recover(core, log)
    for start in range(0, total, 5000):
        req = SetMany(b"c" * 12, start + 1, "ns", 0,
                      [(f"k{i:07d}", b'{"i":1}') for i in range(start, start + 5000)])
        persist(core, log, core.run_turn([(None, req)], 0.0, 1.0))  # as the broker's loop does
    t = time.perf_counter()
    build = core.frozen_view(log.segment + 1, time.monotonic(), time.time())
    freeze = time.perf_counter() - t
    t = time.perf_counter()
    log.start_compaction(build)  # fsync + new segment + thread start
    stall = freeze + time.perf_counter() - t
    t2 = time.perf_counter()
    while log.compacting:
        log.finish_compaction()
        time.sleep(0.005)  # poll
    background = time.perf_counter() - t2
    log.close()
    return freeze, stall, background
