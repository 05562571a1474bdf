"""How long compaction and node snapshots stall the broker's loop, and what a write turn
costs meanwhile (measured on the broker core, no sockets)."""

from __future__ import annotations

import tempfile

from benchkit.harness import SHAREDMEM, Ctx, Row, phase
from benchkit.internals import compaction_stall


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def bench_compaction(ctx: Ctx) -> list[Row]:
    """The freeze copies a chunk per loop turn; encoding and writing the snapshot run on a
    thread (see internals.compaction_stall). Stall rows: p50 and p99 columns are both the
    longest loop turn; write-turn rows: p50/p99 over the turns."""
    rows = []
    for total in ([10_000] if ctx.quick else [100_000, 1_000_000]):
        phase(f"compaction: {total:,} keys")
        with tempfile.TemporaryDirectory(prefix="sharedmem-bench-") as d:
            m = compaction_stall(d, total)
        worst = max([m.start, *m.copy_turns])
        rows.append(Row(
            f"compaction stall on the loop, {total:,} keys", SHAREDMEM, None,
            worst * 1e6, worst * 1e6,
            f"longest loop turn (CPU); start {m.start * 1e3:.1f} ms (freeze "
            f"{m.freeze * 1e3:.2f} ms, then fsync + rotation), copy over "
            f"{len(m.copy_turns)} turns, longest {max(m.copy_turns, default=0) * 1e3:.1f} ms; "
            f"former full-copy freeze {m.old_freeze * 1e3:.1f} ms (same run); snapshot "
            f"written in the background in {m.background:.2f} s", better="latency"))
        rows.append(Row(
            f"write turn during compaction, {total:,} keys", SHAREDMEM, None,
            _pct(m.busy_turns, 0.5) * 1e6, _pct(m.busy_turns, 0.99) * 1e6,
            f"{len(m.busy_turns)} turns of one set each (decide, append, apply) while the "
            f"snapshot is copied, encoded and written; max {max(m.busy_turns) * 1e3:.1f} ms",
            better="latency"))
        rows.append(Row(
            f"write turn without compaction, {total:,} keys", SHAREDMEM, None,
            _pct(m.idle_turns, 0.5) * 1e6, _pct(m.idle_turns, 0.99) * 1e6,
            f"{len(m.idle_turns)} turns; max {max(m.idle_turns) * 1e3:.1f} ms",
            better="latency"))
        chunk = max(m.snapshot_chunks, default=0.0)
        rows.append(Row(
            f"node snapshot stall on the loop, {total:,} keys", SHAREDMEM, None,
            chunk * 1e6, chunk * 1e6,
            f"longest chunk of 5,000 entries of {len(m.snapshot_chunks)}, copied on the "
            f"loop; former freeze list(entries.items()) {m.old_snapshot_freeze * 1e3:.1f} ms "
            f"(same run)", better="latency"))
    return rows
