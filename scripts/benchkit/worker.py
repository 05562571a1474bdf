"""The child processes of a run, started as ``bench.py --worker MODE ARGS...`` (see
children.worker). Each prints ``ready`` once set up; writers then wait for ``go`` on stdin;
each prints its result as one JSON line on stdout."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from benchkit.harness import rss_bytes, sm_config, timed
from benchkit.peers import nats_kv
from node import SharedMemory


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


def sm_writer(address: str, n: str, name: str) -> None:
    """N acknowledged sets once told to go."""
    with _sm(address, "sets") as shm:
        _timed_writes(int(n), lambda i: shm.set(f"{name}_{i % 1000}", {"i": i}))


def redis_writer(port: str, n: str, name: str) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=int(port))
    _timed_writes(int(n), lambda i: r.set(f"{name}_{i % 1000}", json.dumps({"i": i})))


def sm_watch(address: str, namespace: str) -> None:
    """Latencies of the values set on "ping"."""
    with _sm(address, namespace) as shm, shm.watch("ping", initial=False) as w:
        print("ready", flush=True)
        lat, _ = _collect(_watch_values(w))
    print(json.dumps(lat), flush=True)


def redis_watch(port: str) -> None:
    """Keyspace notification for "ping", then GET."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=int(port))
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


def nats_watch(url: str, bucket: str) -> None:
    async def run() -> list[float]:
        nc, kv = await nats_kv(url, bucket, create=False)
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


def sm_fan(address: str, namespace: str) -> None:
    """One fan-out node: probe lag, gaps repaired, CPU used."""
    with _sm(address, namespace) as shm, shm.watch("probe", initial=False) as w:
        print("ready", flush=True)
        cpu = time.process_time()
        lat, seen = _collect(_watch_values(w))
        cpu = time.process_time() - cpu
        st = shm.status().namespace
    print(json.dumps({"lat": lat, "seen": seen, "repairs": st.repairs,
                      "resyncs": st.resyncs, "cpu": cpu}), flush=True)


def sm_join(address: str, namespace: str, traced: str = "0") -> None:
    """Join, report (seconds, RSS growth, keys, then the RSS growth after glibc's
    ``malloc_trim(0)``, or -1 where there is no glibc). ``traced`` "1": tracemalloc runs from
    before the join and the last number is instead the Python bytes still allocated after it
    (the join's seconds are then tracemalloc's, not comparable)."""
    import gc
    import tracemalloc

    import msgspec  # noqa: F401  -- imports are not the replica's cost
    import sortedcontainers  # noqa: F401
    import zmq  # noqa: F401

    if traced == "1":
        tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    before = rss_bytes()
    t = time.perf_counter()
    shm = SharedMemory(sm_config(namespace, address, connect_timeout=300))
    secs = time.perf_counter() - t
    grown = rss_bytes() - before
    keys = len(shm.list_keys())
    if traced == "1":
        gc.collect()
        last = tracemalloc.get_traced_memory()[0] - traced_before
    else:
        trimmed = _trimmed_rss()
        last = trimmed - before if trimmed >= 0 else -1
    print(json.dumps([secs, grown, keys, last]), flush=True)
    shm.close()


def _trimmed_rss() -> int:
    """RSS after glibc returned what it can of the freed heap to the OS (-1: no glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return -1
    return rss_bytes()


def echo() -> None:
    """A Python ROUTER echo loop: prints its port, echoes until stopped."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())


def fsync_primary(path: str, *standby_ports: str) -> None:
    """A ROUTER that appends and fsyncs each request, ships it to every standby first
    and replies once its own fsync and every standby's ack are in."""
    import zmq

    ctx = zmq.Context.instance()
    front = ctx.socket(zmq.ROUTER)
    links = []
    for port in standby_ports:
        s = ctx.socket(zmq.DEALER)
        s.connect(f"tcp://127.0.0.1:{port}")
        links.append(s)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    print(front.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    while True:
        frames = front.recv_multipart()
        for s in links:
            s.send(frames[-1])
        os.write(fd, frames[-1])
        os.fsync(fd)
        for s in links:
            s.recv()
        front.send_multipart(frames)


def fsync_standby(path: str) -> None:
    """A ROUTER that appends and fsyncs what the primary ships, then acks it."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    while True:
        peer, body = sock.recv_multipart()
        os.write(fd, body)
        os.fsync(fd)
        sock.send_multipart([peer, b"ack"])


MODES: dict[str, Callable[..., None]] = {
    "sm-writer": sm_writer,  # ADDRESS N NAME
    "redis-writer": redis_writer,  # PORT N NAME
    "sm-watch": sm_watch,  # ADDRESS NAMESPACE
    "redis-watch": redis_watch,  # PORT
    "nats-watch": nats_watch,  # URL BUCKET
    "sm-fan": sm_fan,  # ADDRESS NAMESPACE
    "sm-join": sm_join,  # ADDRESS NAMESPACE
    "echo": echo,
    "fsync-primary": fsync_primary,  # PATH STANDBY_PORT...
    "fsync-standby": fsync_standby,  # PATH
}


def worker_main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode not in MODES:
        print(f"unknown worker mode {mode!r}", file=sys.stderr)
        return 2
    MODES[mode](*args)
    return 0
