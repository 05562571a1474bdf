"""The embedded default, the registry, the asyncio API, and clean shutdown."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from node import (
    AsyncSharedMemory,
    KeyNotFound,
    Registry,
    SharedMemory,
    SharedMemoryConfig,
    get_or_create,
)
from tests.conftest import BrokerProcess, free_port_pair

pytestmark = pytest.mark.timeout(60)


def test_embedded_default_shared_by_two_handles() -> None:
    a = SharedMemory(SharedMemoryConfig(namespace="embedded_demo"))
    b = SharedMemory(SharedMemoryConfig(namespace="embedded_demo"))
    try:
        assert a.status().broker.startswith("inproc://")
        a.set("hello", {"from": "a"})
        assert b.get("hello") == {"from": "a"}  # b waits for nothing: a's set returned after
        # the event was applied to the shared node's replica
        b.delete("hello")
        assert not a.exists("hello")
    finally:
        a.close()
        b.close()


def test_environment_variable_selects_the_broker(broker_process: BrokerProcess) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, child_env

    env = child_env()
    env["SHAREDMEM_BROKER"] = broker_process.address
    proc = subprocess.run([sys.executable, "-c", """
from node import SharedMemory, SharedMemoryConfig
with SharedMemory(SharedMemoryConfig(namespace="envsel")) as shm:
    shm.set("via", "env")
    print(shm.status().broker)
"""], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == broker_process.address
    with SharedMemory(SharedMemoryConfig(namespace="envsel",
                                         broker=broker_process.address)) as shm:
        assert shm.get("via") == "env"
    assert os.environ.get("SHAREDMEM_BROKER") == "embedded"  # conftest default, untouched


def test_registry_returns_the_same_object_for_equal_configs() -> None:
    reg = Registry()
    try:
        c1 = SharedMemoryConfig(namespace="reg", max_keys=100)
        c2 = SharedMemoryConfig(namespace="reg", max_keys=100)
        c3 = SharedMemoryConfig(namespace="reg_other", max_keys=100)
        assert reg.get_or_create(c1) is reg.get_or_create(c2)
        assert reg.get_or_create(c1) is not reg.get_or_create(c3)
        assert get_or_create(c1) is get_or_create(c2)
        get_or_create(c1).set("x", 1)
        assert reg.get_or_create(c2).get("x") == 1
    finally:
        reg.close()


def test_async_api_never_blocks_the_loop(broker_process: BrokerProcess) -> None:
    async def main() -> None:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        cfg = SharedMemoryConfig(namespace="async", broker=broker_process.address)
        async with AsyncSharedMemory(cfg) as shm:
            before = ticks
            version = await shm.set("k", {"v": 1})
            assert ticks > before  # the loop ran while the write travelled
            assert await shm.get("k") == {"v": 1}
            assert await shm.exists("k")
            assert (await shm.get_metadata("k")).version == version
            await shm.set_many({"a1": 1, "a2": 2}, ttl=0)
            assert await shm.list_keys("a?") == ["a1", "a2"]
            assert await shm.delete("k") is True
            with pytest.raises(KeyNotFound):
                await shm.get("k")
            results = await asyncio.gather(*(shm.set(f"c{i}", i) for i in range(20)))
            assert sorted(results) == list(range(results[0], results[0] + 20)) or \
                len(set(results)) == 20
        stop.set()
        await t

    asyncio.run(main())


def test_close_is_idempotent_and_leaves_no_thread() -> None:
    before = {t.name for t in threading.enumerate()}
    shm = SharedMemory(SharedMemoryConfig(namespace="closing", broker=None))
    shm.set("k", 1)
    shm.close()
    shm.close()
    with pytest.raises(Exception, match="closed"):
        shm.get("k")
    after = {t.name for t in threading.enumerate() if t.is_alive()}
    assert "sharedmem-node-io" not in (after - before)


def test_broker_process_stops_cleanly_on_sigterm_and_sigint() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        b = BrokerProcess(free_port_pair()).start()
        assert b.proc is not None
        b.proc.send_signal(sig)
        assert b.proc.wait(10) == 0
        b.stop()


def test_prometheus_metrics_endpoint() -> None:
    import urllib.request

    from tests.conftest import wait_until

    metrics_port = free_port_pair()
    b = BrokerProcess(free_port_pair(), ("--metrics-port", str(metrics_port))).start()
    try:
        with SharedMemory(SharedMemoryConfig(namespace="metrics", broker=b.address)) as shm:
            shm.set("a", 1)
            shm.set("b", 2)

            def scrape() -> str:
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.read().decode()

            def ready() -> str | None:
                text = scrape()
                return (text if 'sharedmem_namespace_keys{namespace="metrics"} 2.0' in text
                        else None)

            text = wait_until(ready, 10, interval=0.1, message="metrics to show 2 keys")
            assert "sharedmem_events_total 2.0" in text
            assert "sharedmem_subscribers 1.0" in text
            assert 'sharedmem_namespace_keys{namespace="metrics"} 2.0' in text
    finally:
        b.stop()


def test_an_async_watcher_refuses_blocking_get() -> None:
    async def main() -> None:
        async with AsyncSharedMemory(SharedMemoryConfig(namespace="awatch")) as shm:
            watcher = shm.watch("*", initial=False)
            with pytest.raises(TypeError, match="async for"):
                watcher.get(timeout=0.1)
            await shm.set("k", 1)
            change = await asyncio.wait_for(watcher.aget(), 10)
            assert change is not None and (change.key, change.op) == ("k", "set")
            watcher.close()

    asyncio.run(main())


def test_a_second_handle_with_other_node_settings_is_warned(caplog) -> None:
    a = SharedMemory(SharedMemoryConfig(namespace="settings_a"))
    try:
        with caplog.at_level("WARNING", logger="sharedmem.node"):
            b = SharedMemory(SharedMemoryConfig(namespace="settings_b", receive_hwm=10))
            b.close()
        assert any("are ignored" in r.getMessage() for r in caplog.records)
    finally:
        a.close()
