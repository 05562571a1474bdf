"""The workloads, one function per group of rows, in the order the table prints them."""

from __future__ import annotations

from collections.abc import Callable

from benchkit.harness import Ctx, Row
from benchkit.workloads.compaction import bench_compaction
from benchkit.workloads.floor import bench_replication_floor
from benchkit.workloads.join import bench_join
from benchkit.workloads.reads import bench_list_keys, bench_reads
from benchkit.workloads.watching import bench_fanout, bench_visibility
from benchkit.workloads.write_path import bench_write_path
from benchkit.workloads.writes import bench_sets

WORKLOADS: dict[str, Callable[[Ctx], list[Row]]] = {
    "reads": bench_reads,
    "list_keys": bench_list_keys,
    "sets": bench_sets,
    "replication_floor": bench_replication_floor,
    "visibility": bench_visibility,
    "join": bench_join,
    "fanout": bench_fanout,
    "write_path": bench_write_path,
    "compaction": bench_compaction,
}
