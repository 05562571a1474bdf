"""The floor under a broker group's commit on this machine, with no sharedmem code at all: a
raw pyzmq REQ -> ROUTER round trip to a "primary" that appends the request to a file and
fsyncs it, with 0, 1 or 2 "standbys" that receive each request over DEALER -> ROUTER, append,
fsync and ack, in parallel with the primary's own fsync; the reply waits for every ack (the
commit rule of docs/groups.md with both standbys in the sync set, as the group rows run).

What the 3-copy row adds to the 1-copy row's p50 is the least a commit to a group of 3 can
add to a single broker's write here, whatever the broker does in Python: so the least
group/single ratio of the `sets` rows is 1 + (that extra) / (the single broker's fsync-always
set p50), against issue 10's target of 1.5x (docs/benchmarks.md). All copies share this VM's
one disk and two cores, so their fsyncs do not overlap as they would on three hosts."""

from __future__ import annotations

import os
import tempfile

from benchkit.children import stop, worker
from benchkit.harness import Ctx, Row, phase, timed_row

WORKLOAD = "replication floor: pyzmq + fsync only"
SYSTEMS = {0: "1 copy (no standby)", 1: "2 copies (1 standby)", 2: "3 copies (2 standbys)"}


def bench_replication_floor(ctx: Ctx) -> list[Row]:
    n = 300 if ctx.quick else 3000
    phase("replication floor: REQ -> ROUTER + fsync, with 0, 1 and 2 fsyncing standbys")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sharedmem-bench-floor-") as d:
        rows.append(fsync_alone(os.path.join(d, "alone.log"), n))
        for standbys in (0, 1, 2):
            children, ports = [], []
            try:
                for k in range(standbys):
                    p, lines = worker("fsync-standby", os.path.join(d, f"standby{k}-{standbys}"))
                    children.append(p)
                    ports.append(int(lines.readline(60)))
                p, lines = worker("fsync-primary", os.path.join(d, f"primary-{standbys}"),
                                  *ports)
                children.append(p)
                rows.append(round_trips(int(lines.readline(60)), SYSTEMS[standbys], n))
            finally:
                for p in children:
                    stop(p)
    base = rows[1].p50_us
    for r in rows[2:]:
        if base and r.p50_us:
            r.note = f"p50 +{r.p50_us - base:,.0f} us over 1 copy ({r.p50_us / base:.2f}x)"
    rows[1].note = "pyzmq echo + os.write + os.fsync in one Python process"
    for r in rows:
        r.compare = False
    return rows


def round_trips(port: int, system: str, n: int) -> Row:
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    msg = b"x" * 100
    try:
        sock.send(msg)
        sock.recv()  # the links are up before the clock starts
        return timed_row(WORKLOAD, system, n, lambda i: (sock.send(msg), sock.recv()))
    finally:
        sock.close()


def fsync_alone(path: str, n: int) -> Row:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        row = timed_row(WORKLOAD, "os.write + os.fsync alone", n,
                        lambda i: (os.write(fd, b"x" * 100), os.fsync(fd)))
    finally:
        os.close(fd)
    row.note = "no socket: this disk's fsync"
    return row
