"""``sharedmem`` / ``python -m node``: the command-line interface to a running broker.

Every command connects to a broker over the network (``--broker``, ``$SHAREDMEM_BROKER``, else
``tcp://127.0.0.1:7400``); the CLI never starts the embedded in-process broker, whose data
would vanish with the command. Reads (get, ls, meta, dump, watch) never create a namespace;
writes (set, load) create it if missing. Errors are one line on stderr and an exit code (see
``EXIT_CODES_HELP``); data goes to stdout only.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any, NamedTuple, TypeVar

import msgspec
import zmq

from broker.errors import (
    AccessDenied,
    BrokerUnavailable,
    InvalidKey,
    InvalidValue,
    KeyNotFound,
    PatternError,
    SharedMemoryError,
    StorageError,
    error_from_kind,
)
from broker.pattern import compile_pattern
from broker.protocol import (
    Delete,
    DeletePattern,
    DropNamespace,
    Error,
    Read,
    ReadEntry,
    ReadReply,
    SetMaxKeys,
    StatsReply,
    Touch,
    WriteOk,
)
from broker.validation import check_key, check_namespace, encode_value, has_scheme, scheme_hint
from node import admin
from node.api import SharedMemory
from node.config import SharedMemoryConfig, to_seconds
from node.node import Node, acquire_node, release_node
from node.watch import INITIAL_DONE, ChangeEvent

DEFAULT_BROKER = "tcp://127.0.0.1:7400"
DEFAULT_BATCH = 1000
DUMP_CHUNK = 1000  # keys per broker-side read of a dump
PROGRESS_MIN_KEYS = 10_000  # below this, no progress counter even on a terminal

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_REFUSED = 4
EXIT_DENIED = 5
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0  ok
  1  not found: get/meta/del of a missing (or expired) key; get/meta/del/ls/dump in a
     namespace (-n) that does not exist
  2  usage or invalid input: bad arguments, invalid key/namespace/value/pattern, bad JSON
  3  broker unavailable (connection refused, or no answer within --timeout)
  4  refused by the broker: StorageError, including VersionConflict (--if-version) and a
     --max-keys that differs from the existing namespace's
  5  access denied
  130 interrupted (Ctrl-C) -- except `watch`, which exits 0 on SIGINT/SIGTERM

environment:
  SHAREDMEM_BROKER           default for --broker (else tcp://127.0.0.1:7400)
  SHAREDMEM_CURVE_KEY_FILE   default for --curve-key-file
  SHAREDMEM_BROKER_KEY_FILE  default for --broker-key-file
"""

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode


class CliError(Exception):
    """A failure with its exit code; printed as ``sharedmem: <message>``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- argument parsing


def version() -> str:
    """The installed distribution's version (one source: pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("sharedmem")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


_N = TypeVar("_N", int, float)


def _not_zero(value: _N, message: str) -> _N:
    if value == 0:
        raise argparse.ArgumentTypeError(message)
    return value


def _positive_int(text: str) -> int:
    return _not_zero(_non_negative_int(text), "expected an integer > 0, got 0")


def _seconds_arg(text: str) -> float:
    """Seconds from the command line, checked by the same rule as SharedMemoryConfig."""
    try:
        v = to_seconds("seconds", float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got "
                                         f"{text!r}" if "could not convert" in str(exc)
                                         else str(exc)) from None
    assert v is not None
    return v


def _timeout_arg(text: str) -> float:
    return _not_zero(_seconds_arg(text), "timeout must be > 0")


