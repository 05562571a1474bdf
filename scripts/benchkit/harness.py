"""Rows of the table and how they are timed: per-op latencies, percentiles, the comparison with
the best peer of a workload, and the phases of a run (progress lines, --wait-idle)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchkit.peers import Peers
from node import SharedMemoryConfig

SHAREDMEM = "sharedmem"
VALUE = {"name": "Alice", "role": "admin", "n": 42}  # the "small JSON object" of the reads
STOP_SAMPLE = {"i": -1, "t": 0.0}  # tells a watcher process that the run is over


@dataclass
class Row:
    """One line of the table. ``better``: ``ops`` (higher ops/s wins) or ``latency`` (lower
    p50 wins); it decides how ``vs_best_peer`` is computed (>1: better than the best peer)."""

    workload: str
    system: str
    ops_per_s: float | None
    p50_us: float | None
    p99_us: float | None
    note: str = ""
    better: str = "ops"
    vs_best_peer: float | None = None
    compare: bool = True  # False: a part of a whole (no peer, no ratio)


@dataclass
class Ctx:
    """What every workload is given: the run's size and the peers found."""

    quick: bool
    peers: Peers


def sm_config(namespace: str, address: str, **kw: Any) -> SharedMemoryConfig:
    return SharedMemoryConfig(namespace=namespace, broker=address, max_keys=0, ttl=0, **kw)


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def lat_row(workload: str, system: str, ops_per_s: float | None, lat_s: list[float],
            note: str = "", better: str = "ops") -> Row:
    return Row(workload, system, ops_per_s, percentile(lat_s, 0.5) * 1e6,
               percentile(lat_s, 0.99) * 1e6, note, better)


def timed(n: int, op: Callable[[int], object], max_seconds: float = 1e9
          ) -> tuple[int, float, list[float]]:
    """Run ``op(i)`` up to ``n`` times (fewer once ``max_seconds`` are spent), timing each.
    Returns (ops done, seconds, per-op latencies in seconds)."""
    lat: list[float] = []
    pc = time.perf_counter
    start = pc()
    stop_at = start + max_seconds
    done = 0
    while done < n:
        t = pc()
        op(done)
        t2 = pc()
        lat.append(t2 - t)
        done += 1
        if t2 > stop_at:
            break
    return done, pc() - start, lat


def timed_row(workload: str, system: str, n: int, op: Callable[[int], object],
              note: str = "", max_seconds: float = 30.0) -> Row:
    done, secs, lat = timed(n, op, max_seconds)
    return lat_row(workload, system, done / secs, lat, note)


def local_row(workload: str, op: Callable[[], object], n: int) -> Row:
    """A local read: throughput from an untimed loop, latencies from a timed one."""
    pc = time.perf_counter
    for _ in range(min(n, 10_000)):  # warm up
        op()
    t = pc()
    for _ in range(n):
        op()
    secs = pc() - t
    lat = []
    for _ in range(max(1000, n // 10)):
        t = pc()
        op()
        lat.append(pc() - t)
    return lat_row(workload, SHAREDMEM, n / secs, lat)


def metric(r: Row) -> float | None:
    """The number a row is judged by, higher is better: ops/s, or 1 / p50 for latency rows
    (and for parts of a whole that have no ops/s)."""
    if r.better == "latency" or r.ops_per_s is None:
        return 1.0 / r.p50_us if r.p50_us else None
    return r.ops_per_s or None


def compare_with_peers(rows: list[Row]) -> None:
    """Fill ``vs_best_peer``: this row's metric over the best peer's, per workload."""
    for r in rows:
        if not r.compare:
            continue
        peers = [metric(p) for p in rows
                 if p.workload == r.workload and not p.system.startswith(SHAREDMEM)
                 and p.compare]  # a group of sharedmem brokers is no peer
        peers = [m for m in peers if m]
        mine = metric(r)
        if peers and mine:
            r.vs_best_peer = mine / max(peers)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_busy(window: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``window`` seconds (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]  # idle + iowait
        return sum(v) - idle, sum(v)
    b0, t0 = sample()
    time.sleep(window)
    b1, t1 = sample()
    return (b1 - b0) / max(1, t1 - t0)


def wait_idle(budget: float, threshold: float = 0.15) -> None:
    """Wait (at most ``budget`` seconds) until the machine is quiet: other processes running
    benchmarks or tests on the same cores skew every number here."""
    if budget <= 0:
        return
    deadline = time.monotonic() + budget
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    if busy > threshold:
        progress(f"machine still {busy:.0%} busy after waiting {budget:.0f}s; going on")


WAIT_IDLE = [0.0]  # --wait-idle budget, per phase


def phase(msg: str) -> None:
    """A workload phase starts: wait for a quiet machine (--wait-idle), then say so."""
    wait_idle(WAIT_IDLE[0])
    progress(msg)


def progress(msg: str) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"bench: {msg} (load average {load})", file=sys.stderr, flush=True)
