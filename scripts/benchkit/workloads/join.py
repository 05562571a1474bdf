"""Snapshot join: a new node joins a namespace of many keys (time and memory), beside a Redis
replica's full sync of the same keys."""

from __future__ import annotations

import json
import time

from benchkit.children import broker, stop, worker
from benchkit.harness import SHAREDMEM, Ctx, Row, phase, rss_bytes, sm_config
from benchkit.peers import REDIS_CONF, RedisServer
from node import SharedMemory


def bench_join(ctx: Ctx) -> list[Row]:
    total = 20_000 if ctx.quick else 1_000_000
    workload = f"snapshot join, {total:,} keys"
    keys = [f"key{i:07d}" for i in range(total)]
    payload = sum(len(k) + len(json.dumps({"i": i}, separators=(",", ":")))
                  for i, k in enumerate(keys)) / total  # key + value bytes, per key
    rows = []
    phase(f"join: sharedmem, loading {total:,} keys")
    with broker() as b:
        cfg = sm_config("join", b.address, connect_timeout=300, request_timeout=120)
        with SharedMemory(cfg) as shm:
            for start in range(0, total, 5000):
                shm.set_many({keys[i]: {"i": i} for i in range(start, min(total, start + 5000))})
        p, lines = worker("sm-join", b.address, "join")
        try:
            secs, rss, got, trimmed = json.loads(lines.readline(600))
        finally:
            stop(p)
        # The same join again under tracemalloc (its time is not reported: tracing slows it).
        p, lines = worker("sm-join", b.address, "join", 1)
        try:
            _, _, traced_got, traced = json.loads(lines.readline(900))
        finally:
            stop(p)
    assert got == traced_got == total, (got, traced_got, total)
    trim = f", {trimmed / total - payload:.0f} after malloc_trim" if trimmed >= 0 else ""
    rows.append(Row(workload, SHAREDMEM, None, secs * 1e6, secs * 1e6,
                    f"{secs:.2f} s; node RSS {rss / total:.0f} B/key, "
                    f"{rss / total - payload:.0f} B/key beyond key+value ({payload:.0f} B){trim}; "
                    f"tracemalloc {traced / total - payload:.0f} B/key beyond key+value",
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
                    time.sleep(0.002)  # poll: the sync's end is timed to within 2 ms
                secs = time.perf_counter() - t
                rss = rss_bytes(replica.proc.pid) - before
                got = rc.dbsize()
        assert got == total, (got, total)
        rows.append(Row(workload, "redis replica", None, secs * 1e6, secs * 1e6,
                        f"{secs:.2f} s; REPLICAOF full sync (diskless master); replica RSS "
                        f"{rss / total:.0f} B/key, {rss / total - payload:.0f} beyond key+value",
                        better="latency"))
    return rows
