"""Issue 14, with real broker processes and real files: a namespace created by a write keeps its
max_keys, one broker per data directory (a lock), a removed data directory refuses writes,
disk trouble at rotation/compaction never leaves a zombie or a bricked directory, and repair
starts a new epoch that connected nodes follow."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from broker.protocol import Reply, Request, Set, WriteOk, reply_codec, request_codec
from node import SharedMemory, SharedMemoryConfig, StorageError
from tests.conftest import BrokerProcess, free_port_pair


def durable_broker(port: int, data_dir: Path, *extra: str) -> BrokerProcess:
    return BrokerProcess(port, ("--data-dir", str(data_dir), *extra)).start()


def raw_request(address: str, request: Request, timeout_ms: int = 10_000) -> Reply:
    """One request over a plain DEALER, as a node's (retried) request reaches the broker."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sock.send_multipart([b"", request_codec().encode(request)])
        assert sock.poll(timeout_ms), "no reply from the broker"
        return reply_codec().decode(sock.recv_multipart()[1])
    finally:
        ctx.destroy(linger=0)


def test_a_namespace_created_by_a_write_keeps_max_keys_after_kill_9(tmp_path: Path) -> None:
    port = free_port_pair()
    data = tmp_path / "data"
    broker = durable_broker(port, data)
    try:
        # A node's retried set() reaching a broker that lost (or never had) the namespace:
        # the write itself creates it.
        reply = raw_request(broker.address, Set(b"n" * 12, 1, "created", 3, "k", b"1", None))
        assert isinstance(reply, WriteOk) and reply.seq == 1
        broker.kill()
        broker = durable_broker(port, data)
        cfg = SharedMemoryConfig(namespace="created", broker=broker.address, max_keys=3, ttl=0)
        with SharedMemory(cfg) as shm:  # refused with "exists with max_keys=0" before the fix
            assert shm.get("k") == 1
            shm.set("a", 1)
            shm.set("b", 2)
            with pytest.raises(StorageError, match="full"):
                shm.set("c", 3)
    finally:
        broker.stop()
