"""Benchmarks: ``scripts/bench [--quick] [--only NAME ...] [--json FILE]``.

Each workload runs against a real broker process on loopback (started and stopped here, by
PID) and prints one row: ops/s, p50 and p99 latency. Numbers are for docs/benchmarks.md and
docs/persistence.md; nothing here asserts a speed (CI runs ``--quick`` only so the harness
never rots).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node import SharedMemory, SharedMemoryConfig  # noqa: E402


@dataclass
class Row:
    workload: str
    variant: str
    ops: int
    seconds: float
    p50_us: float | None
    p99_us: float | None
    note: str = ""

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def free_port_pair() -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


class BrokerProc:
    def __init__(self, *args: str) -> None:
        self.port = free_port_pair()
        self.address = f"tcp://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "--bind", self.address, "--log-level", "WARNING",
             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"broker did not start: {line!r}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def timed(n: int, op: Callable[[int], object], sample_every: int = 1) -> tuple[float, list[float]]:
    lat: list[float] = []
    pc = time.perf_counter
    start = pc()
    for i in range(n):
        if i % sample_every == 0:
            t = pc()
            op(i)
            lat.append(pc() - t)
        else:
            op(i)
    return pc() - start, lat


def row(workload: str, variant: str, n: int, seconds: float, lat: list[float],
        note: str = "") -> Row:
    return Row(workload, variant, n, seconds, percentile(lat, 0.5) * 1e6,
               percentile(lat, 0.99) * 1e6, note)


# ---------------------------------------------------------------------- workloads


def bench_local_reads(q: bool) -> list[Row]:
    b = BrokerProc()
    try:
        cfg = SharedMemoryConfig(namespace="reads", broker=b.address, max_keys=0, ttl=0)
        with SharedMemory(cfg) as shm:
            shm.set("obj", {"name": "Alice", "role": "admin", "n": 42})
            n = 50_000 if q else 1_000_000
            rows = []
            for name, op in [
                ("get", lambda i: shm.get("obj")),
                ("exists", lambda i: shm.exists("obj")),
                ("get_metadata", lambda i: shm.get_metadata("obj")),
            ]:
                secs, _ = timed(n, op, sample_every=n + 1)
                _, lat = timed(n // 10, op)
                rows.append(row(f"local {name}", "1 thread", n, secs, lat))
            return rows
    finally:
        b.stop()


def bench_list_keys(q: bool) -> list[Row]:
    b = BrokerProc()
    try:
        total = 20_000 if q else 1_000_000
        cfg = SharedMemoryConfig(namespace="lk", broker=b.address, max_keys=0, ttl=0,
                                 connect_timeout=120, request_timeout=120)
        with SharedMemory(cfg) as shm:
            batch: dict[str, int] = {}
            for i in range(total):
                batch[f"k{i:07d}"] = i
                if len(batch) == 5000:
                    shm.set_many(batch)
                    batch = {}
            if batch:
                shm.set_many(batch)
            # "k00001??" style prefix: 100 keys
            n = 2000
            secs, lat = timed(n, lambda i: shm.list_keys("k00001*"))
            assert len(shm.list_keys("k00001*")) == 100
            return [row("list_keys prefix (100 hits)", f"{total} keys", n, secs, lat)]
    finally:
        b.stop()


def bench_sets(q: bool) -> list[Row]:
    rows = []
    n = 500 if q else 5000
    for variant, args in [("memory broker", ()), ("fsync always", ("--fsync", "always")),
                          ("fsync everysec", ("--fsync", "everysec")),
                          ("fsync no", ("--fsync", "no"))]:
        with tempfile.TemporaryDirectory() as d:
            extra = (*args, "--data-dir", d) if args else ()
            b = BrokerProc(*extra)
            try:
                cfg = SharedMemoryConfig(namespace="sets", broker=b.address, max_keys=0, ttl=0)
                with SharedMemory(cfg) as shm:
                    shm.set("warm", 1)
                    secs, lat = timed(n, lambda i: shm.set(f"k{i % 1000}", {"i": i}))
                    rows.append(row("set, 1 writer", variant, n, secs, lat))
                    secs, lat = timed(max(20, n // 50), lambda i: shm.set_many(
                        {f"m{j}": {"i": i, "j": j} for j in range(100)}))
                    rows.append(row("set_many 100 keys", variant, max(20, n // 50), secs, lat,
                                    note="ops = calls"))
                rows.append(multi_writer(b.address, variant, 4, n))
            finally:
                b.stop()
    return rows


WRITER_PROC = r"""
import sys, time, json
from node import SharedMemory, SharedMemoryConfig
addr, n, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
shm = SharedMemory(SharedMemoryConfig(namespace="sets", broker=addr, max_keys=0, ttl=0))
print("ready", flush=True)
sys.stdin.readline()
lat = []
start = time.perf_counter()
for i in range(n):
    t = time.perf_counter()
    shm.set(f"{name}_{i % 1000}", {"i": i})
    lat.append(time.perf_counter() - t)