def _add_global_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, accepted before or after the command name.

    On the subcommand parsers the defaults are SUPPRESS, so an option given only before the
    command is not overwritten by the subparser's default."""

    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("connection and output options (also accepted before the command)")
    g.add_argument("--broker", metavar="ENDPOINT", default=d(None),
                   help="broker request endpoint (default: $SHAREDMEM_BROKER, else "
                        f"{DEFAULT_BROKER})")
    g.add_argument("-n", "--namespace", default=d("shared"),
                   help="namespace to use (default: shared)")
    g.add_argument("--max-keys", type=_non_negative_int, metavar="N", default=d(None),
                   help="the namespace's capacity, 0 = unlimited. Default: the existing "
                        "namespace's value (asked from the broker), or 0 when a write creates "
                        "it. A value differing from an existing namespace's is refused (exit 4)")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="machine-readable output for get, set, ls, meta, stats and load")
    g.add_argument("--raw", action="store_true", default=d(False),
                   help="get: a string value printed as is (no quotes, no escapes), any other "
                        "value as compact JSON, one value per line")
    g.add_argument("--timeout", type=_timeout_arg, metavar="SECONDS", default=d(10.0),
                   help="deadline for reaching the broker and for each request (default 10)")
    g.add_argument("--curve-key-file", metavar="FILE", default=d(None),
                   help="CURVE authentication: this client's NAME.key_secret (default: "
                        "$SHAREDMEM_CURVE_KEY_FILE); needs --broker-key-file")
    g.add_argument("--broker-key-file", metavar="FILE", default=d(None),
                   help="CURVE authentication: the broker's public NAME.key (default: "
                        "$SHAREDMEM_BROKER_KEY_FILE)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sharedmem",
        description="Command-line client of a sharedmem broker: read, write, watch, dump and "
                    "load the keys of a namespace.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sharedmem {version()}")
    _add_global_options(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, help_text: str, description: str | None = None, *,
            takes: str = "") -> argparse.ArgumentParser:
        """A subcommand; ``takes`` "KEY" or "PATTERN" adds that positional argument."""
        sp = sub.add_parser(name, help=help_text, description=description or help_text,
                            epilog=EXIT_CODES_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_global_options(sp, suppress=True)
        if takes == "KEY":
            sp.add_argument("key", metavar="KEY")
        elif takes == "PATTERN":
            sp.add_argument("pattern", metavar="PATTERN", nargs="?", default="*")
        return sp

    cmd("get", "print the JSON value of KEY",
        "Print the JSON value of KEY (indented; compact on one line with --json). "
        "Exit 1 if the key is absent or expired.",
        takes="KEY")

    sp = cmd("set", "store a JSON value under KEY",
             "Store a JSON value under KEY, from the JSON argument or, when it is omitted, from "
             "stdin. Prints the key's new version. Creates the namespace if missing.",
             takes="KEY")
    sp.add_argument("value", metavar="JSON", nargs="?",
                    help="the value as JSON, e.g. '{\"state\": \"todo\"}' or '\"text\"'; "
                         "read from stdin when omitted")
    sp.add_argument("--ttl", type=_seconds_arg, default=0.0, metavar="SECONDS",
                    help="time to live in seconds (default 0 = never expires)")
    sp.add_argument("--if-version", type=_non_negative_int, metavar="N",
                    help="compare-and-set: write only if the key is at version N "
                         "(0 = only if absent); otherwise VersionConflict, exit 4")

    sp = cmd("del", "delete KEY (or every key matching --pattern)",
             "Delete KEY; exit 1 if it did not exist (or had expired). With --pattern GLOB "
             "instead: delete every key matching GLOB in one atomic batch (every node sees all "
             "of them go at once) and print how many; at most 100000 keys per call (more is "
             "refused whole, exit 4). Needs write permission.")
    sp.add_argument("key", metavar="KEY", nargs="?")
    sp.add_argument("--pattern", metavar="GLOB",
                    help="delete the keys matching GLOB (the 'ls' syntax) instead of one KEY")
    sp.add_argument("--if-version", type=_non_negative_int, metavar="N",
                    help="delete only if the key is at version N, else VersionConflict (exit 4)")

    sp = cmd("mget", "print the JSON values of several keys as one object",
             "Print {key: value} of the KEYs that hold a value, read together at one version "
             "(indented; one line with --json). Keys that are absent are named on stderr, "
             "exit 1.")
    sp.add_argument("keys", metavar="KEY", nargs="+")

    sp = cmd("touch", "give KEY a new time to live",
             "Give KEY a new TTL of SECONDS from now (0 = never expires) without rewriting its "
             "value or version. Exit 1 if the key is absent.",
             takes="KEY")
    sp.add_argument("ttl", metavar="SECONDS", type=_seconds_arg)

    cmd("drop", "delete every key of the namespace (admin)",
        "Delete every key of the namespace (-n) in one atomic batch and print how many. "
        "The namespace itself stays, with its max_keys and version counter (connected "
        "nodes keep working). Needs admin permission. Exit 1 if it does not exist.")

    sp = cmd("max-keys", "print or change the namespace's max_keys (admin to change)",
             "Without N: print the namespace's max_keys (0 = unlimited). With N: change it for "
             "every node (it is logged, so it survives restarts); refused (exit 4) when the "
             "namespace holds more than N keys. Changing needs admin permission; creates the "
             "namespace if missing.")
    sp.add_argument("limit", metavar="N", nargs="?", type=_non_negative_int)

    cmd("ls", "list the keys matching PATTERN, one per line",
        "List the keys matching the glob PATTERN (default *), sorted, one per line "
        "(a JSON array with --json). Globs: * ? [a-z] [!a] and \\ escapes.",
        takes="PATTERN")

    cmd("meta", "print the metadata of KEY",
        "Print the metadata of KEY as 'name: value' lines (a JSON object with --json): "
        "version, size, created_at, last_modified, expires_at, ttl. Exit 1 if absent.",
        takes="KEY")

    sp = cmd("watch", "print every change of the keys matching PATTERN as JSON lines",
             "Print one JSON object per line for every change of a key matching PATTERN "
             "(default *): {key, op, version, value, modified_at, initial, resync}; op is set, "
             "delete, expire or touch. First the current values (initial=true), then a line "
             "with op 'initial_done', then live changes, until SIGINT/SIGTERM (exit 0). A line "
             "'watching ...' on stderr says when the watch is in place. If the namespace does "
             "not exist yet, waits for it to be created (unless --max-keys is given, which "
             "creates it).",
             takes="PATTERN")
    sp.add_argument("--from-version", type=_non_negative_int, metavar="N",
                    help="instead of the current values, first replay the changes after "
                         "version N from the broker's log (current values marked resync=true "
                         "if the log no longer has them)")
    sp.add_argument("--no-initial", action="store_true",
                    help="skip the current values and the initial_done line; live changes only")

    cmd("stats", "print the broker's counters and namespaces",
        "Print the broker's epoch, counters (writes, events, duplicates, refused, snapshots, "
        "fetches, expired) and every namespace's keys, seq and max_keys.")

    sp = cmd("dump", "write the keys matching PATTERN as JSON lines to stdout",
             "Write one JSON object per line, {\"key\": ..., \"value\": ..., \"ttl\": remaining "
             "seconds or null}, for every key matching PATTERN (default *), in key order. "
             "The output is what 'load' reads. With --all: every namespace this client may "
             "read (-n is ignored), each behind a line {\"namespace\": ..., \"max_keys\": ...}; "
             "'load --all' reads that. Versions and timestamps are not kept (see "
             "docs/operations.md).",
             takes="PATTERN")
    sp.add_argument("--all", action="store_true",
                    help="dump every namespace, each behind a namespace line")

    sp = cmd("load", "write the JSON lines of a dump from stdin into the namespace",
             "Read JSON lines {\"key\": ..., \"value\": ..., \"ttl\": seconds or null} from "
             "stdin (the output of 'dump') and write them with set_many in atomic batches. "
             "All lines are checked before anything is written; a later line for the same key "
             "wins. TTLs are rounded up to 1 s (0.1 s below 10 s) so keys can share a batch. "
             "Creates the namespace if missing. With --all: read the output of 'dump --all' and "
             "load every namespace it names (-n is ignored); a namespace the broker lacks is "
             "created with the dump's max_keys.")
    sp.add_argument("--all", action="store_true",
                    help="load every namespace of a 'dump --all'")
    sp.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH, metavar="N",
                    help=f"keys per set_many batch (default {DEFAULT_BATCH})")
    return p


