"""Acknowledged writes: set from 1 writer and from 4 writer processes, and set_many of 100
keys, per durability variant (in memory, fsync always; the full run adds everysec and no)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time

from benchkit.children import broker, go, stop, worker
from benchkit.harness import SHAREDMEM, Ctx, Row, lat_row, phase, sm_config, timed_row
from benchkit.peers import REDIS_CONF, NatsServer, RedisServer, nats_kv
from node import SharedMemory

# Broker arguments, one per durability variant (Redis's are peers.REDIS_CONF).
BROKER_ARGS = {
    "in memory": [],
    "fsync always": ["--fsync", "always"],
    "fsync everysec": ["--fsync", "everysec"],
    "fsync no": ["--fsync", "no"],
}


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
            with broker(*args, *(["--data-dir", d] if args else [])) as b:
                rows += sm_writes(b.address, variant, n)
        if ctx.peers.redis_server:
            phase(f"sets: redis, {variant}")
            with RedisServer(ctx.peers.redis_server, *REDIS_CONF[variant]) as rs:
                rows += redis_writes(rs, variant, n)
        if variant == "fsync always":
            from benchkit.workloads.group import group_rows

            rows += group_rows(ctx, n, rows)
        if ctx.peers.nats_server and variant == "in memory":
            phase(f"sets: nats, {variant}")
            with NatsServer(ctx.peers.nats_server) as ns:
                rows += nats_writes(ns.url, variant, n)
    return rows
