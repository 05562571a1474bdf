"""Acceptance 6: a broker restarted in memory (new epoch) is noticed; nodes resync and hold the
new state only (never a merge of two histories)."""

from __future__ import annotations

import pytest

from node import BrokerUnavailable, SharedMemory, SharedMemoryConfig
from tests.conftest import BrokerProcess, free_port_pair, wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_restart_new_epoch_resync_holds_new_state_only() -> None:
    port = free_port_pair()
    broker = BrokerProcess(port).start()
    cfg = SharedMemoryConfig(namespace="restart", broker=broker.address, max_keys=0,
                             request_timeout=5.0, retry_interval=0.25)
    a = SharedMemory(cfg)
    b = SharedMemory(SharedMemoryConfig(namespace="restart", broker=broker.address,
                                        max_keys=0, retry_interval=0.25))
    try:
        a.set_many({f"old_{i}": i for i in range(50)})
        wait_until(lambda: b.seq == a.seq, 5, message="b to catch up")
        old_epoch = a.status().epoch
        assert old_epoch == broker.epoch

        broker.kill()
        wait_until(lambda: not a.status().connected, 10, message="a to notice the silence")
        # A write while the broker is down: it must fail within its deadline, never hang.
        with pytest.raises(BrokerUnavailable):
            _short_write(a)
        assert a.get("old_1") == 1  # reads keep serving the last known state

        broker = BrokerProcess(port).start()
        new_epoch = broker.epoch
        assert new_epoch != old_epoch
        wait_until(lambda: a.status().epoch == new_epoch and b.status().epoch == new_epoch, 20,
                   message="both nodes to resync to the new epoch")
        # The new broker's history is empty: none of the old keys may survive in a replica.
        assert a.list_keys() == [] and b.list_keys() == []
        wait_until(lambda: a.status().connected, 5, message="a to report connected")
        version = a.set("fresh", "after restart")
        assert version == 1
        wait_until(lambda: b.get("fresh", None) == "after restart", 5, message="fresh on b")
        assert a.local_digest() == b.local_digest() == a.broker_digest()
        assert a.status().namespace.resyncs >= 1
    finally:
        a.close()
        b.close()
        broker.stop()


def _short_write(shm: SharedMemory) -> None:
    quick = SharedMemory.__new__(SharedMemory)
    quick.__dict__.update(shm.__dict__)
    quick.config = SharedMemoryConfig(namespace=shm.config.namespace, broker=shm.config.broker,
                                      max_keys=0, request_timeout=1.0, retry_interval=0.25)
    quick.set("during_outage", 1)


def test_watch_and_max_staleness_across_an_in_memory_restart() -> None:
    """A watcher keeps delivering after the broker's history is replaced (new epoch, versions
    starting again at 1); reads with max_staleness refuse while the broker is silent."""
    from node import StorageError

    port = free_port_pair()
    broker = BrokerProcess(port).start()
    cfg = SharedMemoryConfig(namespace="rw", broker=broker.address, max_keys=0,
                             retry_interval=0.25, max_staleness=1.0)
    shm = SharedMemory(cfg)
    try:
        for i in range(10):
            shm.set(f"old{i}", i)
        watcher = shm.watch("*", initial=False)
        broker.kill()
        def stale() -> bool:
            try:
                shm.get("old1")
            except StorageError as exc:
                assert "stale" in str(exc)
                return True
            return False

        wait_until(stale, 10, interval=0.05, message="reads to go stale")
        broker = BrokerProcess(port).start()
        wait_until(lambda: shm.status().epoch == broker.epoch, 20, message="resync")
        versions = [shm.set(f"new{i}", i) for i in range(3)]
        assert versions == [1, 2, 3]
        assert shm.get("new0") == 0  # fresh again: no StorageError
        seen = []
        while len([c for c in seen if not c.resync]) < 3:
            change = watcher.get(timeout=10)
            assert change is not None, f"watcher stalled after the restart: {seen}"
            seen.append(change)
        live = [c for c in seen if not c.resync]
        assert [(c.key, c.op, c.version) for c in live] == [
            ("new0", "set", 1), ("new1", "set", 2), ("new2", "set", 3)]
        # the resync diff told the watcher that the old keys are gone
        assert {c.key for c in seen if c.resync and c.op == "delete"} == \
            {f"old{i}" for i in range(10)}
        watcher.close()
    finally:
        shm.close()
        broker.stop()
