"""etcd coordination for broker groups (docs/groups.md).

Owns: the ``Coordinator`` interface (leases, compare-and-swap transactions, watches), the etcd
key layout of a group (``GroupKeys``), the values stored there (``GroupConfig``,
``MemberRecord``), and ``EtcdCoordinator``, the implementation over etcd3gw, which speaks
etcd's v3 JSON gateway (no grpcio/protobuf pins) and tries a list of endpoints in turn.

Rules:
- Nothing on the single-broker path imports this module, and etcd3gw is imported inside
  ``EtcdCoordinator`` only: the kernel stays importable without the ``group`` extra.
- It decides nothing about roles. Election, fencing and the commit rule are built on top of it
  and keep their safety without etcd (docs/groups.md): this module only has to report
  honestly what etcd answered, or that nobody answered (``CoordinationUnavailable``).
- An interface small enough that ZooKeeper (kazoo) could implement it too: lease, transaction
  of compares and puts, get, watch. No etcd type leaks out of ``EtcdCoordinator``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import msgspec

if TYPE_CHECKING:
    import requests

logger = logging.getLogger(__name__)

KEY_ROOT = "/sharedmem/"
# Group and member names become path segments of etcd keys: no "/" and nothing invisible.
# ":" and "[]" are allowed because a member's default name is HOST:PORT (also [::1]:7400).
_NAME = re.compile(r"[A-Za-z0-9._:\[\]-]{1,128}")


# --------------------------------------------------------------------------------- errors


class CoordinationError(Exception):
    """Raised when etcd refused a request for a reason a retry will not change (a malformed
    request, a permission error). The message names the endpoint and etcd's own words."""


class CoordinationUnavailable(CoordinationError):
    """Raised when no endpoint of the list answered within the deadline (every member down,
    unreachable, or without a leader). For a write the outcome is unknown: it may have been
    applied. Not evidence that a leader key vanished: only an observed DELETE is."""


class LeaseLost(CoordinationError):
    """Raised when a lease has expired or was revoked: every key put under it is gone, and a
    put or transaction naming it changed nothing."""


class InvalidGroupValue(CoordinationError, ValueError):
    """Raised when a value read from etcd under a group's keys does not decode (written by
    something else, or by an incompatible version)."""


# ------------------------------------------------------------------------- keys and values


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it may be a group or member name, else raise ``ValueError`` saying
    why: it becomes one segment of an etcd key, so "/" would break the layout."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-128 characters of A-Z a-z 0-9 . _ : - [ ]"
        )
    return name


@dataclass(frozen=True)
class GroupKeys:
    """The etcd keys of one group, exactly as docs/groups.md ("Keys") names them, so that every
    part of the code (and every operator's ``etcdctl get``) agrees on them."""

    group: str

    def __post_init__(self) -> None:
        check_name("group", self.group)

    @property
    def prefix(self) -> str:
        """``/sharedmem/<group>/``: everything of the group lives under it."""
        return f"{KEY_ROOT}{self.group}/"

    @property
    def leader(self) -> str:
        """The primary's member name, under the primary's lease."""
        return self.prefix + "leader"

    @property
    def config(self) -> str:
        """``GroupConfig`` as JSON; changed only by compare-and-swap on its mod_revision."""
        return self.prefix + "config"

    @property
    def members_prefix(self) -> str:
        """``/sharedmem/<group>/members/``: one key per broker, each under its own lease."""
        return self.prefix + "members/"

    def member(self, name: str) -> str:
        """The key of one member's ``MemberRecord``."""
        return self.members_prefix + check_name("member", name)

    def member_name(self, key: str) -> str:
        """The member name of a key under ``members_prefix`` (for watch events and listings)."""
        if not key.startswith(self.members_prefix):
            raise ValueError(f"{key!r} is not a member key of group {self.group!r}")
        return key[len(self.members_prefix):]


class GroupConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The value of the ``config`` key. ``term`` is the fencing token: it grows by one at every
    change of primary. ``sync_set`` are the standbys whose ack a commit needs. ``epoch`` is the
    log's epoch, which continues across a failover. New fields must get defaults so that an
    older broker can still read a newer config."""

    term: int
    primary: str
    sync_set: tuple[str, ...] = ()
    epoch: str = ""

    def encode(self) -> bytes:
        return _json_encoder.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> GroupConfig:
        """Decode a stored config; raise ``InvalidGroupValue`` saying what was wrong."""
        try:
            value = _config_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise InvalidGroupValue(f"group config does not decode: {exc}") from None
        if value.term < 0:
            raise InvalidGroupValue(f"group config has a negative term {value.term}")
        return value


class MemberRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The value of ``members/<name>``: where a broker answers and how far its durable log
    reaches, for operators, ``stats`` and nodes asking for the member list. Informational
    only: no decision may rest on it, since it is as stale as its last put."""

    name: str
    endpoints: tuple[str, ...] = ()
    term: int = 0
    seq: int = 0

    def encode(self) -> bytes:
        return _json_encoder.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> MemberRecord:
        """Decode a stored member record; raise ``InvalidGroupValue`` if it does not."""
        try:
            return _member_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise InvalidGroupValue(f"member record does not decode: {exc}") from None


_json_encoder = msgspec.json.Encoder()
_config_decoder = msgspec.json.Decoder(GroupConfig)
_member_decoder = msgspec.json.Decoder(MemberRecord)


# ------------------------------------------------------------------- interface value types


@dataclass(frozen=True)
class Lease:
    """A lease as granted: ``ttl`` is what etcd granted, which may exceed what was asked
    (etcd raises it to at least 1.5 election timeouts), so callers time keepalives from it."""

    id: int
    ttl: int


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it. ``create_revision`` is 0 only for an absent key (never
    returned here); ``lease`` is 0 when the key has none."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Range:
    """The answer to a get: the keys found and the store's revision at the read, so that a
    watch can start at ``revision + 1`` and miss nothing in between."""

    revision: int
    kvs: tuple[KeyValue, ...]

    @property
    def first(self) -> KeyValue | None:
        return self.kvs[0] if self.kvs else None


@dataclass(frozen=True)
class Absent:
    """Compare: the key does not exist (``create_revision == 0``)."""

    key: str


@dataclass(frozen=True)
class ModRevisionIs:
    """Compare: the key was last modified at ``revision`` (0: the key is absent)."""

    key: str
    revision: int


@dataclass(frozen=True)
class ValueIs:
    """Compare: the key exists and holds exactly ``value``."""

    key: str
    value: bytes


Compare = Absent | ModRevisionIs | ValueIs


@dataclass(frozen=True)
class Put:
    """A put inside a transaction, optionally under a lease (the key vanishes with it)."""

    key: str
    value: bytes
    lease: Lease | None = None


@dataclass(frozen=True)
class TxnResult:
    """What a transaction did. ``succeeded`` False: every compare was checked and at least one
    failed, nothing was written, and ``current`` holds each key the transaction named as it was
    then (None: absent), so the caller can see who won without another round trip."""

    succeeded: bool
    revision: int
    current: Mapping[str, KeyValue | None] = field(default_factory=dict)


@dataclass(frozen=True)
class WatchEvent:
    """A change seen by a watch. ``value`` is empty for a DELETE (also the deletion caused by
    an expired or revoked lease)."""

    kind: Literal["PUT", "DELETE"]
    key: str
    value: bytes
    mod_revision: int


class WatchHandle(Protocol):
    def cancel(self) -> None:
        """Stop the watch; no callback runs after this returns (unless called from one)."""


