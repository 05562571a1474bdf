"""How long compaction stalls the broker's loop (measured on the broker core, no sockets)."""

from __future__ import annotations

import tempfile

from benchkit.harness import SHAREDMEM, Ctx, Row, phase
from benchkit.internals import compaction_stall


def bench_compaction(ctx: Ctx) -> list[Row]:
    """The frozen view (dict copies) and the segment rotation happen on the loop; encoding
    and writing the snapshot on a thread (see internals.compaction_stall)."""
    rows = []
    for total in ([10_000] if ctx.quick else [100_000, 1_000_000]):
        phase(f"compaction: {total:,} keys")
        with tempfile.TemporaryDirectory(prefix="sharedmem-bench-") as d:
            freeze, stall, background = compaction_stall(d, total)
        rows.append(Row(f"compaction stall on the loop, {total:,} keys", SHAREDMEM, None,
                        stall * 1e6, stall * 1e6,
                        f"freeze {freeze * 1e3:.1f} ms; snapshot written in the "
                        f"background in {background:.2f} s", better="latency"))
    return rows