print(json.dumps([time.perf_counter() - start, lat]), flush=True)
shm.close()
"""


def multi_writer(address: str, variant: str, procs: int, n: int) -> Row:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ps = [subprocess.Popen([sys.executable, "-c", WRITER_PROC, address, str(n), f"p{k}"],
                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
          for k in range(procs)]
    for p in ps:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    start = time.perf_counter()
    for p in ps:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    lat: list[float] = []
    for p in ps:
        assert p.stdout is not None
        _, l_ = json.loads(p.stdout.readline())
        lat += l_
        p.wait(60)
    secs = time.perf_counter() - start
    return row(f"set, {procs} writer processes", variant, n * procs, secs, lat)


def bench_visibility(q: bool) -> list[Row]:
    b = BrokerProc()
    try:
        cfg = SharedMemoryConfig(namespace="vis", broker=b.address, max_keys=0, ttl=0)
        reader = subprocess.Popen([sys.executable, "-c", VIS_READER, b.address],
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "ready"
        n = 200 if q else 2000
        with SharedMemory(cfg) as shm:
            for i in range(n):
                shm.set("ping", {"i": i, "t": time.time()})
                reader.stdout.readline()
        reader.stdin.close()
        out = reader.stdout.read()
        reader.wait(30)
        lat = json.loads(out.strip().splitlines()[-1])
        return [row("write on A visible on B", "other process", n, sum(lat), lat,
                    note="set() start on A -> value seen on B")]
    finally:
        b.stop()


VIS_READER = r"""
import sys, time, json
from node import SharedMemory, SharedMemoryConfig
shm = SharedMemory(SharedMemoryConfig(namespace="vis", broker=sys.argv[1], max_keys=0, ttl=0))
print("ready", flush=True)
lat, last = [], -1
node = shm._node
while True:
    with node.changed:
        node.changed.wait(1.0)
    v = shm.get("ping", None)
    if v is not None and v["i"] != last:
        lat.append(time.time() - v["t"])
        last = v["i"]
        print("seen", flush=True)
    if sys.stdin.closed or last >= 0 and v is None:
        break
    import select
    if select.select([sys.stdin], [], [], 0)[0] and sys.stdin.read(1) == "":
        break
print(json.dumps(lat), flush=True)
"""


def bench_join(q: bool) -> list[Row]:
    b = BrokerProc()
    try:
        total = 20_000 if q else 1_000_000
        cfg = SharedMemoryConfig(namespace="join", broker=b.address, max_keys=0, ttl=0,
                                 connect_timeout=300, request_timeout=120)
        with SharedMemory(cfg) as shm:
            batch: dict[str, object] = {}
            for i in range(total):
                batch[f"key{i:07d}"] = {"i": i}
                if len(batch) == 5000:
                    shm.set_many(batch)
                    batch = {}
            if batch:
                shm.set_many(batch)
        code = r"""
