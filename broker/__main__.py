"""``python -m broker``: run a broker until SIGTERM/SIGINT.

Prints exactly one line to stdout when ready (``sharedmem broker ready epoch=... requests=...
events=...``) so scripts and tests can wait for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from broker.server import Broker, BrokerConfig
from broker.validation import scheme_hint

SUBCOMMANDS_HELP = """\
other commands:
  {prog} repair --data-dir DIR   make a data dir that start-up refuses startable again
  {prog} keygen NAME [--dir DIR] create a CURVE key pair (DIR/NAME.key, DIR/NAME.key_secret)
  {prog} switchover --group G --etcd URLS --to MEMBER
                                 hand a group's leadership to an in-sync standby
  ({prog} repair --help, {prog} keygen --help, {prog} switchover --help for details)
"""


def prog_name() -> str:
    """What the user typed: ``sharedmem-broker`` for the console script, else the module."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("sharedmem-broker") else "python -m broker"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("sharedmem")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _endpoint(text: str) -> str:
    """An endpoint with its scheme; a bare ``host:port`` gets a hint instead of EINVAL."""
    if "://" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} has no scheme: an endpoint is "
                                         f"tcp://HOST:PORT (or ipc://PATH){scheme_hint(text)}")
    return text

if TYPE_CHECKING:
    from broker.coordination import EtcdTLS
    from broker.group_shell import GroupShell


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    prog = prog_name()
    p = argparse.ArgumentParser(prog=prog, description="Run a sharedmem broker.",
                                epilog=SUBCOMMANDS_HELP.format(prog=prog),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sharedmem-broker {version()}")
    p.add_argument("--bind", action="append", metavar="ENDPOINT", type=_endpoint,
                   help="request endpoint tcp://HOST:PORT (repeatable); default "
                        "tcp://127.0.0.1:7400")
    p.add_argument("--pub-bind", action="append", metavar="ENDPOINT", type=_endpoint,
                   help="event endpoint (repeatable); default: each --bind's port + 1")
    p.add_argument("--heartbeat", type=float, default=0.5, metavar="SECONDS",
                   help="heartbeat interval on the event stream (default 0.5)")
    p.add_argument("--max-value-bytes", type=int, default=1024 * 1024)
    p.add_argument("--data-dir", metavar="DIR",
                   help="persist the log here (default: in memory only, lost on exit)")
    p.add_argument("--fsync", choices=["always", "everysec", "no"], default="always",
                   help="when the log is fsynced (default always: before any reply)")
    p.add_argument("--compact-bytes", type=int, default=64 * 1024 * 1024, metavar="N",
                   help="snapshot and start a new segment when one grows past N bytes")
    p.add_argument("--hwm", type=int, default=200_000, metavar="N",
                   help="high-water mark of the request router and, per subscriber, of the "
                        "publisher (messages; default 200000)")
    p.add_argument("--log-retention", type=int, default=100_000, metavar="N",
                   help="events per namespace kept in memory for gap repair (default 100000)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics and a health "
                        "check on /healthz (200 serving, 503 not); needs prometheus_client "
                        "(pip install 'sharedmem[metrics]')")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics endpoint listens on (default 127.0.0.1; "
                        "0.0.0.0 for every interface: it has no authentication, and shows "
                        "namespace names and counts)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with the broker's CURVE key and the clients' keys and "
                        "permissions (docs/security.md); enables authentication")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without --config (no authentication!)")
    g = p.add_argument_group("broker group (docs/groups.md); needs --data-dir and --etcd")
    g.add_argument("--group", metavar="NAME", help="run as a member of this broker group")
    g.add_argument("--member", metavar="NAME",
                   help="this member's name in the group (default: HOST:PORT of the first "
                        "--bind)")
    g.add_argument("--etcd", metavar="URLS",
                   help="etcd endpoints, http://H:2379[,http://H2:2379,...] (https:// with "
                        "the --etcd-* TLS flags)")
    add_etcd_tls_flags(g)
    g.add_argument("--lease-ttl", type=int, default=2, metavar="SECONDS",
                   help="TTL of the leader lease (default 2): how fast a failover starts")
    g.add_argument("--min-sync", type=int, default=1, metavar="K",
                   help="never acknowledge with fewer than K standbys in the sync set "
                        "(default 1)")
    g.add_argument("--repl-bind", metavar="ENDPOINT",
                   help="replication endpoint (default: the first --bind's port + 2)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning",
                            "error"])
    return p.parse_args(argv)