# --------------------------------------------------------------------------- connection


class Session:
    """One command's connection: a node for the broker and, when needed, one namespace."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.address: str = args.broker or os.environ.get("SHAREDMEM_BROKER") or DEFAULT_BROKER
        if not has_scheme(self.address, ("tcp://", "ipc://")):
            hint = scheme_hint(self.address)
            if self.address == "embedded":
                hint = (" ('embedded' is a process's in-process broker, which no other "
                        "process can reach)")
            raise CliError(EXIT_USAGE,
                           f"--broker must be 'tcp://HOST:PORT' (or ipc://PATH), got "
                           f"{self.address!r}{hint}")
        self.namespace: str = check_namespace(args.namespace)
        self.max_keys: int | None = args.max_keys
        self.timeout: float = args.timeout
        self.retry_interval = min(1.0, self.timeout)
        # What every SharedMemoryConfig of this command shares (besides namespace/max_keys).
        self.base: dict[str, Any] = {
            "broker": self.address, "request_timeout": self.timeout,
            "connect_timeout": self.timeout, "retry_interval": self.retry_interval,
        }
        key_file = args.curve_key_file or os.environ.get("SHAREDMEM_CURVE_KEY_FILE")
        broker_key = args.broker_key_file or os.environ.get("SHAREDMEM_BROKER_KEY_FILE")
        self.curve: Any = None
        if key_file or broker_key:
            self.base.update(curve_key_file=key_file, broker_key_file=broker_key)
            config = SharedMemoryConfig(**self.base)
            self.curve = config.curve_keys()  # ValueError (exit 2) if a key is unreadable
        self._node: Node | None = None
        self.shm: SharedMemory | None = None

    def node(self) -> Node:
        if self._node is None:
            kw: dict[str, Any] = {} if self.curve is None else {"curve": self.curve}
            self._node = acquire_node(self.address, zmq.Context.instance(),
                                      connect_timeout=self.timeout,
                                      retry_interval=self.retry_interval, **kw)
        return self._node

    def stats(self) -> StatsReply:
        return admin.stats(self.node(), time.monotonic() + self.timeout)

    def namespace_info(self) -> dict[str, int] | None:
        """The namespace's entry in Stats, or None if it does not exist.

        A broker with access control leaves out the namespaces this client may not read; a
        Head request then tells "absent" from "not yours" (AccessDenied), creating nothing."""
        info = self.stats().namespaces.get(self.namespace)
        if info is None:
            admin.head(self.node(), self.namespace, time.monotonic() + self.timeout)
        return info

    def read(self, kind: str, keys: list[str] | None = None, pattern: str = "*") -> ReadReply:
        """A read answered from the broker's state: no replica, so a one-shot command never
        copies the namespace. KeyNotFound (exit 1) if the namespace does not exist."""
        reply = self.node().request(Read(self.namespace, kind, keys or [], pattern),
                                    time.monotonic() + self.timeout)
        if isinstance(reply, Error):
            raise error_from_kind(reply.kind, reply.message)
        if not isinstance(reply, ReadReply):
            raise StorageError(f"unexpected reply to Read: {type(reply).__name__}")
        if not reply.found:
            raise _missing_namespace(self)
        if self.max_keys is not None and reply.max_keys != self.max_keys:
            raise self._max_keys_differ(reply.max_keys)
        return reply

    def _max_keys_differ(self, actual: int) -> CliError:
        # The API would adopt the namespace's limit with a warning; a command that names a
        # limit explicitly is refused instead, so a script notices.
        return CliError(EXIT_REFUSED, (
            f"StorageError: namespace {self.namespace!r} exists with max_keys="
            f"{actual}; --max-keys asked for max_keys={self.max_keys} "
            "(the first opener sets the limit; leave --max-keys out to use it)"))

    def write(self, build: Any) -> WriteOk:
        """A write sent without opening a replica (``build(client_id, request_no)``)."""
        reply = self.node().write(self.namespace, build, time.monotonic() + self.timeout)
        if isinstance(reply, Error):
            raise error_from_kind(reply.kind, reply.message, reply.current_version)
        if not isinstance(reply, WriteOk):
            raise StorageError(f"unexpected reply to a write: {type(reply).__name__}")
        return reply

    def open(self, *, create: bool) -> SharedMemory | None:
        """The namespace, or None if it does not exist and ``create`` is False."""
        for attempt in range(2):
            info = self.namespace_info()
            if info is None and not create:
                return None
            if self.max_keys is not None:
                if info is not None and info["max_keys"] != self.max_keys:
                    raise self._max_keys_differ(info["max_keys"])
                max_keys = self.max_keys
            else:
                max_keys = info["max_keys"] if info is not None else 0
            config = SharedMemoryConfig(max_keys=max_keys, ttl=0, namespace=self.namespace,
                                        **self.base)
            try:
                self.shm = SharedMemory(config)
                return self.shm
            except BrokerUnavailable:
                raise
            except StorageError:
                # Created meanwhile by someone else with another max_keys: ask again, once.
                if self.max_keys is not None or attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close_namespace(self) -> None:
        """Close the namespace ``open`` opened (the node stays, for the next namespace)."""
        if self.shm is not None:
            self.shm.close()
            self.shm = None

    def close(self) -> None:
        self.close_namespace()
        if self._node is not None:
            release_node(self._node)
            self._node = None


# --------------------------------------------------------------------------- output helpers


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    print(f"sharedmem: {text}", file=sys.stderr, flush=True)


def _json_line(obj: Any) -> str:
    return _encode(obj).decode()


def _pretty(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, ensure_ascii=False)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


class Progress:
    """A ``\\r`` counter on stderr, only when stderr is a terminal and the job is large."""

    def __init__(self, verb: str, total: int) -> None:
        self.verb, self.total = verb, total
        self.enabled = total >= PROGRESS_MIN_KEYS and sys.stderr.isatty()
        self._last = 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1 or done >= self.total:
            self._last = now
            sys.stderr.write(f"\r{self.verb} {done}/{self.total} keys")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _parse_json(text: str | bytes, what: str, *, hint: bool = False) -> Any:
    try:
        return _decode(text)
    except msgspec.DecodeError as exc:
        extra = ""
        if hint:  # the usual slip: a bare word where a JSON string was meant
            import json

            word = text.decode(errors="replace") if isinstance(text, bytes) else text
            word = word.strip()
            quoted = json.dumps(word, ensure_ascii=False).replace("'", "'\\''")
            extra = f"; a string needs JSON quotes: did you mean '{quoted}'?"
        raise CliError(EXIT_USAGE, f"{what} is not valid JSON: {exc}{extra}") from None


def _existing(s: Session) -> SharedMemory:
    """The command's namespace, which must exist (KeyNotFound, exit 1, if it does not)."""
    shm = s.open(create=False)
    if shm is None:
        raise _missing_namespace(s)
    return shm


