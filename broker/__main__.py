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

from broker.server import Broker, BrokerConfig
from broker.validation import scheme_hint

SUBCOMMANDS_HELP = """\
other commands:
  {prog} repair --data-dir DIR   truncate a corrupt log at its last good record
  {prog} keygen NAME [--dir DIR] create a CURVE key pair (DIR/NAME.key, DIR/NAME.key_secret)
  ({prog} repair --help, {prog} keygen --help for details)
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
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning",
                            "error"])
    return p.parse_args(argv)


def repair_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{prog_name()} repair",
                                description="Truncate a corrupt log at its last good record.")
    p.add_argument("--data-dir", required=True, metavar="DIR")
    args = p.parse_args(argv)
    from pathlib import Path

    from broker.durable import DataDirLocked
    from broker.recovery import repair

    try:
        lines = repair(Path(args.data_dir))
    except DataDirLocked as exc:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repair"]:
        return repair_main(argv[1:])
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
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
    broker = Broker(config)
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
    print(
        f"sharedmem broker ready epoch={broker.epoch} requests={','.join(broker.endpoints)} "
        f"events={','.join(broker.pub_endpoints)}",
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
