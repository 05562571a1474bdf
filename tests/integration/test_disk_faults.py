"""Issue 14, with real broker processes and real files: a namespace created by a write keeps its
max_keys, one broker per data directory (a lock), a removed data directory refuses writes,
disk trouble at rotation/compaction never leaves a zombie or a bricked directory, and repair
starts a new epoch that connected nodes follow."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from broker.durable import REC_HEADER, SEG_HEADER, BatchRecord, scan_segment, seg_path
from broker.protocol import Reply, Request, Set, WriteOk, reply_codec, request_codec
from node import SharedMemory, SharedMemoryConfig, StorageError
from tests.conftest import (
    ROOT,
    BrokerProcess,
    child_env,
    free_port_pair,
    run_agent,
    wait_until,
)


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


# ---------------------------------------------------------------------- item 1: the lock


def run_broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)


def dir_contents(data: Path) -> dict[str, bytes]:
    """Every file's bytes, except LOCK (whoever takes the lock writes its pid there)."""
    return {p.name: p.read_bytes() for p in sorted(data.iterdir())
            if p.is_file() and p.name != "LOCK"}


def test_a_second_broker_on_the_same_data_dir_exits_naming_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port_a, port_b = free_port_pair(), free_port_pair()
    broker = durable_broker(port_a, data)
    try:
        assert broker.proc is not None
        cfg = SharedMemoryConfig(namespace="shared", broker=broker.address, max_keys=0, ttl=0)
        with SharedMemory(cfg) as shm:
            for i in range(20):
                shm.set(f"a{i}", i)
            before = dir_contents(data)
            second = run_broker_cli("--bind", f"tcp://127.0.0.1:{port_b}", "--data-dir",
                                    str(data))
            assert second.returncode != 0
            assert str(data) in second.stderr and f"pid {broker.proc.pid}" in second.stderr
            assert "ready" not in second.stdout
            assert dir_contents(data) == before  # the loser touched nothing
            shm.set("after", 1)  # the first broker goes on
        broker.kill()
        broker = durable_broker(port_a, data)
        with SharedMemory(cfg) as shm:
            assert [shm.get(f"a{i}") for i in range(20)] == list(range(20))
            assert shm.get("after") == 1
    finally:
        broker.stop()


def test_repair_while_a_broker_runs_exits_naming_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = durable_broker(free_port_pair(), data)
    try:
        assert broker.proc is not None
        before = dir_contents(data)
        repaired = run_broker_cli("repair", "--data-dir", str(data))
        assert repaired.returncode != 0
        assert str(data) in repaired.stderr and f"pid {broker.proc.pid}" in repaired.stderr
        assert dir_contents(data) == before
    finally:
        broker.stop()
    # with the broker gone (even by kill -9, the kernel drops the lock) repair runs
    broker = durable_broker(free_port_pair(), data)
    broker.kill()
    repaired = run_broker_cli("repair", "--data-dir", str(data))
    assert repaired.returncode == 0, repaired.stderr


def test_a_broker_that_cannot_bind_leaves_the_data_dir_untouched(tmp_path: Path) -> None:
    """The data dir's files are rewritten only after the lock and the binds succeeded: a
    failed start must not change, for example, the policy the log was written under."""
    data = tmp_path / "data"
    port = free_port_pair()
    broker = durable_broker(port, data, "--fsync", "everysec")
    cfg = SharedMemoryConfig(namespace="shared", broker=broker.address, max_keys=0, ttl=0)
    with SharedMemory(cfg) as shm:
        shm.set("k", 1)
    broker.kill()  # unclean, under everysec: the next start must renew the epoch
    before = dir_contents(data)
    other = durable_broker(port, tmp_path / "other")  # takes the port
    try:
        failed = run_broker_cli("--bind", f"tcp://127.0.0.1:{port}", "--data-dir", str(data),
                                "--fsync", "always")
        assert failed.returncode != 0 and "ready" not in failed.stdout
        assert dir_contents(data) == before
    finally:
        other.stop()
    broker = durable_broker(port, data, "--fsync", "always")
    try:
        assert broker.epoch != before["EPOCH"].decode().strip()
    finally:
        broker.stop()


# ---------------------------------------------------------------------- item 4


