"""Start-up from the data directory: newest valid snapshot, then the log replayed on top.

Owns the rules for what a crash may leave behind:
- a torn tail (an incomplete or checksum-failing *last* record of the *last* segment) can hold
  only unacknowledged bytes: it is truncated, and what was dropped is logged;
- anything else that fails its checksum stops start-up with ``CorruptLog`` naming the file and
  offset; ``repair`` truncates there on an operator's say-so.

The epoch survives restarts, so connected nodes continue from their seq. Exception: under
``fsync=everysec|no`` a crash (no clean-shutdown marker) may have lost events that nodes
already applied, so a new epoch is started and nodes resync instead of mixing histories.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from broker.core import BrokerCore, new_epoch
from broker.durable import (
    SEG_HEADER,
    SEG_MAGIC,
    SEG_RE,
    SNAP_RE,
    BatchRecord,
    CorruptLog,
    DurableLog,
    NamespaceRecord,
    SnapshotFile,
    fsync_dir,
    list_numbered,
    lock_data_dir,
    read_segment_header,
    read_snapshot,
    scan_segment,
    seg_path,
    snap_path,
)
from broker.protocol import WriteOk
from broker.state import NamespaceState, pack_entry

logger = logging.getLogger("sharedmem.broker.recovery")

EPOCH_FILE = "EPOCH"
CLEAN_FILE = "CLEAN"
POLICY_FILE = "FSYNC"  # the fsync policy the log was last written under
TERM_FILE = "TERM"  # broker groups: the highest term promised (acks nothing below it)


@dataclass
class RecoveryReport:
    """What start-up found, and what ``open_for_writing`` still has to do on disk."""

    epoch: str
    snapshot: Path | None
    segments: int
    records: int
    torn_bytes: int
    new_epoch: bool
    last_segment: int = 1  # the segment appends go to
    torn_path: Path | None = None  # truncate this file at ``torn_at`` (a torn tail)
    torn_at: int = 0
    headerless: Path | None = None  # an empty or header-less last segment, to remove


def write_small_file(path: Path, text: str) -> None:
    """Replace a small file atomically and durably (temp file, fsync, rename)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_snapshot(core: BrokerCore, snap: SnapshotFile, epoch: str, mono: float,
                  wall: float) -> None:
    """Fill ``core``'s namespaces and dedup table from a snapshot (TTLs from its wall clock);
    the remembered replies name ``epoch``, the one the writes live in now."""
    for ns in snap.namespaces:
        # Snapshot rows (broker/state.py): the TTL left at ``wall`` in the expiry slot, which
        # from_snapshot turns into a deadline; a negative one is already due.
        keys = [e.key for e in ns.entries]
        rows = [pack_entry(e.value, e.version, e.created_at, e.modified_at,
                           None if e.expires_at is None else e.expires_at - wall)
                for e in ns.entries]
        core.namespaces[ns.name] = NamespaceState.from_snapshot(ns.name, ns.max_keys, ns.seq,
                                                                keys, rows, mono)
    for d in snap.dedup:
        # The epoch the writes live in now (a repair may have started a new one).
        core.dedup.remember(d.client, d.request_no, WriteOk(epoch, d.seq, d.changed))


def apply_record(core: BrokerCore, rec: object, epoch: str, mono: float, wall: float, *,
                 fetch_log: bool = True) -> None:
    """Apply one log record to ``core``: the namespace, its state, the dedup table's reply,
    and (``fetch_log``) the events kept for Fetch. Recovery and a group standby both use it,
    so a standby's dedup table and Fetch log are what a restart would rebuild."""
    if type(rec) is NamespaceRecord:
        # The last record of a namespace holds its limit (set_max_keys appends another).
        state = core.namespaces.get(rec.namespace)
        if state is None:
            core.namespaces[rec.namespace] = NamespaceState(rec.namespace, rec.max_keys)
        else:
            state.max_keys = rec.max_keys
        return
    assert type(rec) is BatchRecord
    state = core.namespaces.get(rec.namespace)
    if state is None:
        state = core.namespaces[rec.namespace] = NamespaceState(rec.namespace, 0)
    events = [e for e in rec.events if e.seq > state.seq]
    if not events:
        return
    # The event's ttl counted from rec.wall; as seen from now that is ``rec.wall - wall`` ago.
    then = mono + (rec.wall - wall)
    state.apply_batch(events, then)
    if fetch_log:
        core.log.replay(rec.namespace, events, then)  # for Fetch; not re-written
    if rec.client is not None:
        core.dedup.remember(rec.client, rec.request_no,
                            WriteOk(epoch, rec.events[-1].seq, rec.changed,
                                    count=len(rec.events)))


