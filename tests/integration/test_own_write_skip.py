"""A writer's node drops the event-stream copy of its own writes without decoding it.

Real broker process, real sockets. The writer's I/O thread is held off its SUB socket
(``pause_reading``) while it writes, so the writes are applied from their replies and their
stream copies then arrive as duplicates: they must be dropped by their header frame
(``status().namespace.skipped``) and not decoded (``Node.decoded``), with the replica exactly
at the broker's head."""

from __future__ import annotations

from node import SharedMemory, SharedMemoryConfig
from tests.processes import BrokerProcess, wait_until

N = 200


def test_own_stream_copies_are_dropped_undecoded(broker_process: BrokerProcess) -> None:
    cfg = SharedMemoryConfig(namespace="own", broker=broker_process.address, max_keys=0, ttl=0)
    with SharedMemory(cfg) as w:
        node = w.node
        skipped0, decoded0 = w.status().namespace.skipped, node.decoded
        node.pause_reading.set()
        try:
            for i in range(N):
                w.set(f"k{i}", {"i": i})
                assert w.get(f"k{i}") == {"i": i}  # read-your-writes holds throughout
        finally:
            node.pause_reading.clear()
        # Every write reached the replica either from its reply (its stream copy is then
        # skipped) or from the stream before the pause took hold (decoded): all N accounted.
        wait_until(lambda: (w.status().namespace.skipped - skipped0)
                   + (node.decoded - decoded0) >= N, 20.0)
        st = w.status().namespace
        skipped, decoded = st.skipped - skipped0, node.decoded - decoded0
        assert (st.sync, st.seq, st.lag) == ("live", N, 0)
        # nearly all were dropped undecoded; the few decoded are heartbeats (one a second)
        # and any batch read before the I/O thread saw the pause
        assert skipped >= N * 9 // 10, (skipped, decoded)
        assert decoded < N // 10, (skipped, decoded)
        assert {w.get(f"k{i}")["i"] for i in range(N)} == set(range(N))
