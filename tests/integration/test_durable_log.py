"""The durable log over real files in a temp directory, driven in-process (issue 14): the
namespace record precedes its first batch, the data-dir lock, a vanished or replaced segment,
atomic segment creation, recovery of a header-less last segment, repair's new epoch, and a
fault injected into every file operation of a rotation and of a compaction."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
import zmq

from broker.core import BrokerCore
from broker.durable import BatchRecord, DurableLog, FileOps, NamespaceRecord, scan_segment, seg_path
from broker.errors import StorageError
from broker.protocol import Digest, DigestReply, Error, Set, WriteOk, reply_codec, request_codec
from broker.recovery import CorruptLog, recover, repair
from broker.server import Broker, BrokerConfig
from broker.turn import persist
from tests.conftest import free_port_pair, wait_until


def open_core(data: Path, **kw: object) -> tuple[BrokerCore, DurableLog]:
    log = DurableLog(data, **kw)  # type: ignore[arg-type]
    core = BrokerCore(log=log)
    try:
        recover(core, log)
    except BaseException:
        log.close()  # releases the directory's lock
        raise
    return core, log


def write(core: BrokerCore, key: str, value: bytes, *, ns: str = "ns", max_keys: int = 0,
          client: bytes = b"c" * 12, request_no: int = 1) -> None:
    """One write as the broker's turn does it: run_turn, then persist (append + flush).
    A refused flush raises StorageError with the refusal the writer would get."""
    request = Set(client, request_no, ns, max_keys, key, value, None)
    turn = core.run_turn([(None, request)], 0.0, 1.0)
    if not persist(core, core.log, turn):
        reply = turn.replies[0].reply
        assert isinstance(reply, Error)
        raise StorageError(reply.message)


# ---------------------------------------------------------------------- item 5


def test_a_namespace_created_by_a_write_keeps_its_max_keys_after_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    core, log = open_core(data)
    write(core, "k", b"1", max_keys=3)
    log.close()
    records = scan_segment(seg_path(data, 1)).records
    # exactly one namespace record, before the batch that uses it
    assert [type(r) for r in records] == [NamespaceRecord, BatchRecord]
    assert records[0] == NamespaceRecord("ns", 3)
    core2, log2 = open_core(data)
    try:
        assert core2.namespaces["ns"].max_keys == 3
        assert core2.namespaces["ns"].seq == 1
    finally:
        log2.close()


# ---------------------------------------------------------------------- item 4


def test_a_deleted_or_replaced_segment_refuses_the_flush(tmp_path: Path) -> None:
    data = tmp_path / "data"
    core, log = open_core(data)
    try:
        write(core, "a", b"1")
        seg = seg_path(data, 1)
        other = tmp_path / "other.log"
        shutil.copy(seg, other)
        os.replace(other, seg)  # same name, another file
        with pytest.raises(StorageError, match="removed or replaced"):
            write(core, "b", b"2", request_no=2)
        seg.unlink()
        with pytest.raises(StorageError, match="removed or replaced"):
            write(core, "c", b"3", request_no=3)
    finally:
        log.close()


# ---------------------------------------------------------------------- item 3: recovery


@pytest.mark.parametrize("content", [b"", b"SHMLOG1\x00abc", b"\x00" * 32],
                         ids=["empty", "short", "zero-filled"])
def test_a_headerless_last_segment_is_replaced_at_start_up(tmp_path: Path,
                                                            content: bytes) -> None:
    """What a crash (or a full disk) between creating a segment and writing its header left
    with the old code: start-up refused it, and repair said there was nothing to do."""
    data = tmp_path / "data"
    core, log = open_core(data)
    write(core, "a", b"1")
    digest = core.namespaces["ns"].digest()
    log.close()
    seg_path(data, 2).write_bytes(content)
    core2, log2 = open_core(data)
    try:
        assert core2.namespaces["ns"].digest() == digest
        write(core2, "b", b"2", request_no=2)
    finally:
        log2.close()
    assert len(scan_segment(seg_path(data, 2)).records) == 1
    core3, log3 = open_core(data)
    try:
        assert core3.namespaces["ns"].seq == 2
    finally:
        log3.close()


def test_repair_fixes_a_bad_header_and_a_gap_that_start_up_refuses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    core, log = open_core(data, compact_bytes=1 << 30)
    write(core, "a", b"1")
    log.close()
    seg1 = seg_path(data, 1)
    raw = bytearray(seg1.read_bytes())
    raw[0:8] = b"garbage!"
    seg1.write_bytes(bytes(raw))
    with pytest.raises(CorruptLog):
        open_core(data)
    said = repair(data)
    assert any("rewrote the header" in line for line in said)
    core2, log2 = open_core(data)
    try:
        assert core2.namespaces["ns"].seq == 1  # the records were kept
    finally:
        log2.close()
    # a gap: segment 3 exists, segment 2 does not
    shutil.copy(seg1, seg_path(data, 3))
    with pytest.raises(CorruptLog, match="missing"):
        open_core(data)
    said = repair(data)
    assert any("missing" in line for line in said) and not seg_path(data, 3).exists()
    core3, log3 = open_core(data)
    log3.close()
    assert core3.namespaces["ns"].seq == 1


# ---------------------------------------------------------------------- fault injection


class FaultyOps(FileOps):
    """Fails the ``fail_at``-th operation counted from ``arm()`` (or every one from there on,
    ``persistent``) with ``errno``; thread-safe (the snapshot is written on a thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[str] | None = None
        self.fail_at = -1
        self.errno = errno.ENOSPC
        self.persistent = False
        self.fired: str | None = None

    def arm(self, fail_at: int, err: int, persistent: bool = False) -> None:
        with self.lock:
            self.calls, self.fail_at, self.errno, self.persistent = [], fail_at, err, persistent
            self.fired = None

    def disarm(self) -> None:
        with self.lock:
            self.calls = None

    def _step(self, name: str) -> None:
        with self.lock:
            if self.calls is None:
                return
            i = len(self.calls)
            self.calls.append(name)
            if i == self.fail_at or (self.persistent and i > self.fail_at):
                self.fired = self.fired or name
                raise OSError(self.errno, f"{os.strerror(self.errno)} (injected into {name})")

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        self._step("open")
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._step("write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._step("fsync")
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self._step("close")
        super().close(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        self._step("ftruncate")
        super().ftruncate(fd, size)

    def fstat(self, fd: int) -> os.stat_result:
        self._step("fstat")
        return super().fstat(fd)

    def stat(self, path: Path) -> os.stat_result:
        self._step("stat")
        return super().stat(path)

    def replace(self, src: Path, dst: Path) -> None:
        self._step("replace")
        super().replace(src, dst)

    def unlink(self, path: Path) -> None:
        self._step("unlink")
        super().unlink(path)

    def listdir(self, path: Path) -> list[str]:
        self._step("listdir")
        return super().listdir(path)


class Client:
    """A plain DEALER to an in-process broker: one request, one reply."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.no = 0

    def ask(self, request: object) -> object:
        self.sock.send_multipart([b"", request_codec().encode(request)])
        assert self.sock.poll(10_000), "the broker answered nothing"
        return reply_codec().decode(self.sock.recv_multipart()[1])

    def set(self, key: str, value: bytes) -> object:
        self.no += 1
        return self.ask(Set(b"f" * 12, self.no, "ns", 0, key, value, None))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


VALUE = b'"' + b"v" * 1000 + b'"'


def run_with_fault(data: Path, fail_at: int, err: int, persistent: bool) -> str | None:
    """Three writes, then a fourth that pushes the segment past compact_bytes, with the fault
    armed from that write on: its flush, the rotation, the snapshot and the clean-up. Asserts
    the broker then refuses or takes writes and serves reads (or stopped), and that a plain
    restart recovers every acknowledged write. Returns the operation that failed, if any."""
    ops = FaultyOps()
    durable = DurableLog(data, compact_bytes=4000, ops=ops)
    durable.compaction_retry = 0.0
    broker = Broker(BrokerConfig(bind=[f"tcp://127.0.0.1:{free_port_pair()}"]),
                    core=BrokerCore(log=durable)).start()
    client = Client(broker.endpoints[0])
    acked: dict[str, bytes] = {}
    try:
        for i in range(3):
            assert isinstance(client.set(f"k{i}", VALUE), WriteOk)
            acked[f"k{i}"] = VALUE
        ops.arm(fail_at, err, persistent)
        reply = client.set("k3", VALUE)
        if isinstance(reply, WriteOk):
            acked["k3"] = VALUE
            # the loop rotates after the turn; wait for the compaction to end either way
            wait_until(lambda: not durable.compacting and
                       durable.compactions + durable.compaction_failures > 0, 10,
                       message="the compaction to finish or fail")
        else:
            assert isinstance(reply, Error) and reply.kind == "StorageError", reply
        fired = ops.fired
        assert broker.loop_failed is False
        # reads are served
        digest = client.ask(Digest("ns"))
        assert isinstance(digest, DigestReply)
        # writes: refused with StorageError, or applied
        for i in range(4, 7):
            reply = client.set(f"k{i}", VALUE)
            if isinstance(reply, WriteOk):
                acked[f"k{i}"] = VALUE
            else:
                assert isinstance(reply, Error) and reply.kind == "StorageError", reply
        ops.disarm()  # the disk is back: writes work again
        assert isinstance(client.set("k7", VALUE), WriteOk)
        acked["k7"] = VALUE
    finally:
        client.close()
        broker.stop()
    assert broker.loop_failed is False
    core, log = open_core(data)  # no manual step
    try:
        state = core.namespaces["ns"]
        assert {k: state.entry(k).value for k in acked} == acked
    finally:
        log.close()
    return fired


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("err", "persistent"), [
    (errno.ENOSPC, False), (errno.EIO, False), (errno.ENOENT, False),
    (errno.ENOSPC, True), (errno.ENOENT, True),
], ids=["ENOSPC", "EIO", "vanished-dir", "ENOSPC-from-then-on", "vanished-dir-from-then-on"])
def test_each_file_operation_of_a_rotation_and_a_compaction_failing_in_turn(
    tmp_path: Path, err: int, persistent: bool,
) -> None:
    failed: list[str] = []
    for k in range(200):
        fired = run_with_fault(tmp_path / f"run{k}", k, err, persistent)
        if fired is None:
            break  # past the last operation of the compaction
        failed.append(fired)
    else:
        raise AssertionError("the fault kept firing")
    # every kind of operation the rotation and compaction make was failed at least once
    assert {"write", "fsync", "open", "close", "replace", "listdir", "unlink"} <= set(failed)
    assert len(failed) > 20
