"""A user's script touching every public name of ``node`` (and ``broker``'s entry points), type
checked with ``mypy --strict`` by tests/integration/test_typing.py. It is checked, not run."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Literal

from broker import Broker, BrokerConfig, BrokerCore, ProtocolError
from node import (
    AccessDenied,
    AsyncSharedMemory,
    BrokerUnavailable,
    CallbackHandle,
    ChangeEvent,
    InvalidKey,
    InvalidNamespace,
    InvalidValue,
    KeyNotFound,
    Metadata,
    NamespaceInfo,
    PatternError,
    Registry,
    SharedMemory,
    SharedMemoryConfig,
    SharedMemoryError,
    Status,
    StorageError,
    VersionConflict,
    Watcher,
    get_or_create,
)

Op = Literal["set", "delete", "expire", "touch", "initial_done"]


def sync_use(config: SharedMemoryConfig) -> None:
    with SharedMemory(config) as shm:
        version: int = shm.set("k", {"a": 1}, ttl=timedelta(minutes=5))
        shm.set("k2", [1, 2], ttl=1.5, if_version=0)
        shm.set_many({"x": 1, "y": 2}, ttl=timedelta(seconds=30))
        shm.touch("k", timedelta(hours=1))
        shm.update("n", lambda n: (n or 0) + 1, ttl=timedelta(seconds=1))
        deleted: bool = shm.delete("x", if_version=version)
        values: dict[str, object] = shm.get_many(["k", "k2"], consistent=True)
        removed: int = shm.delete_many(["k2"]) + shm.delete_pattern("tmp_*")
        shm.set_max_keys(100)
        info: NamespaceInfo = shm.namespace_info()
        print(values, removed, info.keys, info.seq, info.max_keys, shm.drop_namespace())
        keys: list[str] = shm.list_keys("k*")
        meta: Metadata = shm.get_metadata("k")
        when: datetime = meta.last_modified
        st: Status = shm.status()
        sync_state: Literal["joining", "live", "repairing", "resyncing"] = st.namespace.sync
        seq: int = shm.seq
        digest: tuple[int, str] = shm.local_digest()
        print(deleted, keys, when, sync_state, seq, digest, shm.exists("k"), shm.get("k", None))
        watcher: Watcher = shm.watch("k*", initial=True)
        change: ChangeEvent | None = watcher.get(timeout=1)
        if change is not None:
            op: Op = change.op
            print(op, change.key, change.version, change.value, change.modified_at)
        watcher.close()

        def on(ch: ChangeEvent) -> None:
            print(ch.op)

        handle: CallbackHandle = shm.on_change("k*", on)
        handle.cancel()


async def async_use(config: SharedMemoryConfig) -> None:
    async with AsyncSharedMemory(config) as shm:
        await shm.set("k", 1, ttl=timedelta(seconds=10))
        await shm.set_many({"a": 1}, ttl=2.0)
        await shm.touch("k", timedelta(seconds=3))
        await shm.update("n", lambda n: (n or 0) + 1)
        many: dict[str, object] = await shm.get_many(("k", "n"))
        gone: int = await shm.delete_many(["n"]) + await shm.delete_pattern("a*")
        await shm.set_max_keys(0)
        ns_info: NamespaceInfo = await shm.namespace_info()
        print(many, gone, ns_info, await shm.drop_namespace())
        value: object = await shm.get("k", None, consistent=True)
        keys: list[str] = await shm.list_keys("*", consistent=True)
        print(value, keys, await shm.exists("k"), await shm.get_metadata("k"),
              await shm.status(), await shm.delete("a"), shm.seq, shm.local_digest(),
              await shm.broker_digest())
        async with shm.watch("k*", initial=False) as changes:
            change: ChangeEvent | None = await changes.aget(timeout=1)
            async for ch in changes:
                print(change, ch.op)
                break


def errors() -> None:
    config = SharedMemoryConfig(namespace="typed", broker="embedded", max_keys=None,
                                ttl=timedelta(hours=1), max_staleness=5.0)
    try:
        sync_use(config)
        asyncio.run(async_use(config))
    except VersionConflict as exc:
        print(exc.current_version)
    except BrokerUnavailable as exc:
        print(exc.outcome_unknown)
    except (AccessDenied, InvalidKey, InvalidNamespace, InvalidValue, KeyNotFound,
            PatternError, StorageError, ProtocolError, SharedMemoryError) as exc:
        print(exc.kind)
    registry = Registry()
    shm = registry.get_or_create(config)
    assert shm is get_or_create(config) or shm is not None
    registry.close()
    with Broker(BrokerConfig(bind=["tcp://127.0.0.1:0"])) as b:
        print(b.endpoints, BrokerCore().epoch)
