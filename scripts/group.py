"""``scripts/group [--dir DIR] [--lease-ttl S]``: a local broker group to try out.

Starts a 3-member etcd and three ``python -m broker --group local`` members on loopback ports
(data and logs under DIR, default a new temp dir; both printed), prints every child's PID, the
seed list (``SHAREDMEM_BROKER=tcp://...,tcp://...,tcp://...``) and then one line starting with
``sharedmem group ready``. Ctrl-C or SIGTERM stops everything it started, by PID. Needs
``etcd`` on PATH (the message says how to get it). docs/operations.md shows what to do with it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # node, broker, tests

from benchkit.localgroup import ETCD_HINT, GROUP, LocalGroup, have_etcd  # noqa: E402

from broker.protocol import StatsReply  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="data dirs and logs (default: a new temp dir)")
    p.add_argument("--lease-ttl", type=int, default=2, help="the members' --lease-ttl")
    args = p.parse_args(argv)
    if not have_etcd():
        print(f"scripts/group: {ETCD_HINT}", file=sys.stderr)
        return 2
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="sharedmem-group-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"sharedmem group: data and logs in {base}", flush=True)
    group = LocalGroup(base, lease_ttl=args.lease_ttl)
    try:
        group.start()
    except RuntimeError as exc:
        print(f"scripts/group: {exc}", file=sys.stderr)
        return 1
    try:
        assert group.etcd is not None
        for e in group.etcd.members:
            assert e.proc is not None
            print(f"etcd {e.name} pid {e.proc.pid} client {e.client_url}")
        for m in group.members:
            assert m.proc is not None
            print(f"broker {m.name} pid {m.proc.pid} requests {m.address} "
                  f"log {base / (m.name + '.log')}")
        found = group.primary()
        primary, stats = found if found else (None, None)
        term = stats.counters.get("group_term", 0) if isinstance(stats, StatsReply) else 0
        print(f"etcd endpoints: --etcd {group.etcd.endpoint_string} (group {GROUP})")
        print(f"SHAREDMEM_BROKER={group.seeds}")
        print(f"sharedmem group ready: primary {primary.name if primary else '?'} term {term} "
              f"pids {','.join(str(pid) for pid in group.pids())} (Ctrl-C stops everything)",
              flush=True)
        stop.wait()
    finally:
        group.stop()
        print("sharedmem group: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
