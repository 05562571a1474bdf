"""CI runs ``scripts/bench --quick`` through this test so the harness never rots. It asserts
that every workload ran and printed the same rows and columns as before the harness was split
into scripts/benchkit -- never a speed -- and that ``--compare`` prints a ratio for each row."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HEADER = ("workload                                       system                         ops/s  "
          "   p50 us     p99 us vs best peer  note")
# (workload, system) of every sharedmem row of a --quick run, in table order (peers' rows come
# and go with what is installed; these may not). A missing split row of the write path means
# a name in scripts/benchkit/internals.py is gone from node/.
WRITE_PATH = "acknowledged set, where the time goes"
FLOOR = "replication floor: pyzmq + fsync only"
SHAREDMEM_ROWS = [
    ("get small JSON (fresh copy)", "sharedmem"),
    ("exists", "sharedmem"),
    ("get_metadata", "sharedmem"),
    ("list_keys prefix, 100 hits of 20,000 keys", "sharedmem"),
    ("set, 1 writer, in memory", "sharedmem"),
    ("set_many 100 keys, in memory", "sharedmem"),
    ("set, 4 writer processes, in memory", "sharedmem"),
    ("set, 1 writer, fsync always", "sharedmem"),
    ("set_many 100 keys, fsync always", "sharedmem"),
    ("set, 4 writer processes, fsync always", "sharedmem"),
    ("set, 1 writer, group, fsync always", "sharedmem group of 3"),
    ("set, 4 writer processes, group, fsync always", "sharedmem group of 3"),
    (FLOOR, "os.write + os.fsync alone"),
    (FLOOR, "1 copy (no standby)"),
    (FLOOR, "2 copies (1 standby)"),
    (FLOOR, "3 copies (2 standbys)"),
    ("write on A visible on B", "sharedmem"),
    ("snapshot join, 20,000 keys", "sharedmem"),
    ("fan-out, 4 nodes at 2,000 writes/s", "sharedmem"),
    (WRITE_PATH, "raw REQ->ROUTER echo"),
    (WRITE_PATH, "broker round trip (Head)"),
    (WRITE_PATH, "set() total, own apply"),
    (WRITE_PATH, "until the reply"),
    (WRITE_PATH, "the rest"),
    (WRITE_PATH, "set() total, own apply off"),
    (WRITE_PATH, "until the reply"),
    (WRITE_PATH, "the rest"),
    ("compaction stall on the loop, 10,000 keys", "sharedmem"),
    ("write turn during compaction, 10,000 keys", "sharedmem"),
    ("write turn without compaction, 10,000 keys", "sharedmem"),
    ("node snapshot stall on the loop, 10,000 keys", "sharedmem"),
]
PEER_SYSTEMS = {"redis", "redis, client-side cache", "nats kv", "redis KEYS",
                "redis SCAN MATCH", "redis replica"}


def bench(*args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def table(lines: list[str], start: int) -> list[list[str]]:
    """The rows of the table whose dashes line is ``lines[start]``, up to the next '#' line,
    each cut into workload (46 columns), system (25, or more when a name is longer: it ends at
    two spaces) and the rest."""
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.strip():
            m = re.match(r"\s*(\S.*?)(?:\s{2,}|$)", line[47:])
            assert m is not None, line
            rows.append([line[:46].strip(), m.group(1), line[47 + m.end():]])
    return rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out_json = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = bench("--quick", "--json", str(out_json))
    return proc.stdout, out_json


def test_bench_quick_prints_the_same_rows_and_columns(quick_run: tuple[str, Path]) -> None:
    stdout, out_json = quick_run
    assert "FAILED" not in stdout
    lines = stdout.splitlines()
    assert HEADER in lines, f"table header changed:\n{stdout}"
    rows = table(lines, lines.index(HEADER) + 1)
    ours = [(w, s) for w, s, _ in rows if s not in PEER_SYSTEMS]
    expected = SHAREDMEM_ROWS if shutil.which("etcd") else [
        r for r in SHAREDMEM_ROWS if r[1] != "sharedmem group of 3"]
    assert ours == expected, f"rows changed:\n{stdout}"
    if not shutil.which("etcd"):
        assert "sharedmem group: skipped (etcd not on PATH" in stdout, stdout
    else:  # the cost of synchronous replication, as a ratio to the single broker's p50
        notes = [rest for w, s, rest in rows if s == "sharedmem group of 3"]
        assert all(re.search(r"p50 \d+\.\d\dx the single broker's", n) for n in notes), notes
    workloads = {w for w, _ in SHAREDMEM_ROWS}
    assert all(w in workloads for w, s, _ in rows if s in PEER_SYSTEMS), stdout
    saved = json.loads(out_json.read_text())
    assert [(r["workload"], r["system"].strip()) for r in saved["rows"]] == \
        [(w, s) for w, s, _ in rows]


def test_compare_with_itself_prints_one_for_every_row(quick_run: tuple[str, Path]) -> None:
    _, out_json = quick_run
    proc = bench("--from-json", str(out_json), "--compare", str(out_json), timeout=60)
    lines = proc.stdout.splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith("# compared with")]
    assert len(marks) == 1, proc.stdout
    rows = table(lines, marks[0] + 2)
    assert [(w, s) for w, s, _ in rows] == \
        [(r["workload"], r["system"].strip()) for r in json.loads(out_json.read_text())["rows"]]
    for w, s, rest in rows:
        ratios = [cell for cell in rest.split() if cell.endswith("x")]
        assert ratios and all(r == "1.00x" for r in ratios), f"{w} / {s}: {rest!r}"


def test_compare_a_new_run_prints_its_ratio(quick_run: tuple[str, Path]) -> None:
    _, out_json = quick_run
    proc = bench("--quick", "--only", "compaction", "--no-peers", "--compare", str(out_json),
                 timeout=120)
    lines = proc.stdout.splitlines()
    mark = next(i for i, line in enumerate(lines) if line.startswith("# compared with"))
    rows = table(lines, mark + 2)
    compaction = [r for r in SHAREDMEM_ROWS if "compaction" in r[0] or "node snapshot" in r[0]]
    assert [(w, s) for w, s, _ in rows] == compaction, proc.stdout
    assert rows[0][2].split()[-1].endswith("x"), proc.stdout  # p50 then over now
    others = len(json.loads(out_json.read_text())["rows"]) - len(compaction)
    assert f"# {others} rows of {out_json} are not in this run" in proc.stdout, proc.stdout