def recover(core: BrokerCore, durable: DurableLog) -> RecoveryReport:
    """Fill ``core`` from ``durable.data_dir`` and open the log for appending (``load`` then
    ``open_for_writing``)."""
    report = load(core, durable)
    open_for_writing(durable, report)
    return report


def load(core: BrokerCore, durable: DurableLog) -> RecoveryReport:
    """Take the directory's lock, then fill ``core`` from it, writing nothing there.

    The broker binds its sockets between this and ``open_for_writing``: a broker that cannot
    start leaves the directory as it found it. Raises DataDirLocked (another process holds
    the directory) or CorruptLog (start-up needs ``repair``)."""
    durable.lock()
    data_dir = durable.data_dir
    mono, wall = time.monotonic(), time.time()
    clean = (data_dir / CLEAN_FILE).exists()
    policy_path = data_dir / POLICY_FILE
    # What matters is the policy the existing log was written under, not today's.
    written_under = policy_path.read_text().strip() if policy_path.exists() else "always"
    epoch_path = data_dir / EPOCH_FILE
    epoch = epoch_path.read_text().strip() if epoch_path.exists() else None

    segments = list_numbered(data_dir, SEG_RE)
    snapshot, unreadable = choose_snapshot(data_dir, segments)
    snapshot_path = snap_path(data_dir, snapshot.segment) if snapshot is not None else None
    if unreadable:
        logger.error("snapshot %s is unreadable (%s); falling back to %s and the segments "
                     "after it (nothing is lost: compaction keeps that generation for this). "
                     "'python -m broker repair --data-dir %s' moves the bad file aside",
                     unreadable[0].path, unreadable[0].reason,
                     snapshot_path or "segment 1, from an empty state", data_dir)
    start = snapshot.segment if snapshot is not None else (segments[0] if segments else 1)
    replay = [n for n in segments if n >= start]
    for a, b in zip(replay, replay[1:], strict=False):
        if b != a + 1:
            raise CorruptLog(seg_path(data_dir, a + 1), 0, "segment is missing")
    if snapshot is not None and replay and replay[0] != start:
        raise CorruptLog(seg_path(data_dir, start), 0, "segment after the snapshot is missing")
    durable.base_snapshot = snapshot.segment if snapshot is not None else None
    last = replay[-1] if replay else start
    headerless = None
    if replay and _is_headerless(seg_path(data_dir, replay[-1])):
        # Created but never given its header (a crash, or a full disk, mid-rotation): no
        # record can be in it, since records are written only after the header is durable.
        headerless = seg_path(data_dir, replay.pop())
        logger.warning("%s has no complete header: it holds no record and will be replaced",
                    headerless)
    if snapshot is not None:
        epoch = epoch or snapshot.epoch
    elif replay:
        epoch = epoch or read_segment_header(seg_path(data_dir, replay[0]))[0]
    fresh = epoch is None
    epoch = epoch or new_epoch()
    core.epoch = epoch
    if snapshot is not None:
        load_snapshot(core, snapshot, epoch, mono, wall)

    records = 0
    torn = 0
    torn_path = None
    torn_at = 0
    for i, n in enumerate(replay):
        path = seg_path(data_dir, n)
        read_segment_header(path)
        res = scan_segment(path)
        for rec in res.records:
            apply_record(core, rec, epoch, mono, wall)
        records += len(res.records)
        if res.error is not None:
            if i == len(replay) - 1 and res.torn:
                torn = res.size - res.good_end
                logger.warning("%s: dropping a torn tail of %d bytes at offset %d (%s); only "
                            "unacknowledged writes can be there", path, torn, res.good_end,
                            res.error)
                torn_path, torn_at = path, res.good_end
            else:
                raise CorruptLog(path, res.error_offset, res.error)

    changed_epoch = False
    if not fresh and not clean and written_under != "always" and (replay or snapshot):
        # Published events may not have reached the disk: never let nodes mix histories.
        old = epoch
        epoch = new_epoch()
        core.epoch = epoch
        changed_epoch = True
        # Remembered replies name the epoch their writes now live in.
        core.dedup.rename_epoch(epoch)
        logger.warning("unclean shutdown under fsync=%s: new epoch %s replaces %s; nodes will "
                    "resync", written_under, epoch, old)
    return RecoveryReport(epoch, snapshot_path, len(replay), records, torn,
                          changed_epoch or fresh, last, torn_path, torn_at, headerless)


