"""The durable log: append-only segments, atomic snapshots, compaction and crash recovery.

Owns the files under ``data_dir`` (format: docs/persistence.md):
- ``seg-NNNNNNNN.log``: a 32-byte header (magic, epoch, segment number) then records
  ``u32 length | u32 crc32(payload) | payload`` (little-endian; payload = msgpack LogRecord);
- ``snap-NNNNNNNN.snap``: the whole state as of the start of segment NNNNNNNN, written to a
  temp file, fsynced, renamed, the directory fsynced, then read back and decoded.

Rules: an event is acknowledged or published only after ``flush()`` returned (under
``fsync=always`` that includes the fsync; all writes of one loop turn share it: group commit).
A failed flush truncates the segment back to where the turn began and raises StorageError, so
the caller can roll the turn back; nothing acknowledged before is touched -- or, when even that
truncation fails, LogInDoubt: the turn is in doubt until a retried truncation succeeds. Old
segments are deleted only after the snapshot that covers them is durable and read back, and
one older generation (snapshot and segments) is kept as a fallback.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from broker.errors import StorageError
from broker.log import LogInDoubt, MemoryLog
from broker.protocol import Event
from broker.records import BatchRecord, LogRecord, NamespaceRecord, SnapshotFile, SnapshotOutline

if TYPE_CHECKING:
    from broker.core import BrokerCore
    from broker.recovery import RecoveryReport

logger = logging.getLogger("sharedmem.broker.durable")

SEG_MAGIC = b"SHMLOG1\x00"
SNAP_MAGIC = b"SHMSNAP1"
SEG_HEADER = struct.Struct("<8s16sQ")  # magic, epoch (16 ascii hex), segment number
REC_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
SNAP_HEADER = struct.Struct("<8sQI")  # magic, payload length, crc32(payload)
MAX_RECORD = 256 * 1024 * 1024
FSYNC_POLICIES = ("always", "everysec", "no")
SEG_RE = re.compile(r"seg-(\d{8})\.log")
SNAP_RE = re.compile(r"snap-(\d{8})\.snap")


LOCK_FILE = "LOCK"


class FileOps:
    """Every file operation the running log makes (append, fsync, rotation, compaction), in one
    place, so that a test can wrap it and make any one of them fail (ENOSPC, EIO, a vanished
    directory) against real files. Start-up (recovery, the lock) does not go through it."""

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def stat(self, path: Path) -> os.stat_result:
        return os.stat(path)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def read(self, path: Path) -> bytes:
        """A whole file (a snapshot read back to verify it)."""
        return Path(path).read_bytes()


class DataDirLocked(StorageError):
    """Raised when another process holds the data directory's lock (a second broker, or
    ``repair`` while a broker runs): two writers of one log would hand out the same seqs."""

    kind = "StorageError"

    def __init__(self, data_dir: Path, holder: str) -> None:
        super().__init__(
            f"data directory {data_dir} is in use by another process (pid {holder or 'unknown'}, "
            f"which holds {data_dir / LOCK_FILE}); stop it first, or give another --data-dir"
        )
        self.data_dir = data_dir
        self.holder = holder


def lock_data_dir(data_dir: Path) -> int:
    """Take the exclusive lock on ``data_dir`` (creating the directory if needed) and write our
    pid into the lock file; return the lock's fd, which holds it until closed.

    ``flock`` is released by the kernel when the process dies, however it dies, so a kill -9
    leaves nothing to clean up; the pid in the file is only there to name the holder.
    Raises DataDirLocked when another process holds it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DataDirLocked(data_dir, holder) from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


class CorruptLog(StorageError):
    """Raised at start-up when a record in the middle of the log fails its checksum."""

    kind = "StorageError"

    def __init__(self, path: Path, offset: int, reason: str, *,
                 advice: str | None = None) -> None:
        what = "corrupt snapshot" if SNAP_RE.fullmatch(path.name) else "corrupt log record"
        advice = advice or (
            f"run 'python -m broker repair --data-dir {path.parent}' to truncate at the last "
            "good record (this discards every record after it)")
        super().__init__(f"{what} in {path} at offset {offset}: {reason}; {advice}")
        self.path = path
        self.offset = offset
        self.reason = reason


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(LogRecord)
_snap_decoder = msgspec.msgpack.Decoder(SnapshotFile)
_outline_decoder = msgspec.msgpack.Decoder(SnapshotOutline)