def add_etcd_tls_flags(group: Any) -> None:
    """etcdctl's TLS flags, prefixed: ``--etcd-cacert``, ``--etcd-cert``, ``--etcd-key``."""
    group.add_argument("--etcd-cacert", metavar="FILE",
                       help="CA certificate (PEM) that signed etcd's server certificates, for "
                            "https:// endpoints (default: the system's trust store)")
    group.add_argument("--etcd-cert", metavar="FILE",
                       help="this broker's client certificate (PEM) for etcd's "
                            "--client-cert-auth; with --etcd-key")
    group.add_argument("--etcd-key", metavar="FILE",
                       help="the private key (PEM) of --etcd-cert")


def etcd_tls(args: argparse.Namespace) -> EtcdTLS | None:
    """The EtcdTLS of the flags (None when none is given). Raises ValueError naming the flag."""
    if args.etcd_cacert is None and args.etcd_cert is None and args.etcd_key is None:
        return None
    from broker.coordination import EtcdTLS

    return EtcdTLS(args.etcd_cacert, args.etcd_cert, args.etcd_key)


def repair_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"{prog_name()} repair",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make a data directory that start-up refuses startable again, and\n"
                    "print what changed:\n"
                    "- an unreadable newest snapshot is renamed to *.bad and the state is\n"
                    "  recovered from the older snapshot generation compaction keeps\n"
                    "  (nothing is lost);\n"
                    "- a corrupt log record: its segment is truncated at the last good\n"
                    "  record and every later segment removed (what goes was acknowledged\n"
                    "  once: a new epoch is started so nodes resync);\n"
                    "- a bad segment header is rewritten (its records are kept);\n"
                    "- a missing segment: every segment after the gap is removed.\n"
                    "Stop the broker first (repair takes the directory's lock). Exit 1 when\n"
                    "the directory is in use, or no readable snapshot generation is left\n"
                    "(restore from a backup then).")
    p.add_argument("--data-dir", required=True, metavar="DIR")
    args = p.parse_args(argv)
    from pathlib import Path

    from broker.durable import CorruptLog, DataDirLocked
    from broker.recovery import repair

    try:
        lines = repair(Path(args.data_dir))
    except (DataDirLocked, CorruptLog) as exc:
        print(f"broker repair: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def keygen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{prog_name()} keygen",
                                description="Create a CURVE key pair: DIR/NAME.key (public, "
                                            "give it out) and DIR/NAME.key_secret (keep it).")
    p.add_argument("name")
    p.add_argument("--dir", default="keys")
    args = p.parse_args(argv)
    from broker.security import keygen

    public, secret = keygen(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (mode 600; never share it)")
    return 0


def switchover_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"{prog_name()} switchover",
        description="Hand a broker group's leadership to a named in-sync standby with no "
                    "acknowledged write lost (docs/operations.md). Exit 0 when it is primary, "
                    "2 when refused (nothing changed), 1 when it did not happen in time.")
    p.add_argument("--group", required=True)
    p.add_argument("--etcd", required=True, metavar="URLS",
                   help="http://HOST:2379[,http://HOST2:2379,...] (or https://)")
    add_etcd_tls_flags(p)
    p.add_argument("--to", required=True, metavar="MEMBER", help="the standby to lead next")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds the primary may wait for the standby's acks (default 10)")
    args = p.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    from broker.coordination import CoordinationError
    from broker.switchover import SwitchoverFailed, SwitchoverRefused, switchover

    try:
        config = switchover(args.etcd, args.group, args.to, args.timeout, tls=etcd_tls(args))
    except (SwitchoverRefused, ValueError) as exc:
        print(f"broker switchover: refused: {exc}", file=sys.stderr)
        return 2
    except (SwitchoverFailed, CoordinationError) as exc:
        print(f"broker switchover: failed: {exc}", file=sys.stderr)
        return 1
    print(f"switchover done: {config.primary} is the primary of group {args.group}, "
          f"term {config.term}")
    return 0


