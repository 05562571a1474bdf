"""Where an acknowledged set's time goes, against an in-memory broker: a raw pyzmq REQ ->
Python ROUTER echo (the floor), a broker round trip that writes nothing (Head), then set()
split at the reply: until the reply is in, then until this node's replica shows the write
(applied from the reply's events, or waited for on the event stream), with and without the
writer's node applying its own events. The split needs names of node/ that are not public
(benchkit/internals.py); if they change, the split rows are skipped, not faked."""

from __future__ import annotations

import time

from benchkit.children import broker, stop, worker
from benchkit.harness import Ctx, Row, lat_row, phase, progress, sm_config, timed_row
from benchkit.internals import SetSplit, apply_own_writes, head_round_trip, own_apply_modes
from node import SharedMemory

WORKLOAD = "acknowledged set, where the time goes"


def bench_write_path(ctx: Ctx) -> list[Row]:
    n = 300 if ctx.quick else 5000
    phase("write path: echo floor, Head round trip, set() split")
    rows = [echo_floor(n)]
    with broker() as b, SharedMemory(sm_config("path", b.address)) as shm:
        rows.append(timed_row(WORKLOAD, "broker round trip (Head)", n,
                              head_round_trip(shm, "path"),
                              "node.request(Head): a round trip that writes nothing"))
        rows += set_split(shm, n)
    for r in rows:
        r.compare = False
    return rows


def echo_floor(n: int) -> Row:
    import zmq

    p, lines = worker("echo")
    try:
        port = int(lines.readline(60))
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        msg = b"x" * 60
        row = timed_row(WORKLOAD, "raw REQ->ROUTER echo", n,
                        lambda i: (sock.send(msg), sock.recv()),
                        "pyzmq REQ to a Python ROUTER echo loop: the floor")
        sock.close()
    finally:
        stop(p)
    return row


def set_split(shm: SharedMemory, n: int) -> list[Row]:
    with SetSplit(shm) as split:
        if not split.supported:
            progress("write path: node/ changed (no pool.call / wait_visible); split skipped")
            return [timed_row(WORKLOAD, "set(): total", n,
                              lambda i: shm.set(f"k{i % 1000}", {"i": i}))]
        rows = []
        parts = split.parts
        for own in own_apply_modes():
            split.reset()
            with apply_own_writes(shm, own):
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
            rows.append(lat_row(WORKLOAD, "set() total" + label, n / secs, total,
                                waits + ("; own apply = the writer's node applies the "
                                         "reply's events (APPLY_OWN_WRITES)" if own else "")))
            rows.append(lat_row(WORKLOAD, "  until the reply", None, sent,
                                "send, broker decides/applies/replies, reply decoded"))
            # The rest is client-side work (check, encode, build, reply check) plus making
            # the write visible here: applying the reply's events or waiting for the stream.
            rows.append(lat_row(WORKLOAD, "  the rest", None,
                                [a - s for a, s in zip(total, sent, strict=True)],
                                "key check + JSON encode + request build, then apply own "
                                "events or wait for the stream"))
    return rows