def choose_snapshot(data_dir: Path, segments: list[int]
                    ) -> tuple[SnapshotFile | None, list[CorruptLog]]:
    """The newest readable snapshot (None: replay from segment 1), and why each newer one is
    unreadable (newest first).

    An unreadable snapshot may be passed over only for a generation that really holds the
    state: an older readable snapshot with every segment from its number on, or -- with no
    snapshot left -- segments that start at 1 (the first compaction keeps them). Anything else
    (say, a directory from before two generations were kept) would replay segments whose base
    state is gone: CorruptLog naming the unreadable snapshot, which only a backup can fix."""
    unreadable: list[CorruptLog] = []
    for n in reversed(list_numbered(data_dir, SNAP_RE)):
        try:
            snapshot = read_snapshot(snap_path(data_dir, n))
        except CorruptLog as exc:
            unreadable.append(exc)
            continue
        if unreadable:
            after = [s for s in segments if s >= n]
            if not after or after != list(range(n, n + len(after))):
                break  # that generation is incomplete: no fallback
        return snapshot, unreadable
    else:
        if not unreadable or (segments and segments[0] == 1 and
                              segments == list(range(1, len(segments) + 1))):
            return None, unreadable
    bad = unreadable[0]
    raise CorruptLog(bad.path, 0, bad.reason, advice=(
        "no older snapshot with all its segments is left to fall back on, so start-up (and "
        f"repair) cannot rebuild the state: restore {data_dir} from a backup"))


def open_for_writing(durable: DurableLog, report: RecoveryReport) -> None:
    """The writes start-up owes the directory, once the lock is held and the sockets are
    bound: drop temp files, the torn tail and a header-less last segment, record the epoch
    and the fsync policy, remove the clean-shutdown marker, and open the segment to append to.
    """
    data_dir = durable.data_dir
    for tmp in data_dir.glob("*.tmp"):
        tmp.unlink()
    if report.torn_path is not None:
        with open(report.torn_path, "r+b") as f:
            f.truncate(report.torn_at)
            f.flush()
            os.fsync(f.fileno())
    if report.headerless is not None:
        report.headerless.unlink()
        fsync_dir(data_dir)
    write_small_file(data_dir / EPOCH_FILE, report.epoch)
    write_small_file(data_dir / POLICY_FILE, durable.fsync)
    (data_dir / CLEAN_FILE).unlink(missing_ok=True)
    durable.open_segment(report.last_segment, report.epoch)


def _is_headerless(path: Path) -> bool:
    """Shorter than a segment header, or nothing but zero bytes (a file system may leave a
    file zero-filled after a crash mid-write)."""
    data = path.read_bytes()
    return len(data) < SEG_HEADER.size or not data.strip(b"\0")


def mark_clean(durable: DurableLog) -> None:
    """After a clean close: the next start may keep the epoch under any fsync policy."""
    write_small_file(durable.data_dir / CLEAN_FILE, "clean\n")


