"""Nodes through a broker-group failover, end to end (issue 10, CLUSTER.md section 4): a
``SharedMemory`` given the group's seed list keeps writing through a kill -9 of the primary, and
a node that only reads keeps serving reads throughout and then shows the new term and primary
in ``status()``. The history checker holds every acknowledged write to the final log.

The group harness (3 etcd members, 3 ``python -m broker --group`` members, started and stopped
by PID) is the broker side's, in tests/integration/test_group.py; without it (a branch that
lacks the broker side) this module skips.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from broker.errors import BrokerUnavailable
from node import SharedMemory, SharedMemoryConfig
from tests.history import History, observe
from tests.processes import wait_until

harness = pytest.importorskip(
    "tests.integration.test_group",
    reason="the broker side of groups (tests/integration/test_group.py) is not on this branch")
group = harness.group  # the fixture: a formed-on-demand 3-member group on a real etcd
NS = harness.NS


class NodeWriter:
    """Writes unique keys through one SharedMemory until stopped; records the history."""

    def __init__(self, shm: SharedMemory, history: History) -> None:
        self.shm, self.history = shm, history
        self.acks: list[float] = []  # monotonic time of each acknowledgement
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="node-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key, value = f"n_{i}", {"i": i}
            self.history.attempt("node", "set", key, value)
            try:
                version = self.shm.set(key, value)
            except BrokerUnavailable as exc:  # the failover outlasted request_timeout
                self.failures.append(str(exc))
                continue  # the next key (this one stays an attempt: maybe applied)
            self.history.ack("node", "set", key, value, version)
            self.acks.append(time.monotonic())
            i += 1

    def acked_after(self, t: float) -> int:
        return sum(1 for at in list(self.acks) if at > t)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


class NodeReader:
    """Reads a key in a loop on a read-only node, recording each read with the seq it reflects;
    any exception from a read is a failure (reads never leave the process)."""

    def __init__(self, shm: SharedMemory, history: History) -> None:
        self.shm, self.history = shm, history
        self.reads = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="node-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                observe(self.history, "reader", self.shm, f"n_{self.reads % 50}")
                self.reads += 1
            except Exception as exc:  # noqa: BLE001 - recorded, the test fails on it
                self.errors.append(repr(exc))
            self.stop.wait(0.002)  # poll: pace the reads

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_node_keeps_writing_and_a_reader_keeps_reading_through_a_kill_9_of_the_primary(
        group: Any) -> None:
    primary = group.wait_formed(30)
    old_term = harness.current_term(primary)
    seeds = group.addresses()
    history = History()
    writer_shm = SharedMemory(SharedMemoryConfig(
        namespace=NS, broker=",".join(seeds), max_keys=0, ttl=0, request_timeout=30,
        connect_timeout=20, retry_interval=0.3))
    # Another order of the seeds is another node of this process (own SUB, DEALER, replicas):
    # a read-only node that never sends a write request.
    reader_shm = SharedMemory(SharedMemoryConfig(
        namespace=NS, broker=list(reversed(seeds)), max_keys=0, ttl=0, connect_timeout=20,
        retry_interval=0.3))
    try:
        st = writer_shm.status()
        assert (st.term, st.primary) == (old_term, primary.address), st
        writer = NodeWriter(writer_shm, history)
        reader = NodeReader(reader_shm, history)
        t0 = time.monotonic()
        wait_until(lambda: writer.acked_after(t0) >= 30, 30, 0.02, "writes before the kill")
        epoch_before = reader_shm.status().epoch

        primary.kill()
        killed_at = time.monotonic()
        # Writes resume through the same handle: the node finds the new primary itself.
        wait_until(lambda: writer.acked_after(killed_at) >= 30, 60, 0.02,
                   "node writes to resume after kill -9 of the primary")
        new = group.primary()
        assert new is not None and new is not primary
        new_term = harness.current_term(new)
        assert new_term > old_term

        # The read-only node shows the new term and primary, on the same epoch (no resync).
        def reader_moved_on() -> bool:
            s = reader_shm.status()
            return s.term == new_term and s.primary == new.address and s.connected
        wait_until(reader_moved_on, 30, 0.05, "the reader's status() to show the new term")
        s = reader_shm.status()
        assert s.epoch == epoch_before and s.namespace.resyncs == 0, s
        assert s.namespace.term == new_term and writer_shm.status().term == new_term

        writer.join()
        reads_before = reader.reads
        wait_until(lambda: reader.reads > reads_before, 10, 0.01, "reads after the failover")
        reader.join()
        assert reader.errors == [] and reader.reads > 0
        assert writer.failures == [], writer.failures  # request_timeout outlasts the failover

        # Every acknowledged write in the new primary's log once, reads monotone prefixes, and
        # both nodes converge to the new primary.
        _, events = harness.fetch_log(new.address)
        summary = history.check(events)
        assert summary.acks == len(writer.acks) and summary.acks >= 60
        want = writer_shm.broker_digest()
        for shm in (writer_shm, reader_shm):
            wait_until(lambda shm=shm: (shm.seq, shm.digest()) == want, 30, 0.02,  # type: ignore
                       "a node to converge to the new primary")
        History.check_final({"writer": (writer_shm.seq, writer_shm.digest()),
                             "reader": (reader_shm.seq, reader_shm.digest())}, want,
                            log_events=events, namespace=NS)
    finally:
        writer_shm.close()
        reader_shm.close()