def _missing_namespace(s: Session) -> KeyNotFound:
    return KeyNotFound(f"namespace {s.namespace!r} does not exist (a write creates it; "
                       "'sharedmem stats' lists the namespaces)")


# --------------------------------------------------------------------------- commands


def _print_value(args: argparse.Namespace, value: Any) -> None:
    if args.raw:
        _out(value if isinstance(value, str) else _json_line(value))
    else:
        _out(_json_line(value) if args.json else _pretty(value))


def cmd_get(args: argparse.Namespace, s: Session) -> int:
    check_key(args.key)
    entries = s.read("get", [args.key]).entries
    if not entries:
        raise KeyNotFound(f"key {args.key!r} not found in namespace {s.namespace!r}")
    _print_value(args, _decode(entries[0].value))
    return EXIT_OK


def cmd_mget(args: argparse.Namespace, s: Session) -> int:
    for key in args.keys:
        check_key(key)
    entries = s.read("get", list(args.keys)).entries
    found = {e.key: _decode(e.value) for e in entries}
    _out(_json_line(found) if args.json else _pretty(found))
    missing = [k for k in dict.fromkeys(args.keys) if k not in found]
    if missing:
        _err(f"not found in namespace {s.namespace!r}: {', '.join(map(repr, missing))}")
        return EXIT_NOT_FOUND
    return EXIT_OK