def group_shell(args: argparse.Namespace, broker: Broker) -> GroupShell:
    """The GroupShell of ``--group`` (imported only then: etcd stays off the single path).
    Raises ValueError saying which option is wrong."""
    if not args.data_dir:
        raise ValueError("--group requires --data-dir (a member's log must be durable)")
    if not args.etcd:
        raise ValueError("--group requires --etcd http://HOST:2379[,...]")
    if args.fsync != "always":
        # WriteOk means "on the disk of the primary and of the sync set"; and a crash under a
        # laxer policy makes recovery start a new epoch, which a group cannot mix.
        raise ValueError(f"--group requires --fsync always, got {args.fsync!r}")
    from broker.coordination import check_name, parse_endpoints
    from broker.group_shell import GroupSettings, GroupShell

    bind = broker.config.bind[0]
    member = args.member or bind.removeprefix("tcp://")
    settings = GroupSettings(
        group=check_name("group", args.group), member=check_name("member", member),
        etcd=parse_endpoints(args.etcd), lease_ttl=args.lease_ttl, min_sync=args.min_sync,
        repl_bind=args.repl_bind, etcd_tls=etcd_tls(args))
    from broker.group_shell import default_repl_endpoint
    from broker.security import is_loopback_endpoint

    repl = settings.repl_bind or default_repl_endpoint(bind)  # raises without a fixed port
    security = broker.config.security
    if security is not None:
        # With --config the link is CURVE between listed member keys (docs/security.md).
        own = security.members.get(settings.member)
        if own is None:
            raise ValueError(f"--config lists no [members.{settings.member}]: a group member "
                             "needs its own key among the group's members")
        if own != security.public_key:
            raise ValueError(f"--config: [members.{settings.member}] is not the key of this "
                             "broker's secret_key_file")
    elif not is_loopback_endpoint(repl) and not args.insecure:
        raise ValueError(f"refusing a replication endpoint {repl} off loopback without "
                         "--config (CURVE between member keys); use --insecure to accept that "
                         "anyone who reaches it can read the whole state")
    return GroupShell(settings, broker)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repair"]:
        return repair_main(argv[1:])
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    if argv[:1] == ["switchover"]:
        return switchover_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    security = None
    bind = args.bind
    if args.config:
        from broker.security import SecurityConfigError, load_security

        try:
            security, table = load_security(args.config)
        except SecurityConfigError as exc:
            print(f"broker: --config: {exc}", file=sys.stderr)
            return 2
        bind = bind or table.get("bind")
    try:
        config = BrokerConfig(
            bind=bind or ["tcp://127.0.0.1:7400"],
            security=security,
            insecure=args.insecure,
            pub_bind=args.pub_bind,
            heartbeat_interval=args.heartbeat,
            max_value_bytes=args.max_value_bytes,
            data_dir=args.data_dir,
            fsync=args.fsync,
            compact_bytes=args.compact_bytes,
            hwm=args.hwm,
            log_retention=args.log_retention,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
    except ValueError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port is not None:
        from broker.metrics import require_prometheus_client

        try:
            require_prometheus_client()
        except RuntimeError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return 2
    if not args.data_dir:
        logging.getLogger("sharedmem.broker").warning(
            "no --data-dir: this broker keeps everything in memory; every namespace and key is "
            "LOST when it stops or restarts (nodes then meet a new epoch). Pass --data-dir DIR "
            "for a durable log (scripts/broker does)")
    group_flags = [f for f, v in (("--member", args.member), ("--etcd", args.etcd),
                                  ("--etcd-cacert", args.etcd_cacert),
                                  ("--etcd-cert", args.etcd_cert), ("--etcd-key", args.etcd_key),
                                  ("--repl-bind", args.repl_bind)) if v is not None]
    if args.group is None and group_flags:
        print(f"broker: {', '.join(group_flags)} need --group", file=sys.stderr)
        return 2
    broker = Broker(config)
    if args.group is not None:
        try:
            broker.group = group_shell(args, broker)
        except ValueError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        broker.start(timeout=24 * 3600.0)  # recovery of a large data dir may take a while
    except Exception as exc:  # noqa: BLE001 - report bind errors plainly
        print(f"broker: cannot start: {exc}", file=sys.stderr)
        return 1
    group = broker.group
    extra = "" if group is None else f" group={args.group} member={group.member} " \
        f"replication={group.repl_endpoint}"
    print(
        f"sharedmem broker ready epoch={broker.epoch} requests={','.join(broker.endpoints)} "
        f"events={','.join(broker.pub_endpoints)}{extra}",
        flush=True,
    )
    while not stop.wait(0.5):
        if broker.stopped:  # loop died: exit non-zero
            return 1
    broker.stop()
    logging.getLogger("sharedmem.broker").info("broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
