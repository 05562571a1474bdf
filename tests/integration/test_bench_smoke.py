"""CI runs ``scripts/bench --quick`` through this test so the harness never rots. It asserts
only that every workload ran and printed its row -- never a speed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_bench_quick_runs_every_workload(tmp_path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(out_json)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout
    for row in ("get small JSON", "exists", "list_keys", "set, 1 writer", "set_many",
                "visible on B", "snapshot join", "fan-out", "compaction"):
        assert row in proc.stdout, f"no {row!r} row in:\n{proc.stdout}"
    assert out_json.stat().st_size > 0