import sys, time, json
from node import SharedMemory, SharedMemoryConfig
import zmq, msgspec, sortedcontainers, node.api  # imports are not the replica's cost
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
t = time.perf_counter()
shm = SharedMemory(SharedMemoryConfig(namespace="join", broker=sys.argv[1], max_keys=0, ttl=0,
                                      connect_timeout=300))
secs = time.perf_counter() - t
after = rss()
print(json.dumps([secs, after - before, len(shm.list_keys())]))
"""
        out = subprocess.run([sys.executable, "-c", code, b.address], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
        secs, rss, keys = json.loads(out.stdout.strip().splitlines()[-1])
        return [Row("snapshot join", f"{total} keys", 1, secs, secs * 1e6, secs * 1e6,
                    note=f"{rss / keys:.0f} bytes RSS per key (incl. key+value)")]
    finally:
        b.stop()


def bench_compaction(q: bool) -> list[Row]:
    """How long compaction stalls the broker loop: the frozen view (dict copies) and the
    segment rotation happen on the loop; encoding and writing the snapshot on a thread."""
    from broker.core import BrokerCore
    from broker.durable import DurableLog
    from broker.protocol import SetMany
    from broker.recovery import recover

    rows = []
    for total in ([10_000] if q else [100_000, 1_000_000]):
        with tempfile.TemporaryDirectory() as d:
            log = DurableLog(d, compact_bytes=1 << 40)
            core = BrokerCore(log=log)
            recover(core, log)
            for start in range(0, total, 5000):
                core.begin_turn()
                req = SetMany(b"c" * 12, start + 1, "ns", 0,
                              [(f"k{i:07d}", b'{"i":1}') for i in range(start, start + 5000)])
                dec = core.decide(req, 0.0, 0.0)
                core.append_to_log(dec, 0.0, 1.0)
                core.commit(dec, 0.0)
                log.flush()
                core.end_turn()
            t = time.perf_counter()
            build = core.frozen_view(log.segment + 1, time.monotonic(), time.time())
            freeze = time.perf_counter() - t
            t = time.perf_counter()
            log.start_compaction(build)  # fsync + new segment + thread start
            stall = freeze + time.perf_counter() - t
            t2 = time.perf_counter()
            while log.compacting:
                log.finish_compaction()
                time.sleep(0.005)  # poll
            background = time.perf_counter() - t2
            log.close()
            rows.append(Row("compaction stall on the loop", f"{total} keys", 1, stall,
                            stall * 1e6, stall * 1e6,
                            note=f"freeze {freeze * 1e3:.1f} ms; snapshot written in the "
                                 f"background in {background:.2f} s"))
    return rows


WORKLOADS: dict[str, Callable[[bool], list[Row]]] = {
    "compaction": bench_compaction,
    "reads": bench_local_reads,
    "list_keys": bench_list_keys,
    "sets": bench_sets,
    "visibility": bench_visibility,
    "join": bench_join,
}


def print_table(rows: list[Row]) -> None:
    head = f"{'workload':34} {'variant':18} {'ops/s':>12} {'p50 us':>10} {'p99 us':>10}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        p50 = f"{r.p50_us:10.1f}" if r.p50_us is not None else " " * 10
        p99 = f"{r.p99_us:10.1f}" if r.p99_us is not None else " " * 10
        print(f"{r.workload:34} {r.variant:18} {r.ops_per_s:12.0f} {p50} {p99}  {r.note}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run for CI")
    p.add_argument("--only", nargs="*", choices=sorted(WORKLOADS), help="run just these")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args()
    rows: list[Row] = []
    for name in args.only or list(WORKLOADS):
        rows += WORKLOADS[name](args.quick)
    print(f"# sharedmem benchmarks {time.strftime('%Y-%m-%d')} on {platform.node()}: "
          f"{os.cpu_count()} cores, Python {platform.python_version()}"
          + (" (--quick)" if args.quick else ""))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"ops_per_s": r.ops_per_s}
                                               for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
