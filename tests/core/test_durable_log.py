"""The durable log over real files in a temp directory, driven in-process (issue 14): the
namespace record precedes its first batch, the data-dir lock, a vanished or replaced segment,
atomic segment creation, recovery of a header-less last segment, repair's new epoch, and a
fault injected into every file operation of a rotation and of a compaction."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from broker.core import BrokerCore
from broker.durable import BatchRecord, DurableLog, NamespaceRecord, scan_segment, seg_path
from broker.errors import StorageError
from broker.protocol import Set
from broker.recovery import recover


def open_core(data: Path, **kw: object) -> tuple[BrokerCore, DurableLog]:
    log = DurableLog(data, **kw)  # type: ignore[arg-type]
    core = BrokerCore(log=log)
    recover(core, log)
    return core, log


def write(core: BrokerCore, key: str, value: bytes, *, ns: str = "ns", max_keys: int = 0,
          client: bytes = b"c" * 12, request_no: int = 1) -> None:
    """One write as the broker's turn does it: decide, append, commit, flush."""
    core.begin_turn()
    d = core.decide(Set(client, request_no, ns, max_keys, key, value, None), 0.0, 1.0)
    core.append_to_log(d, 0.0, 1.0)
    core.commit(d, 0.0)
    core.log.flush()
    core.end_turn()


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