class Coordinator(Protocol):
    """What a broker group needs from a consensus store (docs/groups.md).

    Every call either returns etcd's answer, raises ``LeaseLost`` (the lease named is gone),
    ``CoordinationError`` (refused) or ``CoordinationUnavailable`` (nobody answered in time;
    a write's outcome is then unknown). Calls may come from any thread."""

    def grant_lease(self, ttl: int) -> Lease:
        """A new lease of at least ``ttl`` seconds; the granted TTL is in the result."""
        ...

    def keepalive(self, lease: Lease) -> int:
        """Renew ``lease``; return its TTL from now. Raises ``LeaseLost`` if it is gone."""
        ...

    def revoke(self, lease: Lease) -> None:
        """Revoke ``lease`` and so delete its keys at once (a clean step-down). A lease that
        is already gone counts as revoked."""
        ...

    def get(self, key: str) -> Range:
        """The key (or nothing) and the revision of the read (linearizable)."""
        ...

    def get_prefix(self, prefix: str) -> Range:
        """Every key under ``prefix``, in key order, and the revision of the read."""
        ...

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Unconditional put (``members/<name>``); returns the revision it made."""
        ...

    def transact(self, compares: Sequence[Compare], puts: Sequence[Put]) -> TxnResult:
        """If every compare holds, do every put, atomically; else change nothing."""
        ...

    def transact_until_answered(self, compares: Sequence[Compare], puts: Sequence[Put],
                                stop: threading.Event) -> TxnResult:
        """``transact``, retried while nobody answers, until the outcome is known: for the
        writes whose unknown outcome must not be taken for a failure (a campaign, a sync-set
        change, a hand-off). After an unanswered attempt, a failed compare whose puts are
        all in place counts as applied. Raises ``CoordinationUnavailable`` only once
        ``stop`` is set."""
        ...

    def create_if_absent(self, key: str, value: bytes, lease: Lease) -> TxnResult:
        """Put ``key`` under ``lease`` only if it does not exist (the leader key)."""
        ...

    def compare_and_swap(self, key: str, value: bytes, mod_revision: int, *,
                         require: ValueIs | None = None,
                         lease: Lease | None = None) -> TxnResult:
        """Put ``key`` only if its mod_revision is still ``mod_revision`` (0: absent) and, with
        ``require``, another key still holds a value (the config CAS that also checks the
        primary still holds the leader key)."""
        ...

    def watch(self, key: str, callback: Callable[[WatchEvent], None], *, prefix: bool = False,
              start_revision: int | None = None) -> WatchHandle:
        """Call ``callback`` on a thread of the watch for every PUT and DELETE of ``key`` (or
        of every key under it with ``prefix``), in revision order, from ``start_revision``
        (default: changes after the call). Returns once the watch is established, so no change
        made after the return is missed."""
        ...

    def close(self) -> None:
        """Cancel every watch and drop the connections. Leases are left to expire."""
        ...


# ---------------------------------------------------------------------- etcd implementation


@dataclass(frozen=True)
class EtcdTLS:
    """Client TLS towards etcd, as etcdctl's ``--cacert/--cert/--key`` (and Patroni's
    ``cacert/cert/key``): the CA that signed etcd's server certificates (``None``: the system's
    trust store) and this client's certificate and key for etcd's ``--client-cert-auth``.

    Why it matters: whoever can write the group's keys in etcd can name a primary, so on a
    network that is not trusted etcd must be reached over TLS with client certificates.
    Files are read when the object is made, so a wrong path fails at start-up, naming the flag.
    """

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--etcd-cert and --etcd-key go together: a client certificate "
                             "needs its private key, and the key its certificate")
        for flag, path in (("--etcd-cacert", self.cacert), ("--etcd-cert", self.cert),
                           ("--etcd-key", self.key)):
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    head = f.read(64)
            except OSError as exc:
                raise ValueError(f"{flag} {path}: cannot read it: {exc.strerror}") from None
            if b"-----BEGIN" not in head:
                raise ValueError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")

    def check_endpoints(self, endpoints: Sequence[str]) -> None:
        """TLS files with a plain ``http://`` endpoint would be silently unused: refuse."""
        plain = [e for e in endpoints if not e.startswith("https://")]
        if plain:
            raise ValueError(f"--etcd-cacert/--etcd-cert/--etcd-key need https:// etcd "
                             f"endpoints, got {', '.join(plain)}")

    @property
    def verify(self) -> str | bool:
        """``requests``' ``verify``: the CA file, or True for the system's trust store."""
        return self.cacert if self.cacert is not None else True

    @property
    def client_cert(self) -> tuple[str, str] | None:
        return (self.cert, self.key) if self.cert is not None and self.key is not None \
            else None


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    """``http://H:P[,http://H2:P2...]`` (or a list) -> normalised base URLs; ``ValueError``
    naming the bad entry otherwise."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    result: list[str] = []
    for raw in items:
        item = raw.strip()
        parts = urlsplit(item)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None \
                or parts.path not in ("", "/"):
            raise ValueError(f"invalid etcd endpoint {item!r}: expected http://HOST:PORT "
                             "(or https://HOST:PORT)")
        result.append(f"{parts.scheme}://{parts.netloc}")
    if not result:
        raise ValueError("no etcd endpoint given")
    return tuple(result)


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _prefix_end(prefix: str) -> bytes:
    """The range end that covers every key starting with ``prefix`` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


