"""The durable log over real files in a temp directory, driven in-process (issue 14): the
namespace record precedes its first batch, the data-dir lock, a vanished or replaced segment,
atomic segment creation, recovery of a header-less last segment, repair's new epoch, and a
fault injected into every file operation of a rotation and of a compaction."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from broker.core import BrokerCore
from broker.durable import (
    BatchRecord,
    DurableLog,
    FileOps,
    NamespaceRecord,
    scan_segment,
    seg_path,
    snap_path,
    write_snapshot,
)
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

    def read(self, path: Path) -> bytes:
        self._step("read")
        return super().read(path)


class PlannedOps(FileOps):
    """Fails the next call of each operation in ``plan``, in order (``["fsync", "ftruncate"]``:
    the next fsync, then the ftruncate after it), and every call of those in ``broken``."""

    def __init__(self) -> None:
        self.plan: list[str] = []
        self.broken: set[str] = set()

    def _step(self, name: str) -> None:
        if name in self.broken or (self.plan and self.plan[0] == name):
            if name not in self.broken:
                self.plan.pop(0)
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected into {name})")

    def fsync(self, fd: int) -> None:
        self._step("fsync")
        super().fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        self._step("ftruncate")
        super().ftruncate(fd, size)


def _persisted(core: BrokerCore, request: Set) -> list[object]:
    """Run one turn of ``request`` through broker.turn.persist; the replies it would send."""
    turn = core.run_turn([(None, request)], 0.0, 1.0)
    persist(core, core.log, turn)
    return [out.reply for out in turn.replies]


def _storage_errors(replies: list[object]) -> list[object]:
    return [r for r in replies if isinstance(r, Error) and r.kind == "StorageError"]


def test_a_turn_whose_bytes_could_not_be_cut_away_is_never_refused_then_applied(
    tmp_path: Path,
) -> None:
    """docs/consistency.md section 7, fixed defect: the turn's write succeeds, its fsync fails,
    and cutting its bytes away fails too; the process then dies before a retry of the cut
    succeeds (here: ftruncate stays broken until the log is closed, as a crash would leave it),
    and the restart replays the records. No client may have been told StorageError for it."""
    data = tmp_path / "data"
    ops = PlannedOps()
    core, log = open_core(data, ops=ops)
    client = b"d" * 12
    told: list[object] = []
    try:
        told += _persisted(core, Set(client, 1, "ns", 0, "a", b"1", None))
        assert told == [WriteOk(core.epoch, 1)]
        ops.plan = ["fsync", "ftruncate"]
        write = Set(client, 2, "ns", 0, "k", b"2", None)
        in_doubt = _persisted(core, write)
        assert in_doubt == [] and log.in_doubt  # withheld: neither WriteOk nor StorageError
        assert "k" not in core.namespaces["ns"].entries  # rolled back meanwhile
        ops.broken = {"ftruncate"}  # the cut keeps failing ...
        log.tick()
        retry = _persisted(core, write)  # ... so the retry is withheld too, not re-decided
        assert retry == [] and core.namespaces["ns"].seq == 1
        told += in_doubt + retry
    finally:
        log.close()  # ... until the "crash": the bytes stay in the segment
    core2, log2 = open_core(data)
    try:
        assert core2.namespaces["ns"].entry("k").value == b"2"  # the bytes came back
        after = _persisted(core2, write)  # the client's retry after the restart
        assert len(after) == 1 and isinstance(after[0], WriteOk) and after[0].seq == 2
        told += after
    finally:
        log2.close()
    assert _storage_errors(told) == []  # never "refused" for a write that recover applied


def test_a_turn_in_doubt_is_refused_once_its_bytes_are_cut_away(tmp_path: Path) -> None:
    """The other ending: a tick's retry of the cut succeeds, so the write is refused for good
    (its retry gets StorageError) and a restart does not have it."""
    data = tmp_path / "data"
    ops = PlannedOps()
    core, log = open_core(data, ops=ops)
    client = b"e" * 12
    try:
        assert isinstance(_persisted(core, Set(client, 1, "ns", 0, "a", b"1", None))[0], WriteOk)
        ops.plan = ["fsync", "ftruncate"]
        write = Set(client, 2, "ns", 0, "k", b"2", None)
        assert _persisted(core, write) == [] and log.in_doubt
        # another writer's turn while the cut is owed: the cut is tried first, fails, and its
        # bytes never reach the file, so refusing it is true
        ops.broken = {"ftruncate"}
        other = _persisted(core, Set(b"o" * 12, 1, "ns", 0, "o", b"3", None))
        assert len(_storage_errors(other)) == 1 and log.in_doubt
        ops.broken = set()
        log.tick()  # what the broker's loop does every pass, then settles the table
        core.settle_in_doubt()
        assert not log.in_doubt
        refused = _persisted(core, write)
        assert len(_storage_errors(refused)) == 1, refused
        assert isinstance(_persisted(core, Set(client, 3, "ns", 0, "b", b"4", None))[0], WriteOk)
    finally:
        log.close()
    core2, log2 = open_core(data)
    try:
        state = core2.namespaces["ns"]
        assert "k" not in state.entries and "o" not in state.entries
        assert state.entry("b").value == b"4"
        assert core2.namespaces["ns"].seq == 2
    finally:
        log2.close()


class Client:
    """A plain DEALER to an in-process broker: one request, one reply -- or none, when the
    log is in doubt (``withheld()``): the reply of a turn in doubt is never sent."""

    def __init__(self, address: str, withheld: Callable[[], bool] = lambda: False) -> None:
        self.ctx = zmq.Context()
        self.address = address
        self.withheld = withheld
        self.sock = self._connect()
        self.no = 0

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        return sock

    def ask(self, request: object, *, write: bool = False) -> object | None:
        """The reply, or (a ``write``) None when none came and the log is in doubt."""
        self.sock.send_multipart([b"", request_codec().encode(request)])
        wait_until(lambda: self.sock.poll(0) or (write and self.withheld()), 10,
                   message="a reply (or the log in doubt)")
        if not self.sock.poll(0):
            # Perhaps withheld: a fresh socket (as a Lazy Pirate client does), so that a
            # reply still on its way cannot be taken for the next request's.
            self.sock.close()
            self.sock = self._connect()
            return None
        return reply_codec().decode(self.sock.recv_multipart()[1])

    def set(self, key: str, value: bytes) -> object | None:
        self.no += 1
        return self.ask(Set(b"f" * 12, self.no, "ns", 0, key, value, None), write=True)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


VALUE = b'"' + b"v" * 1000 + b'"'


def run_with_fault(data: Path, fail_at: int, err: int, persistent: bool) -> str | None:
    """Three writes, then a fourth that pushes the segment past compact_bytes, with the fault
    armed from that write on: its flush, the rotation, the snapshot and the clean-up. Asserts
    the broker then refuses or takes writes and serves reads (or stopped), and that a plain
    restart recovers every acknowledged write and none that was refused (a turn whose bytes
    could not be cut away answers nothing: its outcome is in doubt). Returns the operation that
    failed, if any."""
    # a first generation (snap-2 over segment 1), so that this compaction has older files
    # to delete: its clean-up (listdir, unlink) is among the operations failed in turn
    core0, log0 = open_core(data, compact_bytes=1 << 30)
    try:
        write(core0, "k_pre", VALUE, client=b"p" * 12)
        compact(core0, log0)
    finally:
        log0.close()
    ops = FaultyOps()
    durable = DurableLog(data, compact_bytes=4000, ops=ops)
    durable.compaction_retry = 0.0
    broker = Broker(BrokerConfig(bind=[f"tcp://127.0.0.1:{free_port_pair()}"]),
                    core=BrokerCore(log=durable)).start()
    client = Client(broker.endpoints[0], withheld=lambda: durable.in_doubt)
    acked: dict[str, bytes] = {"k_pre": VALUE}
    refused: set[str] = set()
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
        elif reply is not None:
            assert isinstance(reply, Error) and reply.kind == "StorageError", reply
            refused.add("k3")
        fired = ops.fired
        assert broker.loop_failed is False
        # reads are served
        digest = client.ask(Digest("ns"))
        assert isinstance(digest, DigestReply)
        # writes: refused with StorageError, applied, or (the log in doubt) not answered
        for i in range(4, 7):
            reply = client.set(f"k{i}", VALUE)
            if isinstance(reply, WriteOk):
                acked[f"k{i}"] = VALUE
            elif reply is not None:
                assert isinstance(reply, Error) and reply.kind == "StorageError", reply
                refused.add(f"k{i}")
        ops.disarm()  # the disk is back: writes work again
        wait_until(lambda: not durable.in_doubt, 10, message="the loop to make the owed cut")
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
        assert not refused & set(state.entries), "a write refused with StorageError came back"
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
    assert {"write", "fsync", "open", "close", "replace", "read", "listdir", "unlink"} \
        <= set(failed)
    assert len(failed) > 20


# ---------------------------------------------------------------------- snapshot generations


class ReadbackOps(FileOps):
    """Garbles (``garble``) or fails (``fail``) the read-back of a snapshot."""

    garble = False
    fail = False

    def read(self, path: Path) -> bytes:
        if self.fail:
            raise OSError(errno.EIO, "Input/output error (injected into read)")
        raw = super().read(path)
        return raw[:-1] + bytes([raw[-1] ^ 0xFF]) if self.garble else raw


def compact(core: BrokerCore, log: DurableLog) -> None:
    """One compaction as the broker's loop runs it: rotate, freeze, snapshot on the thread,
    then finish (delete what is older than the fallback generation, or log a failure)."""
    assert log.start_compaction(core.frozen_view(log.segment + 1, time.monotonic(), time.time()))
    core.finish_freezes()
    wait_until(lambda: (log.finish_compaction(), not log.compacting)[1], 10,
               message="the compaction to end")


def numbered(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if p.name.startswith(("seg-", "snap-")))


def _fill(core: BrokerCore, start: int, n: int) -> None:
    for i in range(start, start + n):
        write(core, f"k{i}", b'"%d"' % i, request_no=i + 1)


def test_compaction_keeps_the_previous_generation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    core, log = open_core(data, compact_bytes=1 << 30)
    try:
        _fill(core, 0, 5)
        compact(core, log)  # the first: segment 1 (from nothing) is the fallback
        assert numbered(data) == ["seg-00000001.log", "seg-00000002.log", "snap-00000002.snap"]
        _fill(core, 5, 5)
        compact(core, log)
        _fill(core, 10, 5)
        compact(core, log)  # snap-3 and its segments are the fallback now
        assert numbered(data) == ["seg-00000003.log", "seg-00000004.log",
                                  "snap-00000003.snap", "snap-00000004.snap"]
    finally:
        log.close()


@pytest.mark.parametrize("how", ["garbled", "failed"])
def test_a_snapshot_that_does_not_read_back_keeps_the_old_files(tmp_path: Path,
                                                                 how: str) -> None:
    data = tmp_path / "data"
    ops = ReadbackOps()
    core, log = open_core(data, compact_bytes=1 << 30, ops=ops)
    try:
        _fill(core, 0, 5)
        compact(core, log)
        _fill(core, 5, 5)
        before = numbered(data)
        failures = log.compaction_failures
        ops.garble, ops.fail = how == "garbled", how == "failed"
        compact(core, log)
        assert log.compaction_failures == failures + 1
        # nothing deleted; the unverified snapshot is gone, so start-up never prefers it
        assert numbered(data) == sorted([*before, "seg-00000003.log"])
        ops.garble = ops.fail = False
        _fill(core, 10, 2)
        digest = core.namespaces["ns"].digest()
    finally:
        log.close()
    core2, log2 = open_core(data)
    try:
        assert core2.namespaces["ns"].digest() == digest
    finally:
        log2.close()


def test_an_unreadable_newest_snapshot_falls_back_or_refuses_naming_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    core, log = open_core(data, compact_bytes=1 << 30)
    try:
        for k in range(3):
            _fill(core, 5 * k, 5)
            compact(core, log)
        _fill(core, 15, 2)
        digest = core.namespaces["ns"].digest()
    finally:
        log.close()
    newest = snap_path(data, 4)
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    core2, log2 = open_core(data)  # falls back to snap-3 and segments 3, 4
    log2.close()
    assert core2.namespaces["ns"].digest() == digest
    assert log2.base_snapshot == 3  # the next compaction keeps the good one, not the bad
    # without the older generation (as a directory from before it was kept) start-up refuses
    # naming the snapshot, and so does repair: only a backup helps
    spare = tmp_path / "spare"
    shutil.copytree(data, spare)
    snap_path(data, 3).unlink()
    seg_path(data, 3).unlink()
    with pytest.raises(CorruptLog, match=str(newest)) as refused:
        open_core(data)
    assert "backup" in str(refused.value)
    with pytest.raises(CorruptLog, match="backup"):
        repair(data)
    # with it, repair moves the bad snapshot aside and loses nothing
    shutil.rmtree(data)
    shutil.copytree(spare, data)
    said = repair(data)
    assert any(f"{newest}.bad" in line for line in said), said
    assert not any("new epoch" in line for line in said)
    assert not newest.exists()
    core3, log3 = open_core(data)
    log3.close()
    assert core3.namespaces["ns"].digest() == digest


def test_a_snapshot_whose_rows_are_misframed_is_caught_by_the_read_back(tmp_path: Path) -> None:
    """The rows are framed by hand (an array header around slices, ``core._encoded_rows``): a
    wrong count passes the checksum (computed over the same bytes) but not the read-back."""
    import msgspec

    from broker.records import NamespaceFile, SnapEntryFile, SnapshotFile

    rows = [SnapEntryFile(f"k{i}", b'"v"', 1, 1.0, 1.0, None) for i in range(2)]
    good = msgspec.msgpack.encode(rows)
    bad = msgspec.Raw(bytes([0x93]) + good[1:])  # says 3 rows, holds 2
    view = SnapshotFile("e" * 16, 2, 1.0, [NamespaceFile("ns", 0, 2, bad)], [])  # type: ignore[arg-type]
    (tmp_path / "d").mkdir()
    with pytest.raises(CorruptLog, match="does not decode"):
        write_snapshot(tmp_path / "d", view)
    assert not snap_path(tmp_path / "d", 2).exists()  # never left for start-up to prefer
    ok = SnapshotFile("e" * 16, 2, 1.0, [NamespaceFile("ns", 0, 2, msgspec.Raw(good))], [])  # type: ignore[arg-type]
    assert write_snapshot(tmp_path / "d", ok) == snap_path(tmp_path / "d", 2)