def seg_path(data_dir: Path, n: int) -> Path:
    return data_dir / f"seg-{n:08d}.log"


def snap_path(data_dir: Path, n: int) -> Path:
    return data_dir / f"snap-{n:08d}.snap"


def list_numbered(data_dir: Path, pattern: re.Pattern[str]) -> list[int]:
    out = []
    for p in data_dir.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def fsync_dir(path: Path, ops: FileOps | None = None) -> None:
    """Make a rename or unlink in ``path`` durable."""
    ops = ops or FileOps()
    fd = ops.open(path, os.O_RDONLY)
    try:
        ops.fsync(fd)
    finally:
        ops.close(fd)


def encode_record(record: LogRecord) -> bytes:
    payload = _record_encoder.encode(record)
    return REC_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass
class ScanResult:
    """Records read from one segment, and where (if anywhere) reading stopped early."""

    records: list[LogRecord] = field(default_factory=list)
    good_end: int = SEG_HEADER.size  # offset just after the last good record
    size: int = 0
    error: str | None = None  # why reading stopped before the end of the file
    error_offset: int = 0
    torn: bool = False  # the bad part is an incomplete final record (a crash mid-append)


def read_segment_header(path: Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        raw = f.read(SEG_HEADER.size)
    if len(raw) < SEG_HEADER.size:
        raise CorruptLog(path, 0, "segment header is truncated")
    magic, epoch, n = SEG_HEADER.unpack(raw)
    if magic != SEG_MAGIC:
        raise CorruptLog(path, 0, "not a sharedmem log segment (bad magic)")
    return epoch.decode("ascii"), n


def scan_segment(path: Path) -> ScanResult:
    """Read every record; classify a bad tail as torn (incomplete last record) or corrupt."""
    data = path.read_bytes()
    res = ScanResult(size=len(data))
    off = SEG_HEADER.size
    n = len(data)
    while off < n:
        if n - off < REC_HEADER.size:
            res.error, res.error_offset, res.torn = "incomplete record header", off, True
            break
        length, crc = REC_HEADER.unpack_from(data, off)
        end = off + REC_HEADER.size + length
        if length > MAX_RECORD:
            # A garbage length: torn only if nothing after it could be a record anyway.
            res.error, res.error_offset = f"record length {length} is impossible", off
            res.torn = False
            break
        if end > n:
            res.error, res.error_offset, res.torn = (
                f"record of {length} bytes runs past the end of the file", off, True)
            break
        payload = data[off + REC_HEADER.size:end]
        if zlib.crc32(payload) != crc:
            res.error, res.error_offset = "checksum mismatch", off
            # The last record, partly written (e.g. zero-filled by the file system): torn.
            res.torn = end == n
            break
        try:
            res.records.append(_record_decoder.decode(payload))
        except msgspec.DecodeError as exc:
            res.error, res.error_offset, res.torn = f"undecodable record: {exc}", off, False
            break
        off = end
        res.good_end = off
    return res


class DurableLog(MemoryLog):
    """MemoryLog (for Fetch) plus segment files, group commit and snapshots."""

    def __init__(self, data_dir: str | os.PathLike[str], *, fsync: str = "always",
                 retention: int = 100_000, compact_bytes: int = 64 * 1024 * 1024,
                 ops: FileOps | None = None) -> None:
        super().__init__(retention)
        self.ops = ops or FileOps()
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.data_dir = Path(data_dir)
        self.fsync = fsync
        self.compact_bytes = compact_bytes
        self._buf = bytearray()
        self._turn_events: dict[str, int] = {}
        self._fd: int | None = None
        self._segment = 0
        self._seg_file: Path | None = None  # seg_path of the open segment, made once
        self._seg_size = 0
        self._last_fsync = time.monotonic()
        self._unsynced = False
        self.epoch: str | None = None
        self.fsync_seconds_total = 0.0
        self.fsync_count = 0
        self._compaction: threading.Thread | None = None
        self._compaction_error: BaseException | None = None
        self._compaction_done_segment: int | None = None
        self.compactions = 0
        self._report: RecoveryReport | None = None
        self._lock_fd: int | None = None
        self._truncate_to: int | None = None  # a failed turn's truncation, still owed
        # The snapshot the state was last known good from (the one recovery loaded, the last
        # one written and read back, an Install's); None: the segments start from nothing.
        # A compaction keeps it and its segments as the fallback generation.
        self.base_snapshot: int | None = None
        self.compaction_failures = 0  # rotations, snapshots or clean-ups that failed
        self.compaction_retry = 5.0  # seconds between attempts after a failed rotation
        self._compaction_retry_at = 0.0

    def lock(self) -> None:
        """Take the data directory's exclusive lock (idempotent); held until ``close()``.

        Must come before anything in the directory is read or written. Raises DataDirLocked."""
        if self._lock_fd is None:
            self._lock_fd = lock_data_dir(self.data_dir)

    # ------------------------------------------------------------------ opening

    def open_segment(self, n: int, epoch: str, size: int | None = None) -> None:
        """Append to segment ``n`` (creating it, header and all, if new). On failure the
        segment open before stays the one appended to."""
        path = seg_path(self.data_dir, n)
        if not os.path.exists(path):
            self._create_segment(path, n, epoch)
        fd = self.ops.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            seg_size = self.ops.fstat(fd).st_size if size is None else size
        except OSError:
            self.ops.close(fd)
            raise
        if self._fd is not None:
            try:
                self.ops.close(self._fd)
            except OSError as exc:  # fsynced before any rotation: nothing is lost with it
                logger.warning("closing segment %d failed: %s", self._segment, exc)
        self._fd = fd
        self._segment = n
        self._seg_file = path
        self._seg_size = seg_size
        self.epoch = epoch

    def _create_segment(self, path: Path, n: int, epoch: str) -> None:
        """Atomically: header into a temp file, fsync, rename, fsync the directory. A crash or
        an error at any step leaves either no segment ``n`` or a complete, empty one (a stray
        ``.tmp`` is removed at start-up)."""
        ops = self.ops
        tmp = path.with_name(path.name + ".tmp")
        header = SEG_HEADER.pack(SEG_MAGIC, epoch.encode("ascii"), n)
        write_atomically(ops, self.data_dir, path, tmp, header)

    @property
    def segment(self) -> int:
        return self._segment

    # ------------------------------------------------------------------ appending

    def record_namespace(self, namespace: str, max_keys: int) -> None:
        self._buf += encode_record(NamespaceRecord(namespace, max_keys))

    def append(self, namespace: str, events: Sequence[Event], now: float, *, wall: float = 0.0,
               client: tuple[bytes, int] | None = None, changed: bool = True) -> None:
        super().append(namespace, events, now)
        self._turn_events[namespace] = self._turn_events.get(namespace, 0) + len(events)
        cid, no = client if client is not None else (None, 0)
        self._buf += encode_record(BatchRecord(namespace, wall or time.time(), list(events),
                                               cid, no, changed))

    def flush(self) -> None:
        """Write the turn's records (and fsync under ``always``). On failure the segment is cut
        back to where the turn began and StorageError raised, so the turn can be rolled back
        and refused -- or, when that cut fails too, LogInDoubt: the turn's bytes may be in the
        file, and it must be neither acknowledged nor refused until ``in_doubt`` is False."""
        if not self._buf:
            self._turn_events.clear()
            return
        assert self._fd is not None
        data = bytes(self._buf)
        start = self._seg_size
        wrote = False
        try:
            # An earlier failed turn's bytes must go before anything is appended after them.
            self._cut_owed()
            wrote = True
            written = 0
            view = memoryview(data)
            while written < len(data):
                written += self.ops.write(self._fd, view[written:])
            if self.fsync == "always":
                self._do_fsync()
            else:
                self._unsynced = True
                if self.fsync == "everysec":
                    self.tick()
            # Last, just before the turn is acknowledged: is the file still the log?
            self._check_segment()
        except OSError as exc:
            cut = self._abort_turn(start)
            if wrote and not cut:
                raise LogInDoubt(
                    f"write to the log failed ({exc.strerror or exc}) and its bytes could not "
                    "be cut away; the write is in doubt until they are") from exc
            raise StorageError(f"write to the log failed ({exc.strerror or exc}); the write "
                               "was refused and nothing changed") from exc
        self._seg_size = start + len(data)
        self._buf.clear()
        self._turn_events.clear()

    @property
    def in_doubt(self) -> bool:
        """True while a failed turn's bytes may still be in the segment (the cut is owed)."""
        return self._truncate_to is not None

    def _cut(self, size: int) -> None:
        """Cut the segment back to ``size`` durably: ftruncate, then fsync (a cut that a machine
        crash could undo would bring a refused turn back). Raises OSError."""
        assert self._fd is not None
        self.ops.ftruncate(self._fd, size)
        self.ops.fsync(self._fd)

    def _cut_owed(self) -> None:
        """Make the cut an earlier failed turn still owes (nothing if none). Raises OSError
        while it fails; once it succeeds the turn in doubt is refused for good."""
        if self._truncate_to is None:
            return
        self._cut(self._truncate_to)
        logger.warning("cut %s back to %d at last: the turn that was in doubt is refused",
                       seg_path(self.data_dir, self._segment), self._truncate_to)
        self._truncate_to = None

    def _check_segment(self) -> None:
        """Raise OSError when the open segment is no longer the file at its path: deleted (its
        directory removed, say) or replaced. Writing on would acknowledge into a file that no
        restart will ever read."""
        assert self._fd is not None and self._seg_file is not None
        # The path is kept from open_segment: no pathlib join on every acknowledged flush.
        path = self._seg_file
        mine = self.ops.fstat(self._fd)
        try:
            there = self.ops.stat(path)
        except FileNotFoundError:
            there = None
        if mine.st_nlink == 0 or there is None or \
                (there.st_ino, there.st_dev) != (mine.st_ino, mine.st_dev):
            raise OSError(errno.ENOENT, f"{path} was removed or replaced while the broker "
                                        "ran (is the data directory gone?); restart the broker")

    def _do_fsync(self) -> None:
        assert self._fd is not None
        t = time.perf_counter()
        self.ops.fsync(self._fd)
        self.fsync_seconds_total += time.perf_counter() - t
        self.fsync_count += 1
        self._last_fsync = time.monotonic()
        self._unsynced = False

    def tick(self) -> None:
        """Retry an owed cut (a turn in doubt), then, under ``everysec``, fsync once a second
        when something was written since."""
        if self._truncate_to is not None and self._fd is not None:
            try:
                self._cut_owed()
            except OSError as exc:
                logger.debug("cutting %s back to %d failed again: %s",
                             seg_path(self.data_dir, self._segment), self._truncate_to, exc)
        if self.fsync == "everysec" and self._unsynced and \
                time.monotonic() - self._last_fsync >= 1.0:
            try:
                self._do_fsync()
            except OSError as exc:
                logger.error("background fsync failed: %s", exc)

    def _abort_turn(self, start: int) -> bool:
        """Forget the failed turn and cut the segment back to ``start``; False when the cut
        failed (it is then owed: retried every tick and before any append or rotation)."""
        self._buf.clear()
        for ns, count in self._turn_events.items():
            self.drop_newest(ns, count)
        self._turn_events.clear()
        try:
            self._cut(start)
        except OSError as exc:
            if self._truncate_to is None:
                logger.error("could not cut %s back to %d (%s): the failed turn is in doubt "
                             "until a retry succeeds", seg_path(self.data_dir, self._segment),
                             start, exc)
            self._truncate_to = start
            return False
        self._truncate_to = None
        return True

    def close(self) -> None:
        """Close the segment (``close_segment``), then release the directory's lock."""
        try:
            self.close_segment()
        finally:
            self.unlock()

    def close_segment(self) -> None:
        """Wait for a running compaction, fsync what is unsynced and close the segment; the
        lock stays held (the clean-shutdown marker is written after this, before ``unlock``).
        Raises OSError when the final fsync fails (the fd is closed anyway)."""
        if self._compaction is not None:
            self._compaction.join()
        if self._fd is not None:
            try:
                try:
                    self._cut_owed()
                except OSError as exc:  # the next start replays them: its dedup says applied
                    logger.error("closing with a turn in doubt: %s could not be cut back to "
                                 "%d (%s)", seg_path(self.data_dir, self._segment),
                                 self._truncate_to, exc)
                if self._unsynced:
                    self.ops.fsync(self._fd)
            finally:
                self.ops.close(self._fd)
                self._fd = None

    def unlock(self) -> None:
        """Release the directory's lock (the caller writes nothing in it afterwards)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ compaction

    def wants_compaction(self) -> bool:
        return self._seg_size >= self.compact_bytes and self._compaction is None and \
            time.monotonic() >= self._compaction_retry_at

    @property
    def compacting(self) -> bool:
        return self._compaction is not None

    def start_compaction(self, build: Callable[[], SnapshotFile]) -> bool:
        """Rotate to a new segment now; on a thread, ``build()`` the snapshot of the state as of
        this moment and write it. Returns False (logged; the current segment stays the one
        appended to, and the rotation is retried ``compaction_retry`` seconds later) when the
        rotation fails: a full disk or a vanished directory must not stop the loop.

        ``build`` must read only a frozen view (entries are immutable; the dicts it reads are
        copies made before this call), and its ``segment`` must be ``self.segment + 1``.
        """
        assert self.epoch is not None and self._fd is not None
        try:
            self._cut_owed()  # owed to this segment, not to the next one
            self._do_fsync()
            self.open_segment(self._segment + 1, self.epoch)
        except OSError as exc:
            self._compaction_retry_at = time.monotonic() + self.compaction_retry
            self.compaction_failures += 1
            logger.error("could not start segment %d (%s); appending to segment %d meanwhile, "
                      "retrying in %.0f s", self._segment + 1, exc.strerror or exc,
                      self._segment, self.compaction_retry)
            return False
        segment = self._segment
        ops = self.ops

        def work() -> None:
            try:
                view = build()
                assert view.segment == segment
                write_snapshot(self.data_dir, view, ops)
                self._compaction_done_segment = segment
            except BaseException as exc:  # noqa: BLE001 - reported by finish_compaction
                self._compaction_error = exc

        self._compaction = threading.Thread(target=work, name="sharedmem-compaction",
                                            daemon=True)
        self._compaction.start()
        return True

    def finish_compaction(self) -> None:
        """If the snapshot thread is done (its snapshot written *and read back*): delete what
        is older than the fallback generation, or log its failure.

        Two generations stay: the new snapshot with its segment, and the previous snapshot
        (``base_snapshot``) with every segment from its number on, so that start-up can fall
        back to it should the newest snapshot ever be unreadable. Only files older than that
        go. Never raises: a failure leaves old files behind, which recovery ignores (it starts
        at the newest readable snapshot) and the next compaction deletes."""
        t = self._compaction
        if t is None or t.is_alive():
            return
        self._compaction = None
        if self._compaction_error is not None:
            logger.error("compaction failed, old segments kept: %s", self._compaction_error)
            self._compaction_error = None
            self.compaction_failures += 1
            return
        n = self._compaction_done_segment
        assert n is not None
        keep = self.base_snapshot  # the fallback: files from its number on stay
        self.base_snapshot = n
        try:
            if keep is not None:
                names = self.ops.listdir(self.data_dir)
                for name in sorted(names):  # segments first, oldest first: never a gap
                    m = SEG_RE.fullmatch(name) or SNAP_RE.fullmatch(name)
                    if m and int(m.group(1)) < keep:
                        try:
                            self.ops.unlink(self.data_dir / name)
                        except FileNotFoundError:
                            pass
                fsync_dir(self.data_dir, self.ops)
        except OSError as exc:
            self.compaction_failures += 1
            logger.error("snapshot %s is durable, but removing older files failed (%s); the next "
                      "compaction removes them", snap_path(self.data_dir, n), exc)
            return
        self.compactions += 1
        logger.info("compaction done: snapshot %s (read back and verified); kept as the "
                    "fallback: %s and the segments after it", snap_path(self.data_dir, n),
                    "every older segment" if keep is None else snap_path(self.data_dir, keep))

    # ------------------------------------------------------------------ the Log protocol's hooks

    def recover(self, core: BrokerCore) -> RecoveryReport:
        """Take the directory's lock and fill ``core`` from it, writing nothing there yet
        (``open_for_writing`` does, once the broker's sockets are bound)."""
        from broker.recovery import load

        self._report = load(core, self)
        return self._report

    def open_for_writing(self) -> None:
        from broker.recovery import open_for_writing

        assert self._report is not None, "recover() first"
        open_for_writing(self, self._report)

    def shut_down(self, *, clean: bool) -> None:
        """Close the segment, mark the directory clean only if everything was flushed, and
        release the lock. Each step may fail (a vanished directory, a full disk): logged, and
        the next start recovers as after a crash."""
        from broker.recovery import mark_clean

        try:
            self.close_segment()
            if clean:
                mark_clean(self)
        except OSError as exc:
            logger.error("could not close %s cleanly (%s); the next start recovers it as after a "
                      "crash", self.data_dir, exc)
        finally:
            self.unlock()

    def stats(self) -> dict[str, int]:
        return {
            "fsyncs": self.fsync_count,
            "fsync_us_total": int(self.fsync_seconds_total * 1e6),
            "fsync_us_avg": int(self.fsync_seconds_total * 1e6 / self.fsync_count)
            if self.fsync_count else 0,
            "compactions": self.compactions,
        }


def _unlink_quietly(ops: FileOps, path: Path) -> None:
    try:
        ops.unlink(path)
    except OSError:
        pass


def write_atomically(ops: FileOps, data_dir: Path, final: Path, tmp: Path, data: bytes) -> None:
    """``data`` at ``final`` or nothing there: write ``tmp`` in full, fsync it, rename it over
    ``final``, fsync the directory. On an OSError the temp file is removed and it re-raises."""
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            view = memoryview(data)
            written = 0
            while written < len(data):
                written += ops.write(fd, view[written:])
            ops.fsync(fd)
        finally:
            ops.close(fd)
        ops.replace(tmp, final)
    except OSError:
        _unlink_quietly(ops, tmp)
        raise
    fsync_dir(data_dir, ops)


def write_snapshot(data_dir: Path, view: SnapshotFile, ops: FileOps | None = None) -> Path:
    """Atomically write a snapshot (temp file, fsync, rename, fsync the directory), then read
    it back and decode it as start-up would (``verify_snapshot``): nothing older may be
    deleted on the strength of a snapshot that was never read. Raises OSError or CorruptLog
    (the unreadable file is then removed, so start-up keeps using the older one)."""
    ops = ops or FileOps()
    payload = msgspec.msgpack.encode(view)
    final = snap_path(data_dir, view.segment)
    tmp = final.with_suffix(".snap.tmp")
    data = SNAP_HEADER.pack(SNAP_MAGIC, len(payload), zlib.crc32(payload)) + payload
    write_atomically(ops, data_dir, final, tmp, data)
    try:
        verify_snapshot(final, data, view.segment, ops)
    except (OSError, CorruptLog):
        _unlink_quietly(ops, final)
        raise
    return final


def verify_snapshot(path: Path, written: bytes, segment: int, ops: FileOps) -> None:
    """Read ``path`` back: it must be the bytes written, its header and checksum must hold,
    and its msgpack must decode as a snapshot -- every field typed, except that each
    namespace's rows are only walked (their framing and count), not built into structs.

    Why not a full decode: it is one C call that holds the GIL, ~0.45 s at 1M keys, and this
    runs on the compaction thread beside the loop. The whole read-back takes ~80 ms at 1M keys
    (74 MB), most of it in the read and the checksum, which release the GIL; the outline walk
    holds it ~17 ms. The rows are msgspec's own encoding of each entry; the
    part built by hand (the array header around slices, ``core._encoded_rows``) is what the
    walk checks. What the read-back cannot see (it may come from the page cache): the medium
    going bad later -- for that the older generation is kept (docs/persistence.md).
    Raises CorruptLog (or OSError when the read fails)."""
    raw = ops.read(path)
    if raw != written:
        raise CorruptLog(path, 0, f"snapshot read back differs from what was written "
                                  f"({len(raw)} bytes read, {len(written)} written)")
    payload = _snapshot_payload(path, raw)
    try:
        outline = _outline_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise CorruptLog(path, 0, f"snapshot does not decode ({exc})") from None
    if outline.segment != segment:
        raise CorruptLog(path, 0, f"snapshot names segment {outline.segment}, not {segment}")


def read_snapshot(path: Path) -> SnapshotFile:
    """Read and decode a snapshot; CorruptLog when its header, checksum or encoding is bad."""
    return parse_snapshot(path, path.read_bytes())


def _snapshot_payload(path: Path, data: bytes) -> memoryview:
    """The payload of a snapshot file's bytes, once its header and checksum hold."""
    if len(data) < SNAP_HEADER.size:
        raise CorruptLog(path, 0, "snapshot header is truncated")
    magic, length, crc = SNAP_HEADER.unpack_from(data)
    payload = memoryview(data)[SNAP_HEADER.size:]
    if magic != SNAP_MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
        raise CorruptLog(path, 0, "snapshot fails its checksum")
    return payload


def parse_snapshot(path: Path, data: bytes) -> SnapshotFile:
    """Decode the bytes of the snapshot at ``path``, as start-up does (``read_snapshot``)."""
    payload = _snapshot_payload(path, data)
    try:
        return _snap_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise CorruptLog(path, 0, f"snapshot does not decode ({exc})") from None