def _key_value(kv: Mapping[str, Any]) -> KeyValue:
    # The gateway renders int64 as JSON strings and omits zero values (proto3 JSON).
    return KeyValue(
        key=_unb64(kv["key"]).decode(errors="replace"),
        value=_unb64(kv.get("value", "")),
        create_revision=int(kv.get("create_revision", 0)),
        mod_revision=int(kv.get("mod_revision", 0)),
        version=int(kv.get("version", 0)),
        lease=int(kv.get("lease", 0)),
    )


def _revision(result: Mapping[str, Any]) -> int:
    return int(result.get("header", {}).get("revision", 0))


def _compare_json(compare: Compare) -> dict[str, Any]:
    if isinstance(compare, Absent):
        return {"key": _b64(compare.key), "target": "CREATE", "result": "EQUAL",
                "create_revision": 0}
    if isinstance(compare, ModRevisionIs):
        return {"key": _b64(compare.key), "target": "MOD", "result": "EQUAL",
                "mod_revision": compare.revision}
    return {"key": _b64(compare.key), "target": "VALUE", "result": "EQUAL",
            "value": _b64(compare.value)}


class EtcdCoordinator:
    """``Coordinator`` over etcd3gw (etcd's v3 JSON gateway), for etcd 3.4 to 3.6.

    Each call is tried on the endpoint that last answered, then on the next ones in turn, until
    ``deadline`` seconds have passed; then ``CoordinationUnavailable`` lists every endpoint's
    last error. A call therefore returns or raises within about ``deadline + request_timeout``
    seconds, never hangs. A member without a leader (etcd answers 503/504/500) counts as
    unreachable: the next member may have one.

    Retrying a write whose first attempt got no answer could find it already applied: a
    transaction retried after such an error whose compares then fail, while every key it puts
    already holds its value (and its lease), is reported as succeeded. Leases are unique, so
    for puts under a lease (the leader key) this is exact; config values carry the term and
    primary, which only their writer produces.
    """

    def __init__(self, endpoints: str | Sequence[str], *, request_timeout: float = 1.0,
                 deadline: float = 5.0, retry_interval: float = 0.05,
                 tls: EtcdTLS | None = None) -> None:
        import etcd3gw  # lazily: the single-broker path never needs it
        from etcd3gw import exceptions as etcd_exceptions

        self.endpoints = parse_endpoints(endpoints)
        if tls is not None:
            tls.check_endpoints(self.endpoints)
        self.tls = tls
        # Per request, not only on the session: requests lets REQUESTS_CA_BUNDLE or
        # CURL_CA_BUNDLE override a session's ``verify`` (psf/requests#3829), and many
        # machines set those, which would make etcd's own CA silently unused.
        # (True, without TLS files, is requests' default: the environment, then certifi.)
        self._verify: str | bool = tls.verify if tls is not None else True
        self._request_timeout = request_timeout
        self._deadline = deadline
        self._retry_interval = retry_interval
        self._exc = etcd_exceptions
        self._clients = []
        for url in self.endpoints:
            parts = urlsplit(url)
            assert parts.hostname is not None and parts.port is not None
            # api_path given: no /version discovery round trip; 3.4+ all serve /v3/.
            cert = tls.client_cert if tls is not None else None
            self._clients.append(etcd3gw.Etcd3Client(
                host=parts.hostname, port=parts.port, protocol=parts.scheme,
                timeout=request_timeout, api_path="/v3/",
                ca_cert=tls.cacert if tls is not None else None,
                cert_cert=cert[0] if cert else None, cert_key=cert[1] if cert else None))
        self._current = 0
        self._watches: set[_EtcdWatch] = set()
        self._lock = threading.Lock()
        self._closed = False

    # ---- transport

    def _call(self, what: str, request: Callable[[Any, int], Any]) -> Any:
        """Run ``request(client, attempt)`` on one endpoint after another until one answers.
        ``attempt`` counts earlier attempts that failed in a way that may have applied."""
        if self._closed:
            raise CoordinationError(f"{what}: the coordinator is closed")
        deadline = time.monotonic() + self._deadline
        errors: dict[str, str] = {}
        attempt = 0
        n = len(self._clients)
        while True:
            start = self._current
            for step in range(n):
                index = (start + step) % n
                client = self._clients[index]
                try:
                    result = request(client, attempt)
                except (self._exc.ConnectionFailedError, self._exc.ConnectionTimeoutError,
                        self._exc.InternalServerError) as exc:
                    errors[self.endpoints[index]] = _describe(exc)
                    attempt += 1
                except self._exc.Etcd3Exception as exc:
                    detail = _describe(exc)
                    if "lease not found" in detail:
                        raise LeaseLost(f"{what}: the lease is gone ({detail})") from None
                    raise CoordinationError(
                        f"{what}: refused by {self.endpoints[index]}: {detail}") from None
                else:
                    self._current = index
                    return result
                if time.monotonic() >= deadline:
                    listing = "; ".join(f"{url}: {err}" for url, err in errors.items())
                    raise CoordinationUnavailable(
                        f"{what}: no etcd endpoint answered within {self._deadline}s "
                        f"({listing})")
            time.sleep(self._retry_interval)  # back off after a full round of failures

    def _post(self, client: Any, path: str, payload: Mapping[str, Any]) -> Any:
        return client.post(client.get_url(path), json=payload, verify=self._verify)

    # ---- leases

    def grant_lease(self, ttl: int) -> Lease:
        if not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"lease TTL must be an int >= 1 second, got {ttl!r}")
        result = self._call("lease grant", lambda c, _: self._post(
            c, "/lease/grant", {"TTL": ttl, "ID": 0}))
        return Lease(id=int(result["ID"]), ttl=int(result["TTL"]))

    def keepalive(self, lease: Lease) -> int:
        result = self._call("lease keepalive", lambda c, _: self._post(
            c, "/lease/keepalive", {"ID": str(lease.id)}))
        ttl = int(result.get("result", {}).get("TTL", -1))
        if ttl <= 0:  # etcd omits TTL (i.e. 0) for a lease it no longer has
            raise LeaseLost(f"lease keepalive: lease {lease.id:x} has expired or was revoked")
        return ttl

    def revoke(self, lease: Lease) -> None:
        try:
            self._call("lease revoke", lambda c, _: self._post(
                c, "/kv/lease/revoke", {"ID": str(lease.id)}))
        except LeaseLost:
            pass  # already gone: what a revoke wants

    # ---- keys

    def get(self, key: str) -> Range:
        return self._range("get", {"key": _b64(key)})

    def get_prefix(self, prefix: str) -> Range:
        return self._range("get prefix", {"key": _b64(prefix),
                                          "range_end": _b64(_prefix_end(prefix))})

    def _range(self, what: str, payload: Mapping[str, Any]) -> Range:
        result = self._call(what, lambda c, _: self._post(c, "/kv/range", payload))
        return Range(_revision(result), tuple(_key_value(kv) for kv in result.get("kvs", [])))

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            payload["lease"] = str(lease.id)
        result = self._call("put", lambda c, _: self._post(c, "/kv/put", payload))
        return _revision(result)

    def transact_until_answered(self, compares: Sequence[Compare], puts: Sequence[Put],
                                stop: threading.Event) -> TxnResult:
        unanswered = False
        while True:
            try:
                return self.transact(compares, puts, unanswered=unanswered)
            except CoordinationUnavailable as exc:
                unanswered = True
                if stop.is_set():
                    raise
                logger.warning("transaction unanswered, its outcome unknown: retrying until "
                               "etcd answers (%s)", exc)
                if stop.wait(self._retry_interval):
                    raise

    def transact(self, compares: Sequence[Compare], puts: Sequence[Put], *,
                 unanswered: bool = False) -> TxnResult:
        """(``unanswered``: an earlier call of the same transaction got no answer, so it may
        have applied.)"""
        keys = list(dict.fromkeys([c.key for c in compares] + [p.key for p in puts]))
        success = []
        for p in puts:
            request: dict[str, Any] = {"key": _b64(p.key), "value": _b64(p.value)}
            if p.lease is not None:
                request["lease"] = str(p.lease.id)
            success.append({"request_put": request})
        payload = {
            "compare": [_compare_json(c) for c in compares],
            "success": success,
            # On failure read back every key named, so the caller sees the winner's values.
            "failure": [{"request_range": {"key": _b64(k)}} for k in keys],
        }
        retried = unanswered

        def request_txn(client: Any, attempt: int) -> Any:
            nonlocal retried
            retried = unanswered or attempt > 0
            return self._post(client, "/kv/txn", payload)

        result = self._call("transaction", request_txn)
        revision = _revision(result)
        # A failed compare comes back without "succeeded" (proto3 JSON omits false).
        if result.get("succeeded", False):
            return TxnResult(True, revision)
        current: dict[str, KeyValue | None] = dict.fromkeys(keys)
        for response in result.get("responses", []):
            for kv in response.get("response_range", {}).get("kvs", []):
                found = _key_value(kv)
                current[found.key] = found
        if retried and puts and all(_holds(current.get(p.key), p) for p in puts):
            logger.info("transaction retried after an unanswered attempt: its puts are in "
                     "place, so the first attempt applied")
            return TxnResult(True, revision)
        return TxnResult(False, revision, current)

    def create_if_absent(self, key: str, value: bytes, lease: Lease) -> TxnResult:
        return self.transact([Absent(key)], [Put(key, value, lease)])

    def compare_and_swap(self, key: str, value: bytes, mod_revision: int, *,
                         require: ValueIs | None = None,
                         lease: Lease | None = None) -> TxnResult:
        compares: list[Compare] = [ModRevisionIs(key, mod_revision)]
        if require is not None:
            compares.append(require)
        return self.transact(compares, [Put(key, value, lease)])

    # ---- watches

    def watch(self, key: str, callback: Callable[[WatchEvent], None], *, prefix: bool = False,
              start_revision: int | None = None) -> WatchHandle:
        if self._closed:
            raise CoordinationError("watch: the coordinator is closed")
        w = _EtcdWatch(self, key, _prefix_end(key) if prefix else None, callback,
                       start_revision)
        with self._lock:
            self._watches.add(w)
        w.start()
        if not w.established.wait(self._deadline + self._request_timeout):
            w.cancel()
            raise CoordinationUnavailable(
                f"watch {key!r}: no etcd endpoint of {', '.join(self.endpoints)} established "
                f"it within {self._deadline}s ({w.last_error or 'no answer'})")
        return w

    def _forget(self, w: _EtcdWatch) -> None:
        with self._lock:
            self._watches.discard(w)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            watches = list(self._watches)
        for w in watches:
            w.cancel()
        for client in self._clients:
            client.session.close()