def repair(data_dir: Path) -> list[str]:
    """Make a directory start-up refuses startable again, and say what changed: move
    unreadable snapshots aside (to ``*.bad``) when an older generation holds the state,
    truncate the log at its first bad record and drop every later segment, fix a bad segment
    header, drop the segments after a gap (``_repair_locked``).

    Holds the directory's lock while it works: raises DataDirLocked while a broker runs, and
    CorruptLog when no readable snapshot generation is left (only a backup helps then)."""
    lock_fd = lock_data_dir(data_dir)
    try:
        return _repair_locked(data_dir)
    finally:
        os.close(lock_fd)


def _repair_locked(data_dir: Path) -> list[str]:
    """Every state start-up refuses, made startable:
    - an unreadable newest snapshot is renamed to ``snap-N.snap.bad`` (kept for a post-mortem;
      start-up ignores it), and the log is repaired from the older generation compaction
      kept (``choose_snapshot``; nothing is lost by this);
    - a segment whose header is bad or missing gets its header back (its records are
      checksummed on their own, so they are kept);
    - a bad record: the segment is cut at the last good record, every later segment removed;
    - a missing segment: every segment after the gap is removed.
    When anything that may have been acknowledged goes, a new epoch is written, so connected
    nodes resync from a snapshot instead of taking the new history's events for duplicates of
    the old one's."""
    said: list[str] = []
    segments = list_numbered(data_dir, SEG_RE)
    snapshot, unreadable = choose_snapshot(data_dir, segments)  # raises: no generation left
    for bad in unreadable:
        aside = bad.path.with_name(bad.path.name + ".bad")
        os.replace(bad.path, aside)
        said.append(f"renamed the unreadable snapshot {bad.path} to {aside} ({bad.reason}); "
                    "recovering from "
                    + (str(snap_path(data_dir, snapshot.segment)) if snapshot is not None
                       else "segment 1")
                    + " and the segments after it instead (nothing is lost)")
    start = snapshot.segment if snapshot is not None else (segments[0] if segments else 1)
    epoch_path = data_dir / EPOCH_FILE
    epoch = epoch_path.read_text().strip() if epoch_path.exists() else None
    cut_from: int | None = None
    lost = False
    expected = start
    for n in segments:
        if n < start:
            continue
        path = seg_path(data_dir, n)
        if cut_from is None and n != expected:
            said.append(f"segment {seg_path(data_dir, expected)} is missing: every later "
                        "segment goes")
            cut_from = n
        if cut_from is not None:
            lost = lost or path.stat().st_size > SEG_HEADER.size
            path.unlink()
            said.append(f"removed {path} (after the corruption)")
            continue
        expected = n + 1
        last = n == segments[-1]
        try:
            header_epoch = read_segment_header(path)[0]
            epoch = epoch or header_epoch
        except CorruptLog as exc:
            if last and _is_headerless(path):
                path.unlink()
                said.append(f"removed {path} (no complete header, so no records)")
                break
            epoch = epoch or new_epoch()
            _rewrite_header(path, n, epoch)
            said.append(f"rewrote the header of {path} ({exc})")
        res = scan_segment(path)
        if res.error is not None:
            with open(path, "r+b") as f:
                f.truncate(res.good_end)
                f.flush()
                os.fsync(f.fileno())
            said.append(f"truncated {path} at offset {res.good_end} ({res.error} at "
                        f"{res.error_offset}; {res.size - res.good_end} bytes dropped)")
            # A torn tail of the last segment holds only unacknowledged bytes.
            lost = lost or not (last and res.torn)
            cut_from = n
    if lost:
        fresh = new_epoch()
        write_small_file(epoch_path, fresh)
        said.append(f"new epoch {fresh} (was {epoch}): acknowledged writes were dropped, so "
                    "connected nodes will resync from a snapshot")
    if said:
        fsync_dir(data_dir)
    else:
        said.append("no corruption found; nothing changed")
    return said


def _rewrite_header(path: Path, n: int, epoch: str) -> None:
    """Put a good header on segment ``n``, keeping whatever follows the header's bytes."""
    data = path.read_bytes()
    header = SEG_HEADER.pack(SEG_MAGIC, epoch.encode("ascii"), n)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header + data[SEG_HEADER.size:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