def cmd_set(args: argparse.Namespace, s: Session) -> int:
    check_key(args.key)
    if args.value is None:
        if sys.stdin.isatty():
            print("sharedmem: reading the JSON value from stdin (end with Ctrl-D)",
                  file=sys.stderr, flush=True)
        value = _parse_json(sys.stdin.buffer.read(), "the value read from stdin", hint=True)
    else:
        value = _parse_json(args.value, "the value", hint=True)
    encode_value(args.key, value)  # InvalidValue before connecting
    shm = s.open(create=True)
    assert shm is not None
    version = shm.set(args.key, value, ttl=args.ttl, if_version=args.if_version)
    _out(_json_line({"key": args.key, "version": version}) if args.json else str(version))
    return EXIT_OK


def cmd_del(args: argparse.Namespace, s: Session) -> int:
    ns, mk = s.namespace, s.max_keys or 0
    if args.pattern is not None:
        if args.key is not None or args.if_version is not None:
            raise CliError(EXIT_USAGE, "del takes either KEY (with --if-version) or --pattern")
        pattern = args.pattern
        compile_pattern(pattern)
        s.read("info")  # exit 1 for a missing namespace, as for one key
        ok = s.write(lambda cid, no: DeletePattern(cid, no, ns, mk, pattern))
        _out(_json_line({"deleted": ok.count}) if args.json else f"deleted {ok.count} keys")
        return EXIT_OK
    if args.key is None:
        raise CliError(EXIT_USAGE, "del needs a KEY or --pattern GLOB")
    key, v = check_key(args.key), args.if_version
    s.read("info")
    if not s.write(lambda cid, no: Delete(cid, no, ns, mk, key, v)).changed:
        raise KeyNotFound(f"key {args.key!r} not found in namespace {s.namespace!r}")
    return EXIT_OK


def cmd_touch(args: argparse.Namespace, s: Session) -> int:
    ns, mk, key = s.namespace, s.max_keys or 0, check_key(args.key)
    ttl = args.ttl or None
    s.read("info")
    ok = s.write(lambda cid, no: Touch(cid, no, ns, mk, key, ttl))
    _out(_json_line({"key": key, "seq": ok.seq}) if args.json else str(ok.seq))
    return EXIT_OK


def cmd_drop(args: argparse.Namespace, s: Session) -> int:
    ns = s.namespace
    ok = s.write(lambda cid, no: DropNamespace(cid, no, ns))
    _out(_json_line({"deleted": ok.count, "namespace": ns}) if args.json
         else f"deleted {ok.count} keys of namespace {ns!r}")
    return EXIT_OK


def cmd_max_keys(args: argparse.Namespace, s: Session) -> int:
    ns = s.namespace
    if args.limit is not None:
        limit = args.limit
        s.write(lambda cid, no: SetMaxKeys(cid, no, ns, limit))
    info = s.read("info")
    _out(_json_line({"namespace": ns, "max_keys": info.max_keys, "keys": info.keys_count})
         if args.json else str(info.max_keys))
    return EXIT_OK