def _holds(kv: KeyValue | None, put: Put) -> bool:
    if kv is None or kv.value != put.value:
        return False
    return put.lease is None or kv.lease == put.lease.id


def _describe(exc: Exception) -> str:
    """etcd's own message from an etcd3gw exception (its body is the gateway's JSON error)."""
    detail = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    try:
        body = json.loads(detail)
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])
    except (ValueError, TypeError):
        pass
    return str(detail)[:300]


class _EtcdWatch:
    """One watch stream with its own thread, resumed on the next endpoint when it breaks.

    Not etcd3gw's Watcher: that one ends silently when its member dies (no reconnect, no resume
    revision) and cancels through private attributes. Here every delivered event advances
    ``next_revision``, a broken stream is reopened on the next endpoint from that revision, so
    no event is lost or repeated across a member's death (unless etcd compacted them: then a
    warning, and the watch goes on from the oldest revision etcd still has). The
    ``Grpc-Metadata-hasleader`` header makes a member that loses its leader end the stream
    (etcd's require-leader rule), instead of keeping it open with no events.
    """

    def __init__(self, owner: EtcdCoordinator, key: str, range_end: bytes | None,
                 callback: Callable[[WatchEvent], None], start_revision: int | None) -> None:
        import requests

        self._owner = owner
        self._key = key
        self._range_end = range_end
        self._callback = callback
        self.next_revision = start_revision
        self.established = threading.Event()
        self.last_error = ""
        self._cancelled = threading.Event()
        self._session = requests.Session()
        if owner.tls is not None:  # the same client certificate as the KV calls
            self._session.cert = owner.tls.client_cert
        self._response: requests.Response | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {key}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown(response)
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        self._session.close()
        self._owner._forget(self)

    def _run(self) -> None:
        n = len(self._owner.endpoints)
        index = self._owner._current
        while not self._cancelled.is_set():
            url = self._owner.endpoints[index % n]
            try:
                self._stream(url)
            except Exception as exc:  # any broken stream: reopen on the next endpoint
                self.last_error = f"{url}: {type(exc).__name__}: {exc}"
                logger.debug("etcd watch %s broke: %s", self._key, self.last_error)
            index += 1
            self._cancelled.wait(self._owner._retry_interval)  # back off before reopening

    def _stream(self, url: str) -> None:
        create: dict[str, Any] = {"key": _b64(self._key)}
        if self._range_end is not None:
            create["range_end"] = _b64(self._range_end)
        if self.next_revision is not None:
            create["start_revision"] = self.next_revision
        response = self._session.post(
            f"{url}/v3/watch", json={"create_request": create}, stream=True,
            headers={"Grpc-Metadata-hasleader": "true"},
            timeout=(self._owner._request_timeout, None), verify=self._owner._verify)
        with self._lock:
            self._response = response
        if self._cancelled.is_set():
            _shutdown(response)
            return
        try:
            if response.status_code != 200:
                raise CoordinationError(f"HTTP {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if not line.strip():
                    continue
                if not self._handle(json.loads(line)):
                    return
        finally:
            with self._lock:
                self._response = None
            response.close()

    def _handle(self, message: Mapping[str, Any]) -> bool:
        """Handle one message of the stream; False: reopen the stream."""
        if "error" in message:
            self.last_error = str(message["error"])
            return False
        result = message.get("result", {})
        if result.get("created"):
            if self.next_revision is None:
                self.next_revision = _revision(result) + 1
            self.established.set()
        if result.get("canceled"):
            compacted = int(result.get("compact_revision", 0))
            if compacted:
                logger.warning("etcd watch %s: revisions before %d were compacted; resuming there",
                            self._key, compacted)
                self.next_revision = compacted
            self.last_error = str(result.get("cancel_reason", "watch canceled by etcd"))
            return False
        for event in result.get("events", []):
            kv = _key_value(event["kv"])
            kind: Literal["PUT", "DELETE"] = "DELETE" if event.get("type") == "DELETE" else "PUT"
            self.next_revision = kv.mod_revision + 1
            if self._cancelled.is_set():
                return False
            try:
                self._callback(WatchEvent(kind, kv.key, kv.value, kv.mod_revision))
            except Exception:  # a callback's bug must not end the watch for everyone
                logger.exception("etcd watch %s: callback failed", self._key)
        return True


def _shutdown(response: requests.Response) -> None:
    """Wake the thread blocked reading ``response``: closing a socket from another thread does
    not interrupt a blocked recv on Linux, shutting it down does."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
