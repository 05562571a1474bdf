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
    _SEG_RE,
    _SNAP_RE,
    BatchRecord,
    CorruptLog,
    DurableLog,
    NamespaceRecord,
    SnapshotFile,
    list_numbered,
    read_segment_header,
    read_snapshot,
    scan_segment,
    seg_path,
    snap_path,
)
from broker.protocol import WriteOk
from broker.state import NamespaceState, SnapEntry

log = logging.getLogger("sharedmem.broker.recovery")

EPOCH_FILE = "EPOCH"
CLEAN_FILE = "CLEAN"
POLICY_FILE = "FSYNC"  # the fsync policy the log was last written under
TERM_FILE = "TERM"  # broker groups: the highest term promised (acks nothing below it)


@dataclass
class RecoveryReport:
    epoch: str
    snapshot: Path | None
    segments: int
    records: int
    torn_bytes: int
    new_epoch: bool


def write_small_file(path: Path, text: str) -> None:
    """Replace a small file atomically and durably (temp file, fsync, rename)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_snapshot(core: BrokerCore, snap: SnapshotFile, mono: float, wall: float) -> None:
    """Fill ``core``'s namespaces and dedup table from a snapshot (TTLs from its wall clock)."""
    for ns in snap.namespaces:
        entries = [
            SnapEntry(e.key, e.value, e.version, e.created_at, e.modified_at,
                      None if e.expires_at is None else e.expires_at - wall)
            for e in sorted(ns.entries, key=lambda e: e.key)
        ]
        # from_snapshot turns a remaining TTL into a deadline; a negative one is already due.
        core.namespaces[ns.name] = NamespaceState.from_snapshot(ns.name, ns.max_keys, ns.seq,
                                                                entries, mono)
    for d in snap.dedup:
        core.dedup.remember(d.client, d.request_no, WriteOk(snap.epoch, d.seq, d.changed))


def apply_record(core: BrokerCore, rec: object, epoch: str, mono: float, wall: float, *,
                 fetch_log: bool = True) -> None:
    """Apply one log record to ``core``: the namespace, its state, the dedup table's reply,
    and (``fetch_log``) the events kept for Fetch. Recovery and a group standby both use it,
    so a standby's dedup table and Fetch log are what a restart would rebuild."""
    if type(rec) is NamespaceRecord:
        if rec.namespace not in core.namespaces:
            core.namespaces[rec.namespace] = NamespaceState(rec.namespace, rec.max_keys)
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
                            WriteOk(epoch, rec.events[-1].seq, rec.changed))


def recover(core: BrokerCore, durable: DurableLog) -> RecoveryReport:
    """Fill ``core`` from ``durable.data_dir`` and open the log for appending."""
    data_dir = durable.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    for tmp in data_dir.glob("*.tmp"):
        tmp.unlink()
    mono, wall = time.monotonic(), time.time()
    clean = (data_dir / CLEAN_FILE).exists()
    policy_path = data_dir / POLICY_FILE
    # What matters is the policy the existing log was written under, not today's.
    written_under = policy_path.read_text().strip() if policy_path.exists() else "always"
    epoch_path = data_dir / EPOCH_FILE
    epoch = epoch_path.read_text().strip() if epoch_path.exists() else None

    snapshot = None
    snapshot_path = None
    for n in reversed(list_numbered(data_dir, _SNAP_RE)):
        path = snap_path(data_dir, n)
        try:
            snapshot = read_snapshot(path)
            snapshot_path = path
            break
        except CorruptLog as exc:
            log.error("skipping unreadable snapshot: %s", exc)
    segments = list_numbered(data_dir, _SEG_RE)
    start = snapshot.segment if snapshot is not None else (segments[0] if segments else 1)
    replay = [n for n in segments if n >= start]
    for a, b in zip(replay, replay[1:], strict=False):
        if b != a + 1:
            raise CorruptLog(seg_path(data_dir, a + 1), 0, "segment is missing")
    if snapshot is not None and replay and replay[0] != start:
        raise CorruptLog(seg_path(data_dir, start), 0, "segment after the snapshot is missing")
    if snapshot is not None:
        epoch = epoch or snapshot.epoch
        core.epoch = epoch
        load_snapshot(core, snapshot, mono, wall)
    elif replay:
        epoch = epoch or read_segment_header(seg_path(data_dir, replay[0]))[0]
    fresh = epoch is None
    epoch = epoch or new_epoch()
    core.epoch = epoch

    records = 0
    torn = 0
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
                log.warning("%s: dropping a torn tail of %d bytes at offset %d (%s); only "
                            "unacknowledged writes can be there", path, torn, res.good_end,
                            res.error)
                with open(path, "r+b") as f:
                    f.truncate(res.good_end)
                    f.flush()
                    os.fsync(f.fileno())
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
        log.warning("unclean shutdown under fsync=%s: new epoch %s replaces %s; nodes will "
                    "resync", written_under, epoch, old)
    write_small_file(epoch_path, epoch)
    write_small_file(policy_path, durable.fsync)
    (data_dir / CLEAN_FILE).unlink(missing_ok=True)
    last = replay[-1] if replay else start
    durable.open_segment(last, epoch)
    return RecoveryReport(epoch, snapshot_path, len(replay), records, torn,
                          changed_epoch or fresh)


def mark_clean(durable: DurableLog) -> None:
    """After a clean close: the next start may keep the epoch under any fsync policy."""
    write_small_file(durable.data_dir / CLEAN_FILE, "clean\n")


def repair(data_dir: Path) -> list[str]:
    """Truncate the log at its first bad record and drop every later segment; say what went."""
    said: list[str] = []
    segments = list_numbered(data_dir, _SEG_RE)
    snaps = list_numbered(data_dir, _SNAP_RE)
    start = snaps[-1] if snaps else (segments[0] if segments else 1)
    cut_from: int | None = None
    for n in segments:
        if n < start:
            continue
        path = seg_path(data_dir, n)
        if cut_from is not None:
            path.unlink()
            said.append(f"removed {path} (after the corruption)")
            continue
        res = scan_segment(path)
        if res.error is not None:
            with open(path, "r+b") as f:
                f.truncate(res.good_end)
                f.flush()
                os.fsync(f.fileno())
            said.append(f"truncated {path} at offset {res.good_end} ({res.error} at "
                        f"{res.error_offset}; {res.size - res.good_end} bytes dropped)")
            cut_from = n
    if not said:
        said.append("no corruption found; nothing changed")
    return said