def cmd_ls(args: argparse.Namespace, s: Session) -> int:
    compile_pattern(args.pattern)
    keys = s.read("list", pattern=args.pattern).keys
    if args.json:
        _out(_json_line(keys))
    else:
        for k in keys:
            _out(k)
    return EXIT_OK


def _iso_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _meta_dict(e: ReadEntry) -> dict[str, Any]:
    expires = None if e.ttl is None else _iso_ts(time.time() + e.ttl)
    return {
        "key": e.key,
        "version": e.version,
        "size": e.size,
        "created_at": _iso_ts(e.created_at),
        "last_modified": _iso_ts(e.modified_at),
        "expires_at": expires,
        "ttl": None if e.ttl is None else max(0.001, round(e.ttl, 3)),
    }


def cmd_meta(args: argparse.Namespace, s: Session) -> int:
    check_key(args.key)
    entries = s.read("metadata", [args.key]).entries
    if not entries:
        raise KeyNotFound(f"key {args.key!r} not found in namespace {s.namespace!r}")
    d = _meta_dict(entries[0])
    if args.json:
        _out(_json_line(d))
    else:
        d["expires_at"] = d["expires_at"] or "never"
        d["ttl"] = "none" if d["ttl"] is None else d["ttl"]
        for name, value in d.items():
            _out(f"{name}: {value}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace, s: Session) -> int:
    st = s.stats()
    namespaces = dict(sorted(st.namespaces.items()))
    if args.json:
        _out(_json_line({"broker": s.address, "epoch": st.epoch, "counters": st.counters,
                         "namespaces": namespaces,
                         **({"group": dict(sorted(st.group.items()))} if st.group else {})}))
        return EXIT_OK
    _out(f"broker: {s.address}")
    _out(f"epoch: {st.epoch}")
    _out("counters:")
    width = max((len(k) for k in st.counters), default=0)
    for name, value in st.counters.items():
        _out(f"  {name:<{width}}  {value}")
    _out(f"namespaces: {len(namespaces)}")
    if namespaces:
        w = max(9, *(len(n) for n in namespaces))
        _out(f"  {'NAMESPACE':<{w}}  {'KEYS':>10}  {'SEQ':>12}  MAX_KEYS")
        for name, info in namespaces.items():
            mk = info.get("max_keys", 0)
            _out(f"  {name:<{w}}  {info.get('keys', 0):>10}  {info.get('seq', 0):>12}  "
                 f"{mk if mk else '0 (unlimited)'}")
    if st.group:
        _print_group(st.group)
    return EXIT_OK


def _print_group(group: dict[str, dict[str, int | str]]) -> None:
    """The broker group's members as the answering member sees them (the primary's view has
    every follower's acked position; -1 is "not known here")."""
    _out(f"group members: {len(group)}")
    w = max(6, *(len(n) for n in group))
    _out(f"  {'MEMBER':<{w}}  {'ROLE':<8}  {'TERM':>6}  {'SEQ':>12}  {'LAG':>8}  IN_SYNC_SET")
    for name, m in sorted(group.items()):
        sync = "primary" if m.get("role") == "primary" else (
            "yes" if m.get("sync") else "no")
        _out(f"  {name:<{w}}  {m.get('role', '?')!s:<8}  {m.get('term', -1):>6}  "
             f"{m.get('seq', -1):>12}  {m.get('lag', -1):>8}  {sync}")



def _dump_namespace(s: Session, pattern: str, out: IO[bytes]) -> None:
    """Write the keys of ``s.namespace`` matching ``pattern`` as dump lines.

    Broker-side reads, a chunk of keys at a time: the dump never holds the whole namespace.
    Each chunk is read at one version; a key deleted or expired after the listing is left out.
    """
    keys = s.read("list", pattern=pattern).keys
    progress = Progress("dumped", len(keys))
    done = 0
    for i in range(0, len(keys), DUMP_CHUNK):
        entries = s.read("get", keys[i:i + DUMP_CHUNK]).entries
        lines = [_encode({"key": e.key, "value": msgspec.Raw(e.value),
                          "ttl": None if e.ttl is None else max(0.001, round(e.ttl, 3))})
                 for e in entries]
        if lines:
            out.write(b"\n".join(lines) + b"\n")
        done += len(lines)
        progress.update(done)
    progress.finish()


def cmd_dump(args: argparse.Namespace, s: Session) -> int:
    compile_pattern(args.pattern)
    out = sys.stdout.buffer
    if not args.all:
        _dump_namespace(s, args.pattern, out)
        out.flush()
        return EXIT_OK
    # Every namespace this client may read, each behind a header line naming it and its
    # max_keys, so that 'load --all' recreates it (an empty namespace keeps its header).
    for name, info in sorted(s.stats().namespaces.items()):
        s.namespace = name
        out.write(_encode({"namespace": name, "max_keys": info.get("max_keys", 0)}) + b"\n")
        _dump_namespace(s, args.pattern, out)
    out.flush()
    return EXIT_OK


def _ttl_bucket(ttl: float | None) -> float:
    """Round a TTL up so that keys written at about the same time share a batch (0 = never)."""
    if not ttl:
        return 0.0
    if ttl >= 10:
        return float(math.ceil(ttl))
    return math.ceil(ttl * 10) / 10


def _parse_record(line: bytes, n: int) -> tuple[str, Any, float | None]:
    """One dump line -> (key, value, ttl); CliError (exit 2) naming the line if it is bad."""
    rec = _parse_json(line, f"line {n}")
    if not isinstance(rec, dict) or "key" not in rec or "value" not in rec:
        raise CliError(EXIT_USAGE, f"line {n}: expected an object with \"key\" and "
                                   f"\"value\" (and optionally \"ttl\")")
    key, ttl = rec["key"], rec.get("ttl")
    try:
        check_key(key)
    except InvalidKey as exc:
        raise CliError(EXIT_USAGE, f"line {n}: {exc}") from None
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
                            or not math.isfinite(ttl) or ttl < 0):
        raise CliError(EXIT_USAGE, f"line {n}: ttl must be seconds >= 0 or null, "
                                   f"got {ttl!r}")
    return key, rec["value"], ttl