def test_writes_after_the_data_dir_is_removed_are_refused_not_acknowledged(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    port = free_port_pair()
    broker = durable_broker(port, data)
    cfg = SharedMemoryConfig(namespace="gone", broker=broker.address, max_keys=0, ttl=0)
    try:
        with SharedMemory(cfg) as shm:
            shm.set("before", 1)
            shutil.rmtree(data)
            acknowledged = []
            for i in range(50):
                try:
                    shm.set(f"k{i}", i)
                    acknowledged.append(i)
                except StorageError as exc:
                    assert "removed or replaced" in str(exc) and "nothing changed" in str(exc)
            assert acknowledged == []
            assert shm.get("before") == 1  # reads go on
            assert shm.broker_digest() == shm.local_digest()
        assert broker.alive
    finally:
        broker.stop()


# ---------------------------------------------------------------------- item 3


def mount_tmpfs(path: Path, size: str) -> bool:
    """A tiny file system of our own (root only): the real way to run out of space."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def fill(path: Path) -> None:
    """Write zeros into ``path`` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_disk_full_at_rotation_keeps_the_broker_answering_and_the_dir_startable(
    tmp_path: Path,
) -> None:
    """Before: the OSError of the new segment escaped the loop, mark_clean failed in run()'s
    finally, and the process stayed alive answering nothing, with an empty seg-00000002.log
    that every later start refused."""
    mnt = tmp_path / "tiny"
    if not mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root and tmpfs mounts to make a 1 MiB disk")
    port = free_port_pair()
    data = mnt / "data"
    broker = None
    try:
        broker = durable_broker(port, data, "--compact-bytes", "6000")
        cfg = SharedMemoryConfig(namespace="full", broker=broker.address, max_keys=0, ttl=0,
                                 request_timeout=5.0)
        acked: dict[str, str] = {}
        with SharedMemory(cfg) as shm:
            for i in range(3):
                shm.set(f"pre{i}", "p" * 1500)
                acked[f"pre{i}"] = "p" * 1500
            fill(mnt / "filler")
            refused = 0
            for i in range(30):  # past compact-bytes: the rotation runs out of space
                try:
                    shm.set(f"k{i}", "x" * 1500)
                    acked[f"k{i}"] = "x" * 1500
                except StorageError:
                    refused += 1
            assert refused > 0
            assert broker.alive
            # reads are served: the broker answers
            assert shm.broker_digest() == shm.local_digest()
            assert all(shm.get(k) == v for k, v in acked.items())
            (mnt / "filler").unlink()  # space is back: writes work again
            shm.set("after", "resumed")
            acked["after"] = "resumed"
        broker.kill()
        broker = durable_broker(port, data)  # no repair needed
        with SharedMemory(cfg) as shm:
            assert {k: shm.get(k) for k in acked} == acked
    finally:
        if broker is not None:
            broker.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------- item 2


WRITE_THREE = r"""
import sys
from node import SharedMemory, SharedMemoryConfig
cfg = SharedMemoryConfig(namespace="rep", broker=sys.argv[1], max_keys=0, ttl=0)
with SharedMemory(cfg) as shm:
    for i in range(3):
        shm.set(f"new{i}", i)
    print(shm.seq)
"""


def corrupt_record_with_seq(seg: Path, seq: int) -> None:
    """Flip a byte in the payload of the batch record holding event ``seq``."""
    raw = bytearray(seg.read_bytes())
    off = SEG_HEADER.size
    for rec in scan_segment(seg).records:
        length, _ = REC_HEADER.unpack_from(raw, off)
        if isinstance(rec, BatchRecord) and rec.events[0].seq == seq:
            raw[off + REC_HEADER.size + length // 2] ^= 0xFF
            seg.write_bytes(bytes(raw))
            return
        off += REC_HEADER.size + length
    raise AssertionError(f"no record with seq {seq}")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_after_repair_drops_history_connected_nodes_resync_and_converge(tmp_path: Path) -> None:
    port = free_port_pair()
    data = tmp_path / "data"
    broker = durable_broker(port, data)
    cfg = SharedMemoryConfig(namespace="rep", broker=broker.address, max_keys=0, ttl=0,
                             connect_timeout=30)
    try:
        with SharedMemory(cfg) as first:
            for i in range(20):
                first.set(f"k{i}", i)
            assert first.seq == 20
            old_epoch = broker.epoch
            broker.kill()
            corrupt_record_with_seq(seg_path(data, 1), 8)
            refused = run_broker_cli("--bind", broker.address, "--data-dir", str(data))
            assert refused.returncode != 0 and "repair" in refused.stderr
            repaired = run_broker_cli("repair", "--data-dir", str(data))
            assert repaired.returncode == 0 and "new epoch" in repaired.stdout
            broker = durable_broker(port, data)
            assert broker.epoch != old_epoch
            assert run_agent(WRITE_THREE, broker.address).stdout.split() == ["10"]
            # the first node leaves seq 20 of the old history and takes the new one
            wait_until(lambda: first.local_digest() == first.broker_digest(), 30,
                       message="the first node to converge")
            assert first.seq == 10
            expected = {f"k{i}": i for i in range(7)} | {f"new{i}": i for i in range(3)}
            assert sorted(first.list_keys("*", consistent=True)) == sorted(expected)
            for key, value in expected.items():
                assert first.get(key, consistent=True) == value
            assert first.get("k7", None, consistent=True) is None
    finally:
        broker.stop()
