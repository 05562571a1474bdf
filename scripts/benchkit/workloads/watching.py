"""Watching from another process: how soon a write on A is visible on B, and the lag of many
watching nodes under a steady write rate (fan-out)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from benchkit.children import Lines, broker, stop, worker
from benchkit.harness import SHAREDMEM, STOP_SAMPLE, Ctx, Row, lat_row, phase, sm_config
from benchkit.peers import REDIS_CONF, NatsServer, RedisServer, nats_kv
from node import SharedMemory

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
    with broker() as b, SharedMemory(sm_config("vis", b.address)) as shm:
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


def bench_fanout(ctx: Ctx) -> list[Row]:
    """N node processes watch one namespace while one writer keeps a steady rate of key
    writes, in set_many batches of ``batch`` keys; each batch carries a ``probe`` key with the
    issue time, and every node records probe lag (write issued -> node's watch yields it)."""
    nodes, rate, seconds = (4, 2000, 2.0) if ctx.quick else (20, 10_000, 10.0)
    batch = 50
    workload = f"fan-out, {nodes} nodes at {rate:,} writes/s"
    phase(f"fanout: {nodes} node processes, {rate:,} writes/s for {seconds:.0f}s")
    with broker() as b, SharedMemory(sm_config("fan", b.address)) as shm:
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