def _add_record(records: dict[str, tuple[Any, float]], key: str, value: Any,
                ttl: float | None) -> None:
    records.pop(key, None)  # a later line for a key wins, in the order of its last occurrence
    records[key] = (value, _ttl_bucket(ttl))


def read_load_input(stream: Iterable[bytes]) -> dict[str, tuple[Any, float]]:
    """Parse dump lines into key -> (value, ttl bucket); a later line for a key wins."""
    records: dict[str, tuple[Any, float]] = {}
    for n, line in enumerate(stream, 1):
        if line.strip():
            _add_record(records, *_parse_record(line, n))
    return records


class NamespaceDump(NamedTuple):
    """One namespace of a 'dump --all': its max_keys and its key -> (value, ttl bucket)."""

    max_keys: int
    records: dict[str, tuple[Any, float]]


def read_load_all_input(stream: Iterable[bytes]) -> dict[str, NamespaceDump]:
    """Parse the output of 'dump --all': header lines {"namespace", "max_keys"}, each followed
    by the key lines of that namespace. A key line before any header is refused (exit 2)."""
    out: dict[str, NamespaceDump] = {}
    current: NamespaceDump | None = None
    for n, line in enumerate(stream, 1):
        if not line.strip():
            continue
        rec = _parse_json(line, f"line {n}")
        if isinstance(rec, dict) and "namespace" in rec and "key" not in rec:
            name, max_keys = rec["namespace"], rec.get("max_keys", 0)
            try:
                check_namespace(name)
            except SharedMemoryError as exc:
                raise CliError(EXIT_USAGE, f"line {n}: {exc}") from None
            if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 0:
                raise CliError(EXIT_USAGE, f"line {n}: max_keys must be an integer >= 0, "
                                           f"got {max_keys!r}")
            current = out.setdefault(name, NamespaceDump(max_keys, {}))
            continue
        if current is None:
            raise CliError(EXIT_USAGE, f"line {n}: a key line before any namespace line; "
                                       "'load --all' reads the output of 'dump --all'")
        _add_record(current.records, *_parse_record(line, n))
    return out


def _check_values(s: Session, records: dict[str, tuple[Any, float]]) -> None:
    """InvalidValue (exit 2) for a value over the broker's limit, before anything is written."""
    limit = s.node().max_value_bytes
    for key, (value, _bucket) in records.items():
        encode_value(key, value, limit)


def _load_namespace(s: Session, records: dict[str, tuple[Any, float]], batch_size: int) -> int:
    """Write ``records`` into ``s.namespace`` (created if missing) in set_many batches."""
    shm = s.open(create=True)
    assert shm is not None
    buckets: dict[float, dict[str, Any]] = {}
    for key, (value, bucket) in records.items():
        buckets.setdefault(bucket, {})[key] = value
    progress = Progress("loaded", len(records))
    done = 0
    start = time.monotonic()
    for bucket, mapping in buckets.items():
        items = list(mapping.items())
        for i in range(0, len(items), batch_size):
            batch = dict(items[i:i + batch_size])
            ttl = 0.0
            if bucket:  # count the time spent loading against the TTL, never below 1 ms
                ttl = max(0.001, bucket - (time.monotonic() - start))
            shm.set_many(batch, ttl=ttl)
            done += len(batch)
            progress.update(done)
    progress.finish()
    s.close_namespace()
    return done


