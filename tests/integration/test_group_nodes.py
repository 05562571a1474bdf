"""Nodes through a broker-group failover, end to end (issue 10, docs/groups.md): a
``SharedMemory`` given the group's seed list keeps writing through a kill -9 of the primary, and
a node that only reads keeps serving reads throughout and then shows the new term and primary
in ``status()``. The history checker holds every acknowledged write to the final log.

The group harness (3 etcd members, 3 ``python -m broker --group`` members, started and stopped
by PID) is the broker side's, in tests/integration/test_group.py; without it (a branch that
lacks the broker side) this module skips.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

from broker.errors import BrokerUnavailable, StorageError
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


class StatusSampler:
    """Samples the read-only node's ``status()`` every 20 ms: (time, staleness, term)."""

    def __init__(self, shm: SharedMemory) -> None:
        self.shm = shm
        self.samples: list[tuple[float, float | None, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="status-sampler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                st = self.shm.status()
            except StorageError:  # closed (the test ended early)
                return
            self.samples.append((time.monotonic(), st.namespace.last_heard_age, st.term))
            self.stop.wait(0.02)  # poll: the sampling interval

    def max_age(self, since: float, until: float) -> float:
        return max((age for t, age, _ in list(self.samples)
                    if since <= t <= until and age is not None), default=0.0)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


HEARTBEAT = 0.5  # the brokers' default heartbeat interval (broker/config.py)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["kill-9", "sigstop"])
def test_a_node_keeps_writing_and_a_reader_keeps_reading_through_a_failover_of_the_primary(
        group: Any, fault: str) -> None:
    """kill -9, or SIGSTOP for 3x the lease TTL then SIGCONT, of the primary: the read-only
    node serves every read throughout, its staleness rises while no member publishes, and its
    ``status()`` then shows the new term and primary on the same epoch."""
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
        sampler = StatusSampler(reader_shm)
        t0 = time.monotonic()
        wait_until(lambda: writer.acked_after(t0) >= 30, 30, 0.02, "writes before the kill")
        epoch_before = reader_shm.status().epoch

        killed_at = time.monotonic()
        if fault == "kill-9":
            primary.kill()
        else:
            primary.signal(signal.SIGSTOP)
        # Writes resume through the same handle: the node finds the new primary itself.
        wait_until(lambda: writer.acked_after(killed_at) >= 30, 60, 0.02,
                   f"node writes to resume after {fault} of the primary")
        resumed_at = time.monotonic()
        if fault == "sigstop":
            # 3x the lease TTL in all, then it runs again (and rejoins as a standby).
            wait_until(lambda: time.monotonic() - killed_at >= 3 * harness.LEASE_TTL, 10,
                       0.05, "3x the lease TTL of pause")
            primary.signal(signal.SIGCONT)
        new = group.wait_new_primary(primary)
        new_term = harness.current_term(new)
        assert new_term > old_term
        # While no member published (the old primary gone or paused, the new one not yet
        # elected), the reader's staleness rose past a heartbeat interval, far above what it
        # was while writes flowed.
        before = sampler.max_age(killed_at - 1.0, killed_at)
        during = sampler.max_age(killed_at, resumed_at)
        assert during > HEARTBEAT and during > 5 * before, (before, during)

        # The read-only node shows the new term and primary, on the same epoch (no resync).
        def reader_moved_on() -> bool:
            s = reader_shm.status()
            return s.term == new_term and s.primary == new.address and s.connected
        wait_until(reader_moved_on, 30, 0.05, "the reader's status() to show the new term")
        s = reader_shm.status()
        assert s.epoch == epoch_before and s.namespace.resyncs == 0, s
        # ...and then it is fresh again, under the new term.
        fresh_from = time.monotonic()
        wait_until(lambda: any(t > fresh_from and age is not None and age < 2 * HEARTBEAT
                               and term == new_term for t, age, term in list(sampler.samples)),
                   10, 0.05, "the reader's staleness to fall under the new term")
        sampler.join()
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
