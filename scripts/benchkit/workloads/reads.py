"""Local reads (get, exists, get_metadata) and list_keys with a prefix pattern."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from benchkit.children import broker
from benchkit.harness import (
    SHAREDMEM,
    VALUE,
    Ctx,
    Row,
    lat_row,
    local_row,
    phase,
    sm_config,
    timed_row,
)
from benchkit.peers import REDIS_CONF, NatsServer, RedisServer, nats_kv
from node import SharedMemory

GET = "get small JSON (fresh copy)"
EXISTS = "exists"
METADATA = "get_metadata"


def redis_calls(client: Any, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def bench_reads(ctx: Ctx) -> list[Row]:
    n = 50_000 if ctx.quick else 1_000_000
    rows = []
    phase("reads: sharedmem")
    with broker() as b, SharedMemory(sm_config("reads", b.address)) as shm:
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


def bench_list_keys(ctx: Ctx) -> list[Row]:
    total = 20_000 if ctx.quick else 1_000_000
    workload = f"list_keys prefix, 100 hits of {total:,} keys"
    pattern = "k00001*"  # k0000100 .. k0000199
    rows = []
    phase(f"list_keys: sharedmem, loading {total:,} keys")
    with broker() as b:
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