def cmd_load(args: argparse.Namespace, s: Session) -> int:
    if args.all:
        return _load_all(args, s)
    records = read_load_input(sys.stdin.buffer)
    if not records:
        _out(_json_line({"loaded": 0}) if args.json else "loaded 0 keys")
        return EXIT_OK
    _check_values(s, records)
    done = _load_namespace(s, records, args.batch_size)
    if args.json:
        _out(_json_line({"loaded": done, "namespace": s.namespace}))
    else:
        _out(f"loaded {done} keys into namespace {s.namespace!r}")
    return EXIT_OK


def _load_all(args: argparse.Namespace, s: Session) -> int:
    dumps = read_load_all_input(sys.stdin.buffer)
    for ns_dump in dumps.values():
        _check_values(s, ns_dump.records)
    loaded: dict[str, int] = {}
    for name, ns_dump in dumps.items():
        s.namespace = name
        # A namespace the target lacks is created with the dump's max_keys; one it has keeps
        # its own limit (the first opener sets it), as a plain 'load' does.
        s.max_keys = ns_dump.max_keys if s.namespace_info() is None else None
        loaded[name] = _load_namespace(s, ns_dump.records, args.batch_size)
    if args.json:
        _out(_json_line({"loaded": sum(loaded.values()), "namespaces": loaded}))
    else:
        _out(f"loaded {sum(loaded.values())} keys into {len(loaded)} namespaces")
    return EXIT_OK


def _change_dict(ch: ChangeEvent) -> dict[str, Any]:
    return {"key": ch.key, "op": ch.op, "version": ch.version, "value": ch.value,
            "modified_at": _iso(ch.modified_at), "initial": ch.initial, "resync": ch.resync}


def cmd_watch(args: argparse.Namespace, s: Session) -> int:
    compile_pattern(args.pattern)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    out: IO[str] = sys.stdout
    shm = s.open(create=s.max_keys is not None)
    if shm is None:
        _err(f"namespace {s.namespace!r} does not exist yet; waiting for it to be created")
        while shm is None:
            if stop.wait(0.5):
                return EXIT_OK
            shm = s.open(create=False)
    if stop.is_set():
        return EXIT_OK
    watcher = shm.watch(args.pattern, initial=not args.no_initial,
                        from_version=args.from_version)
    try:
        print(f"sharedmem: watching {args.pattern!r} in namespace {s.namespace!r} at "
              f"{s.address} from version {shm.seq}", file=sys.stderr, flush=True)
        while not stop.is_set():
            ch = watcher.get(timeout=0.2)
            if ch is None:
                continue
            d = _change_dict(ch)
            if ch.op == INITIAL_DONE:
                d["key"] = None
            try:
                out.write(_json_line(d) + "\n")
                out.flush()
            except BrokenPipeError:  # the reader went away (e.g. `| head -1`): done
                _silence_stdout()
                return EXIT_OK
    finally:
        watcher.close()
    return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


COMMANDS = {
    "get": cmd_get,
    "mget": cmd_mget,
    "set": cmd_set,
    "del": cmd_del,
    "touch": cmd_touch,
    "drop": cmd_drop,
    "max-keys": cmd_max_keys,
    "ls": cmd_ls,
    "meta": cmd_meta,
    "watch": cmd_watch,
    "stats": cmd_stats,
    "dump": cmd_dump,
    "load": cmd_load,
}


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an exception raised by a command."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, KeyNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, (InvalidKey, InvalidValue, PatternError)):
        return EXIT_USAGE
    if isinstance(exc, BrokerUnavailable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, StorageError):
        return EXIT_REFUSED
    if isinstance(exc, AccessDenied):
        return EXIT_DENIED
    if isinstance(exc, SharedMemoryError):
        return EXIT_REFUSED
    if isinstance(exc, ValueError):  # a setting SharedMemoryConfig refused
        return EXIT_USAGE
    raise exc


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    session: Session | None = None
    try:
        session = Session(args)
        code = COMMANDS[args.command](args, session)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except (SharedMemoryError, CliError, ValueError) as exc:
        code = exit_code_for(exc)
        kind = "" if isinstance(exc, CliError) else f"{type(exc).__name__}: "
        _err(f"{kind}{exc}")
        return code
    finally:
        if session is not None:
            session.close()
