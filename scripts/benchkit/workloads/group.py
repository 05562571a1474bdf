"""The cost of synchronous replication: set from 1 writer and from 4 writer processes against a
local broker group of 3 (fsync always on every member, a commit waits for both standbys), in
the same run as the single broker's fsync-always rows, with the ratio of the set p50s
(target: group <= 1.5x single; docs/benchmarks.md). Skipped, with one line, without etcd."""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchkit.harness import SHAREDMEM, Ctx, Row, phase, sm_config, timed_row
from benchkit.localgroup import LocalGroup, have_etcd
from node import SharedMemory

GROUP_SYSTEM = "sharedmem group of 3"
ROWS = {  # the single broker's row -> the group's row
    "set, 1 writer, fsync always": "set, 1 writer, group, fsync always",
    "set, 4 writer processes, fsync always": "set, 4 writer processes, group, fsync always",
}


def group_rows(ctx: Ctx, n: int, single: list[Row]) -> list[Row]:
    """The group rows; ``single``: the rows so far, where the single broker's are found."""
    from benchkit.workloads.writes import many_writers

    if not have_etcd():
        ctx.peers.skipped.append("sharedmem group: skipped (etcd not on PATH; as root "
                                 "scripts/test installs etcd-server via scripts/_etcd.sh, or "
                                 "apt-get install etcd-server)")
        return []
    phase("sets: sharedmem group of 3, fsync always")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sharedmem-bench-group-") as d:
        group = LocalGroup(Path(d)).start()
        try:
            seeds = group.seeds
            with SharedMemory(sm_config("sets", seeds)) as shm:
                shm.set("warm", 1)
                rows.append(timed_row(ROWS["set, 1 writer, fsync always"], GROUP_SYSTEM, n,
                                      lambda i: shm.set(f"k{i % 1000}", {"i": i})))
            rows.append(many_writers(ROWS["set, 4 writer processes, fsync always"],
                                     GROUP_SYSTEM,
                                     [("sm-writer", seeds, n, f"p{k}") for k in range(4)], n))
        finally:
            group.stop()
    by_name = {r.workload: r for r in single if r.system == SHAREDMEM}
    for single_name, row in zip(ROWS, rows, strict=True):
        base = by_name.get(single_name)
        row.note = "3 members, both standbys in the sync set"
        if base is not None and base.p50_us and row.p50_us:
            row.note = f"p50 {row.p50_us / base.p50_us:.2f}x the single broker's " \
                       f"(target <= 1.5x); {row.note}"
    return rows
