"""What a run prints and saves: the machine, the table, the JSON file, and the comparison of
this run's rows with an earlier run's JSON (``--compare``)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from benchkit.harness import Row
from benchkit.peers import Peers
from tests.processes import ROOT


def machine(peers: Peers) -> dict[str, Any]:
    import msgspec
    import zmq

    cpu = mem = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo")
                  if line.startswith("MemTotal"))
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        pass

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        idle_driver = Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()
    except OSError:
        idle_driver = "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit,
        "cpuidle driver": idle_driver,
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgspec": msgspec.__version__,
        "redis-server": peers.redis_version and f"{peers.redis_version} ({peers.redis_server})",
        "redis-py": dist("redis"),
        "nats-server": peers.nats_version and f"{peers.nats_version} ({peers.nats_server})",
        "nats-py": dist("nats-py"),
    }


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None or x != x else format(x, spec)


def _server_version(info: dict[str, Any], name: str) -> str:
    """The version alone from ``machine()``'s "VERSION (PATH)" entry, or "-"."""
    entry = info.get(name)
    return entry.split(" ")[0] if entry else "-"


def print_header(info: dict[str, Any], quick: bool, notes: list[str]) -> None:
    """The lines above the table: machine, commit, peers, then one line per skipped peer or
    failed workload (``notes``)."""
    print(f"# sharedmem benchmarks {info['date']}{' (--quick)' if quick else ''}: "
          f"{info['nproc']} x {info['cpu']}, {info['memory']}, Python {info['python']}, "
          f"pyzmq {info['pyzmq']} / libzmq {info['libzmq']}")
    print(f"# commit {info['commit']}; cpu idle: {info['cpu idle']} "
          f"(cpuidle driver {info['cpuidle driver']})")
    print(f"# peers: redis-server {_server_version(info, 'redis-server')}, "
          f"redis-py {info['redis-py'] or '-'}, "
          f"nats-server {_server_version(info, 'nats-server')}, nats-py {info['nats-py'] or '-'}")
    for line in notes:
        print(line)
    print("# vs best peer: ops/s over the best peer's ops/s of the same workload (for latency "
          "rows: best peer's p50 over this p50); > 1 = better than the best peer")


def print_table(rows: list[Row]) -> None:
    head = (f"{'workload':46} {'system':25} {'ops/s':>10} {'p50 us':>10} {'p99 us':>10} "
            f"{'vs best peer':>12}  note")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and r.workload != last:
            print()
        last = r.workload
        ratio = fmt(r.vs_best_peer, ".2f")
        print(f"{r.workload:46} {r.system:25} {fmt(r.ops_per_s, ',.0f'):>10} "
              f"{fmt(r.p50_us, ',.1f'):>10} {fmt(r.p99_us, ',.1f'):>10} "
              f"{(ratio + 'x') if ratio else '':>12}  {r.note}")


def write_json(path: str, info: dict[str, Any], quick: bool, skipped: list[str],
               failed: list[str], rows: list[Row]) -> None:
    Path(path).write_text(json.dumps(
        {"machine": info, "quick": quick, "skipped": skipped,
         "failed": failed, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n")


def load_json(path: str) -> dict[str, Any]:
    """A run saved by ``--json``, with its rows as ``Row``s; raise ValueError naming the file
    if it is not one."""
    try:
        run = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(Row)}
        run["rows"] = [Row(**{k: v for k, v in r.items() if k in names}) for r in run["rows"]]
        if not isinstance(run["machine"], dict):
            raise TypeError("no machine section")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a saved scripts/bench run ({exc})") from None
    return run


def _keyed(rows: list[Row]) -> dict[tuple[str, str, int], Row]:
    """Rows by (workload, system, n-th such row): the write-path split repeats its part names
    once per mode."""
    seen: Counter[tuple[str, str]] = Counter()
    out = {}
    for r in rows:
        out[(r.workload, r.system, seen[(r.workload, r.system)])] = r
        seen[(r.workload, r.system)] += 1
    return out


def _ratio(now: float | None, then: float | None) -> str:
    return f"{now / then:.2f}x" if now and then and now == now and then == then else ""


def print_comparison(rows: list[Row], old: dict[str, Any], old_path: str) -> None:
    """Every row of this run beside the same row of ``old`` (a run saved with ``--json``):
    ops/s now over then, and p50 then over now, so > 1 is better now in both columns."""
    info = old["machine"]
    print(f"# compared with {old_path} (commit {info.get('commit', '?')}, "
          f"{info.get('date', '?')}{', --quick' if old.get('quick') else ''}): "
          "ops/s now over then, p50 then over now; > 1 = better now")
    head = (f"{'workload':46} {'system':25} {'ops/s':>10} {'vs then':>8} {'p50 us':>10} "
            f"{'vs then':>8}")
    print(head)
    print("-" * len(head))
    before = _keyed(old["rows"])
    now = _keyed(rows)
    for key, r in now.items():
        o = before.get(key)
        if o is None:
            ops = lat = "(new)"
        else:
            ops, lat = _ratio(r.ops_per_s, o.ops_per_s), _ratio(o.p50_us, r.p50_us)
        print(f"{r.workload:46} {r.system:25} {fmt(r.ops_per_s, ',.0f'):>10} {ops:>8} "
              f"{fmt(r.p50_us, ',.1f'):>10} {lat:>8}")
    gone = [k for k in before if k not in now]
    if gone:
        workloads = dict.fromkeys(w for w, _, _ in gone)
        print(f"# {len(gone)} rows of {old_path} are not in this run: {'; '.join(workloads)}")
