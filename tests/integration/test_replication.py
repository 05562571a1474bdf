"""Acceptance 2 and 5: writes replicate across processes, the writer reads its own writes,
and a late joiner of a large namespace ends equal to the broker while writes continue."""

from __future__ import annotations

import threading

import pytest

from node import SharedMemory, SharedMemoryConfig
from tests.conftest import BrokerProcess, start_agent, wait_until

pytestmark = pytest.mark.timeout(180)


def cfg(broker: BrokerProcess, namespace: str = "repl", **kw: object) -> SharedMemoryConfig:
    return SharedMemoryConfig(namespace=namespace, broker=broker.address, max_keys=0, **kw)


def test_write_on_a_visible_on_b_in_another_process(broker_process: BrokerProcess) -> None:
    reader = start_agent("""
import sys, time
from node import SharedMemory, SharedMemoryConfig
shm = SharedMemory(SharedMemoryConfig(namespace="repl", broker=sys.argv[1], max_keys=0))
print("ready", flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    if shm.get("from_a", None) == {"n": 42}:
        print("seen", shm.get_metadata("from_a").version, flush=True)
        break
    time.sleep(0.001)  # poll
shm.close()
""", broker_process.address)
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "ready"
        with SharedMemory(cfg(broker_process)) as a:
            version = a.set("from_a", {"n": 42})
            assert a.get("from_a") == {"n": 42}  # read-your-writes, no waiting
            line = reader.stdout.readline().strip()
            assert line == f"seen {version}"
    finally:
        reader.kill()
        reader.wait(10)


def test_four_threads_never_read_a_stale_own_write(broker_process: BrokerProcess) -> None:
    stale: list[tuple[str, int, object]] = []
    errors: list[BaseException] = []
    with SharedMemory(cfg(broker_process, "threads")) as shm:

        def worker(t: int) -> None:
            try:
                for i in range(500):
                    key = f"t{t}_{i % 7}"
                    shm.set(key, i)
                    got = shm.get(key)
                    if got != i:
                        stale.append((key, i, got))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        assert stale == []
        assert shm.seq == 2000
        assert shm.local_digest() == shm.broker_digest()


def test_late_joiner_with_100k_keys_while_another_node_writes(
    broker_process: BrokerProcess,
) -> None:
    ns = "big"
    with SharedMemory(cfg(broker_process, ns)) as seeder:
        batch: dict[str, object] = {}
        for i in range(100_000):
            batch[f"key_{i:06d}"] = {"i": i, "pad": "x" * 16}
            if len(batch) == 5000:
                seeder.set_many(batch)
                batch = {}
    writer = start_agent("""
import sys, itertools
from node import SharedMemory, SharedMemoryConfig
shm = SharedMemory(SharedMemoryConfig(namespace="big", broker=sys.argv[1], max_keys=0))
print("writing", flush=True)
for i in itertools.count():
    shm.set(f"live_{i % 500}", i)
    if i % 3 == 0:
        shm.delete(f"key_{i % 100000:06d}")
""", broker_process.address)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"
        with SharedMemory(cfg(broker_process, ns, connect_timeout=60)) as joiner:
            seq_at_join = joiner.seq
            assert seq_at_join >= 20  # the snapshot carried 100 000 keys in 20 batches
            wait_until(lambda: joiner.seq > seq_at_join + 200, 30,
                       message="live writes after the join")
            writer.kill()
            writer.wait(10)

            def converged() -> bool:
                broker_seq, broker_digest = joiner.broker_digest()
                return joiner.local_digest() == (broker_seq, broker_digest)

            wait_until(converged, 30, interval=0.05, message="replica digest == broker digest")
            assert len(joiner.list_keys("key_*")) <= 100_000
            assert joiner.status().namespace.resyncs == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)


def test_subscription_barrier_joins_lose_nothing(broker_process: BrokerProcess) -> None:
    """Join 40 times while another process writes flat out: the barrier means no joiner ever
    needs a repair (a lost first event after the snapshot would show as a repair)."""
    writer = start_agent("""
import sys, itertools
from node import SharedMemory, SharedMemoryConfig
shm = SharedMemory(SharedMemoryConfig(namespace="barrier", broker=sys.argv[1], max_keys=0))
print("writing", flush=True)
for i in itertools.count():
    shm.set(f"k{i % 50}", i)
""", broker_process.address)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"
        for _ in range(40):
            with SharedMemory(cfg(broker_process, "barrier")) as joiner:
                start = joiner.seq
                wait_until(lambda j=joiner, s=start: j.seq >= s + 5, 10,  # noqa: B023
                           message="events after the snapshot")
                st = joiner.status().namespace
                assert (st.repairs, st.resyncs) == (0, 0)
    finally:
        writer.kill()
        writer.wait(10)
