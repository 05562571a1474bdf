"""The public API: ``SharedMemory`` (sync, thread-safe) and ``AsyncSharedMemory`` (asyncio).

Both are facades over the same ``Node``. Reads are answered from the local replica under the
node's lock (microseconds, never a network trip); writes go to the broker and return once this
node's replica shows them (read-your-writes). Every argument is validated here first, so bad
input raises its documented error before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import zmq

from broker.errors import (
    InvalidValue,
    KeyNotFound,
    StorageError,
    VersionConflict,
    error_from_kind,
)
from broker.pattern import compile_pattern
from broker.protocol import (
    Delete,
    DeleteMany,
    DeletePattern,
    DropNamespace,
    Error,
    Fetch,
    FetchReply,
    Read,
    ReadReply,
    Set,
    SetMany,
    SetMaxKeys,
    Touch,
    WriteOk,
)
from broker.state import (
    Entry,
    NamespaceState,
    decode_entry,
    entry_is_live,
    entry_json,
    entry_version,
    live_value,
)
from broker.validation import check_key, check_ttl_bound, check_version, encode_value
from node import admin
from node.config import DEFAULT_MAX_KEYS, EMBEDDED, SharedMemoryConfig, to_seconds
from node.embedded import embedded_address
from node.node import NamespaceStatus, Node, acquire_node, release_node
from node.probe import DEFAULT_LOCAL_BROKER, refused
from node.replies import expect
from node.watch import INITIAL_DONE, CallbackHandle, ChangeEvent, Watcher, change_from_event

logger = logging.getLogger("sharedmem.node")

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Metadata:
    """What is known about a stored value besides the value itself.

    ``size``: bytes of the stored JSON; ``created_at``/``last_modified``: timezone-aware UTC
    (broker clock); ``expires_at``: UTC estimate from this node's clock, None = never;
    ``version``: the namespace seq of the event that last wrote the key.
    """

    size: int
    created_at: datetime
    last_modified: datetime
    expires_at: datetime | None
    version: int


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """The broker's view of a namespace (asked over the network, not the replica):
    ``keys`` stored (an expired key counts until its expiry event), ``seq`` of its last event,
    ``max_keys`` its limit now (0 = unlimited)."""

    namespace: str
    keys: int
    seq: int
    max_keys: int


@dataclass(frozen=True, slots=True)
class Status:
    """How fresh this handle's replica is (see docs/consistency.md)."""

    connected: bool
    broker: str
    epoch: str | None
    namespace: NamespaceStatus
    # Broker groups (docs/groups.md, "Nodes"): the highest term this node has seen, and the
    # request endpoint of the primary it sends to ("" for a single broker, or while unknown).
    term: int = 0
    primary: str = ""


_default_lock = threading.Lock()
_default_address: str | None = None  # the process's choice when no broker is configured


def _broker_address(config: SharedMemoryConfig) -> str:
    """The address a handle connects to (docs/api.md section 1; no silent fallback).

    With nothing configured the local default broker is used if one listens, else the embedded
    broker with one WARNING: two processes that each fell back share nothing, which must not go
    unnoticed. The choice is made once per process, so all of its handles share one broker."""
    global _default_address
    address = config.resolved_broker()
    if address == EMBEDDED:
        return embedded_address()
    if address is not None:
        return address
    with _default_lock:
        if _default_address is None:
            if not refused(DEFAULT_LOCAL_BROKER, timeout=0.5):
                _default_address = DEFAULT_LOCAL_BROKER
            else:
                logger.warning(
                    "no broker configured and none listens at %s: using this process's embedded "
                    "broker; other processes will NOT see its writes. Start a shared one "
                    "(scripts/broker) or choose with SharedMemoryConfig(broker='tcp://HOST:PORT') "
                    "or $SHAREDMEM_BROKER; broker='embedded' selects the embedded broker without "
                    "this warning", DEFAULT_LOCAL_BROKER)
                _default_address = EMBEDDED
        if _default_address == EMBEDDED:
            return embedded_address()
        return _default_address


def _fast_key_ok(key: object) -> bool:
    # Short printable ASCII keys are always valid; anything else takes the full check.
    return type(key) is str and 0 < len(key) <= 1024 and key.isascii() and key.isprintable()


class SharedMemory:
    """A namespace replicated into this process. Thread-safe; a context manager.

    Construction connects and returns once the namespace is replicated, or raises
    ``BrokerUnavailable`` (naming the address) at once when nothing listens there, or when the
    broker does not answer within ``connect_timeout``. An existing namespace is opened with its
    own ``max_keys`` (``config.max_keys`` then shows it).
    """

    def __init__(self, config: SharedMemoryConfig | None = None) -> None:
        self.config = config = config or SharedMemoryConfig()
        address = _broker_address(config)
        self.namespace = config.namespace
        deadline = time.monotonic() + config.connect_timeout
        self._node: Node = acquire_node(
            address, zmq.Context.instance(), connect_timeout=config.connect_timeout,
            retry_interval=config.retry_interval, receive_hwm=config.receive_hwm,
            curve=config.curve_keys(),
        )
        asked = config.max_keys
        try:
            self._replica = self._node.open_namespace(
                config.namespace, DEFAULT_MAX_KEYS if asked is None else asked, deadline,
                adopt=True)
        except BaseException:
            release_node(self._node)
            raise
        if self._replica.max_keys != asked:
            # Settings belong to the namespace: this handle uses the namespace's limit.
            if asked is not None:
                logger.warning(
                    "namespace %r exists with max_keys=%d; this handle asked for max_keys=%d and "
                    "uses the namespace's %d: the first opener of a namespace sets its limit (pass "
                    "max_keys=None to adopt it silently; for another limit use another "
                    "namespace)", config.namespace,
                    self._replica.max_keys, asked, self._replica.max_keys)
            self.config = config = replace(config, max_keys=self._replica.max_keys)
        self._lock = self._node.lock
        self._max_value_bytes = self._node.max_value_bytes
        self._max_staleness = config.max_staleness
        self._closed = False
        self._close_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    @property
    def node(self) -> Node:
        """The process-shared ``Node`` behind this handle: for the admin calls of
        node/admin.py (stats, head, digest) and benchmarks; ordinary use never needs it."""
        return self._node

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Leave the namespace and release the node; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._node.close_namespace(self.namespace)
        release_node(self._node)

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _state(self) -> NamespaceState:
        if self._closed:
            raise StorageError(f"shared memory for namespace {self.namespace!r} is closed")
        state = self._replica.state
        assert state is not None
        if self._max_staleness is not None:
            heard = self._replica.last_heard
            age = float("inf") if heard is None else time.monotonic() - heard
            if age > self._max_staleness:
                raise StorageError(
                    f"stale: namespace {self.namespace!r} has heard nothing from the broker at "
                    f"{self._node.address} for {age:.1f}s (max_staleness "
                    f"{self._max_staleness}s); its last known seq is {state.seq}"
                )
        return state

    # ------------------------------------------------------------------ reads (local)

    def _entry(self, key: str) -> Entry | None:
        """The entry of ``key`` decoded, unless absent or expired."""
        raw = self._stored(key)
        if raw is None or not entry_is_live(raw, time.monotonic()):
            return None
        return decode_entry(raw)

    def _stored(self, key: str) -> bytes | None:
        """The stored entry of ``key`` (broker/state.py), expired or not. Only the lookup
        needs the lock: the bytes are immutable, so the caller checks the expiry and decodes
        after releasing it, and the I/O thread's applies never wait for a decode."""
        if not _fast_key_ok(key):
            check_key(key)
        with self._lock:
            return self._state().entries.get(key)

    def sync_with_broker(self) -> int:
        """Wait until this replica has every event the broker had when asked; return that seq.

        This is what ``consistent=True`` does before a read: one round trip, then a local wait.
        """
        deadline = time.monotonic() + self.config.request_timeout
        reply = admin.head(self._node, self.namespace, deadline)
        self._node.wait_visible(self.namespace, reply, deadline, strict=True)
        return reply.seq

    def get(self, key: str, default: Any = _MISSING, *, consistent: bool = False) -> Any:
        """The value of ``key`` as a fresh copy; ``default`` or KeyNotFound if absent/expired.

        ``consistent=True``: first wait until this replica has caught up with the broker's head
        (a round trip), so the read reflects every write acknowledged before the call."""
        if consistent:
            if not _fast_key_ok(key):
                check_key(key)
            self.sync_with_broker()
        elif not _fast_key_ok(key):
            check_key(key)
        # _stored inlined (the hottest read): only the lookup holds the lock
        with self._lock:
            raw = self._state().entries.get(key)
        value = live_value(raw, time.monotonic, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyNotFound(f"key {key!r} not found in namespace {self.namespace!r}")
            return default
        return value

    def get_many(self, keys: Iterable[str], *, consistent: bool = False) -> dict[str, Any]:
        """The values of several keys, read from the replica in one lock acquisition (so all
        at one seq): a dict key -> fresh copy, in the order given; absent or expired keys are
        left out. InvalidKey (before any read) if one key is invalid. ``consistent``: see
        ``get``."""
        if isinstance(keys, str):
            raise InvalidValue("get_many takes an iterable of keys, not one str")
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            if not _fast_key_ok(key):
                check_key(key)
        if consistent:
            self.sync_with_broker()
        with self._lock:
            entries = self._state().entries
            found = [(k, raw) for k in wanted if (raw := entries.get(k)) is not None]
        now = time.monotonic()
        # the expiry check and the decoding outside the lock (the stored bytes are immutable)
        return {k: entry_json(raw) for k, raw in found if entry_is_live(raw, now)}

    def exists(self, key: str) -> bool:
        """True if ``key`` holds a value that has not expired."""
        if not _fast_key_ok(key):
            check_key(key)
        with self._lock:
            return self._state().is_live(key, time.monotonic())

    def get_metadata(self, key: str) -> Metadata:
        """Size, timestamps, expiry and version of ``key``; KeyNotFound if absent/expired."""
        entry = self._entry(key)
        if entry is None:
            raise KeyNotFound(f"key {key!r} not found in namespace {self.namespace!r}")
        expires = None
        if entry.deadline is not None:
            expires = datetime.fromtimestamp(
                time.time() + (entry.deadline - time.monotonic()), UTC
            )
        return Metadata(
            size=entry.size,
            created_at=datetime.fromtimestamp(entry.created_at, UTC),
            last_modified=datetime.fromtimestamp(entry.modified_at, UTC),
            expires_at=expires,
            version=entry.version,
        )

    def list_keys(self, pattern: str = "*", *, consistent: bool = False) -> list[str]:
        """Sorted keys matching the glob (``*``, ``?``, ``[a-z]``, ``[!a]``, ``\\`` escapes).

        ``consistent=True``: catch up with the broker's head first (see ``get``)."""
        p = compile_pattern(pattern)  # PatternError before taking the lock
        if consistent:
            self.sync_with_broker()
        with self._lock:
            keys = self._state().candidates(p, time.monotonic())
        # Matching runs after the lock is released: however slow a pattern is over many keys,
        # another thread's get() and the I/O thread's applies never wait for it. The keys are
        # still exactly those live at one seq (docs/consistency.md).
        return p.select(keys)

    def digest(self) -> str:
        """Hash of this replica's state (equal to the broker's once converged)."""
        with self._lock:
            return self._state().digest()

    def broker_digest(self) -> tuple[int, str]:
        """(seq, digest) of the broker's copy of this namespace, asked over the network."""
        deadline = time.monotonic() + self.config.request_timeout
        reply = admin.digest(self._node, self.namespace, deadline)
        return reply.seq, reply.digest

    def namespace_info(self) -> NamespaceInfo:
        """The broker's key count, seq and ``max_keys`` of this namespace (one round trip):
        a limit changed by ``set_max_keys`` on any node shows here at once."""
        deadline = time.monotonic() + self.config.request_timeout
        reply = self._node.request(Read(self.namespace, "info"), deadline)
        if isinstance(reply, Error):
            raise error_from_kind(reply.kind, reply.message)
        if not isinstance(reply, ReadReply):
            raise StorageError(f"unexpected reply to Read: {type(reply).__name__}")
        if not reply.found:
            raise KeyNotFound(f"namespace {self.namespace!r} does not exist")
        return NamespaceInfo(self.namespace, reply.keys_count, reply.seq, reply.max_keys)

    def local_digest(self) -> tuple[int, str]:
        """(seq, digest) of this replica, taken atomically."""
        with self._lock:
            state = self._state()
            return state.seq, state.digest()

    @property
    def seq(self) -> int:
        """The seq of the last event this replica applied."""
        return self._replica.seq

    def status(self) -> Status:
        """Connection and freshness of this replica."""
        if self._closed:
            raise StorageError(f"shared memory for namespace {self.namespace!r} is closed")
        ns = self._node.status(self.namespace, time.monotonic())
        term, primary, _, _ = self._node.route.view()
        return Status(self._node.connected, self._node.address, self._replica.epoch, ns,
                      max(term, ns.term), primary)

    # ------------------------------------------------------------------ writes (via broker)

    def _ttl(self, ttl: Any) -> float | None:
        value: float | None
        if ttl is None:
            # SharedMemoryConfig.__post_init__ stores ttl as float seconds (the field's type
            # also admits the timedelta a caller may pass in).
            value = cast(float, self.config.ttl)
        else:
            try:
                value = to_seconds("ttl", ttl)
            except ValueError as exc:
                from broker.errors import InvalidValue

                raise InvalidValue(str(exc)) from None
            assert value is not None
            check_ttl_bound(value)  # so get_metadata's expires_at is valid for every TTL
        return value or None

    def _write(self, build: Any) -> WriteOk:
        if self._closed:
            raise StorageError(f"shared memory for namespace {self.namespace!r} is closed")
        deadline = time.monotonic() + self.config.request_timeout
        return expect(self._node.write(self.namespace, build, deadline), WriteOk, "a write")

    def set(self, key: str, value: Any, *, ttl: float | timedelta | None = None,
            if_version: int | None = None) -> int:
        """Store ``value`` (JSON) under ``key``; returns its new version. ``ttl``: seconds,
        None = the config's default, 0 = never expires. ``if_version``: compare-and-set, write
        only if the key is at that version (0 = only if absent), else VersionConflict."""
        check_key(key)
        data = encode_value(key, value, self._max_value_bytes)
        t = self._ttl(ttl)
        v = _check_version(if_version)
        # An open handle's config.max_keys is an int (__init__ replaces None with the
        # namespace's limit); ``or 0`` only tells the type checker so.
        ns, mk = self.namespace, self.config.max_keys or 0
        return self._write(lambda cid, no: Set(cid, no, ns, mk, key, data, t, v)).seq

    def set_many(self, mapping: Mapping[str, Any], *, ttl: float | timedelta | None = None) -> int:
        """Store several keys atomically (one event batch); returns the last version."""
        if not isinstance(mapping, Mapping):
            from broker.errors import InvalidValue

            raise InvalidValue(f"set_many takes a mapping of key -> value, got {type(mapping)}")
        items = [(check_key(k), encode_value(k, v, self._max_value_bytes))
                 for k, v in mapping.items()]
        if not items:
            return self._replica.seq
        t = self._ttl(ttl)
        ns, mk = self.namespace, self.config.max_keys or 0
        return self._write(lambda cid, no: SetMany(cid, no, ns, mk, items, t)).seq

    def delete(self, key: str, *, if_version: int | None = None) -> bool:
        """Remove ``key``; True if it existed (and had not expired). ``if_version``: only if
        the key is at that version, else VersionConflict."""
        check_key(key)
        v = _check_version(if_version)
        ns, mk = self.namespace, self.config.max_keys or 0
        return self._write(lambda cid, no: Delete(cid, no, ns, mk, key, v)).changed

    def touch(self, key: str, ttl: float | timedelta) -> int:
        """Give ``key`` a new TTL (seconds from now; 0 = never) without rewriting its value.
        KeyNotFound if absent. Returns the namespace seq of the change (the key's version is
        unchanged)."""
        check_key(key)
        if ttl is None:
            from broker.errors import InvalidValue

            raise InvalidValue("touch needs a ttl in seconds (0 = never expires)")
        t = self._ttl(ttl)
        ns, mk = self.namespace, self.config.max_keys or 0
        return self._write(lambda cid, no: Touch(cid, no, ns, mk, key, t)).seq

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove several keys atomically (one event batch: every node sees all of them go at
        once, or none); keys that are absent are skipped. Returns how many were removed.
        InvalidKey if one key is invalid, InvalidValue beyond 10 000 keys (nothing removed);
        AccessDenied without write permission."""
        if isinstance(keys, str):
            raise InvalidValue("delete_many takes an iterable of keys, not one str")
        wanted = [check_key(k) for k in dict.fromkeys(keys)]
        if not wanted:
            return 0
        ns, mk = self.namespace, self.config.max_keys or 0
        return self._write(lambda cid, no: DeleteMany(cid, no, ns, mk, wanted)).count

    def delete_pattern(self, pattern: str) -> int:
        """Remove every key matching the glob ``pattern`` (``list_keys`` syntax) atomically:
        the broker picks the keys and deletes them in one event batch, so no node ever sees a
        part of them gone. Returns how many were removed. PatternError if malformed;
        StorageError (nothing removed) if more than 100 000 keys match; AccessDenied without
        write permission."""
        compile_pattern(pattern)  # PatternError before anything is sent
        ns, mk = self.namespace, self.config.max_keys or 0
        return self._write(lambda cid, no: DeletePattern(cid, no, ns, mk, pattern)).count

    def drop_namespace(self) -> int:
        """Admin: delete every key of the namespace in one event batch; returns how many.
        The namespace itself stays (its limit, and its seq, which connected nodes rely on);
        AccessDenied without admin permission."""
        ns = self.namespace
        return self._write(lambda cid, no: DropNamespace(cid, no, ns)).count

    def set_max_keys(self, max_keys: int) -> None:
        """Admin: change the namespace's ``max_keys`` (0 = unlimited) for every node: it is
        logged (it survives restarts) and enforced by the broker from the next write on.
        StorageError (nothing changed) if the namespace holds more keys than that;
        AccessDenied without admin permission. This handle's ``config.max_keys`` follows."""
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 0:
            raise InvalidValue(f"max_keys must be an int >= 0 (0 = unlimited), got {max_keys!r}")
        ns = self.namespace
        self._write(lambda cid, no: SetMaxKeys(cid, no, ns, max_keys))
        self.config = replace(self.config, max_keys=max_keys)

    def update(self, key: str, fn: Callable[[Any], Any], *, default: Any = None,
               ttl: float | timedelta | None = None, retries: int = 1000) -> Any:
        """Read ``key`` (``default`` if absent), write ``fn(value)`` with compare-and-set, and
        retry on VersionConflict (up to ``retries`` times). Returns the value written."""
        deadline = time.monotonic() + self.config.request_timeout * max(1, retries)
        for _ in range(retries + 1):
            entry = self._entry(key)
            current = default if entry is None else entry.json()
            version = 0 if entry is None else entry.version
            new = fn(current)
            try:
                self.set(key, new, ttl=ttl, if_version=version)
                return new
            except VersionConflict as exc:
                # Our replica is behind the broker: wait until it shows the winner's write.
                seen = exc.current_version or 0
                self._wait_for_key_version(key, seen, deadline)
        raise VersionConflict(f"update of key {key!r} lost the race {retries + 1} times")

    def _wait_for_key_version(self, key: str, version: int, deadline: float) -> None:
        def shown() -> bool:
            state = self._state()
            raw = state.entries.get(key)
            return (entry_version(raw) if raw is not None else 0) >= version \
                or state.seq >= version

        with self._node.changed:
            self._node.wait_until(
                shown, min(deadline, time.monotonic() + self.config.request_timeout))

    # ------------------------------------------------------------------ watching

    def watch(self, pattern: str = "*", *, initial: bool = True,
              from_version: int | None = None) -> Watcher:
        """Changes of keys matching ``pattern``, in log order, as an iterator (and context
        manager). ``initial``: first the current values (``initial=True`` events), then an
        ``initial_done`` marker, then live changes. ``from_version``: instead of the current
        values, the changes after that version (from the broker's log; if the log no longer
        has them, the current values marked ``resync``), then the marker."""
        return self._watch(pattern, initial, from_version, None)

    def on_change(self, pattern: str, callback: Callable[[ChangeEvent], object]
                  ) -> CallbackHandle:
        """Run ``callback(change)`` on a background thread for every live change matching
        ``pattern``; returns a handle whose ``cancel()`` stops it."""
        return CallbackHandle(self._watch(pattern, False, None, None), callback)

    def _watch(self, pattern: str, initial: bool, from_version: int | None,
               loop: Any) -> Watcher:
        p = compile_pattern(pattern)
        if from_version is not None and (isinstance(from_version, bool)
                                         or not isinstance(from_version, int)
                                         or from_version < 0):
            from broker.errors import InvalidValue

            raise InvalidValue(f"from_version must be an int >= 0, got {from_version!r}")
        ns = self.namespace
        watcher = Watcher(p, lambda w: self._node.remove_watcher(ns, w), loop)
        now = time.monotonic()
        with self._lock:
            state = self._state()
            self._node.add_watcher(ns, watcher)
            seq, epoch = state.seq, self._replica.epoch
            current = [(k, state.entries[k]) for k in state.candidates(p, now)]
        # Filtered outside the lock (as in list_keys); entries are immutable once applied.
        current = [(k, e) for k, e in current if p.matches(k)]
        backlog: list[ChangeEvent] = []
        resync_marker = False
        if from_version is not None:
            events = self._fetch_log(from_version + 1, seq, epoch) if from_version < seq else []
            if events is None:
                backlog += [_initial_change(k, e, resync=True) for k, e in current]
                resync_marker = True
            else:
                backlog += [change_from_event(e) for e in events if p.matches(e.key)]
        elif initial:
            backlog += [_initial_change(k, e) for k, e in current]
        # Changes the caller already has (up to from_version, even if that is ahead of this
        # replica) are never delivered twice.
        through = max(seq, from_version or 0)
        if initial or from_version is not None:
            # resync=True on the marker: the log could not replay the gap, so the values
            # before it are the whole current state -- reset your view to them.
            backlog.append(ChangeEvent("", INITIAL_DONE, through, resync=resync_marker))
        watcher.release(backlog, through_version=through)
        return watcher

    def _fetch_log(self, first: int, last: int, epoch: str | None) -> list[Any] | None:
        """Events ``first..last`` from the broker's log, or None if it no longer has them."""
        out: list[Any] = []
        deadline = time.monotonic() + self.config.request_timeout
        while first <= last:
            reply = self._node.request(Fetch(self.namespace, epoch or "", first, 0,
                                             min(10_000, last - first + 1)), deadline)
            if not isinstance(reply, FetchReply) or not reply.available or not reply.events:
                return None
            out += [e for e in reply.events if e.seq <= last]
            first = reply.events[-1].seq + 1
        return out


def _check_version(v: object) -> int | None:
    return check_version(v, "if_version")


def _initial_change(key: str, raw: bytes, *, resync: bool = False) -> ChangeEvent:
    e = decode_entry(raw)
    return ChangeEvent(key, "set", e.version, e.json(),
                       datetime.fromtimestamp(e.modified_at, UTC), initial=True, resync=resync)


class AsyncSharedMemory:
    """The asyncio twin of ``SharedMemory``: reads run inline (they never block), writes and
    connecting run in a worker thread so the event loop never waits on the network.

    Arguments, return values and errors are those of the ``SharedMemory`` method of the same
    name; only the waiting differs."""

    def __init__(self, config: SharedMemoryConfig | None = None) -> None:
        self.config = config or SharedMemoryConfig()
        self._shm: SharedMemory | None = None

    async def open(self) -> AsyncSharedMemory:
        """Connect and replicate the namespace (in a worker thread); returns ``self``.
        Idempotent. Raises what ``SharedMemory()`` raises."""
        if self._shm is None:
            self._shm = await asyncio.to_thread(SharedMemory, self.config)
            self.config = self._shm.config  # the namespace's settings in effect
        return self

    async def __aenter__(self) -> AsyncSharedMemory:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Leave the namespace and release the node (in a worker thread); idempotent."""
        if self._shm is not None:
            shm, self._shm = self._shm, None
            await asyncio.to_thread(shm.close)

    @property
    def sync(self) -> SharedMemory:
        """The underlying ``SharedMemory``; StorageError before ``open()``."""
        if self._shm is None:
            raise StorageError("AsyncSharedMemory is not open: use 'async with' or await open()")
        return self._shm

    async def get(self, key: str, default: Any = _MISSING, *, consistent: bool = False) -> Any:
        """The value of ``key`` (a fresh copy), ``default`` or KeyNotFound if absent. Local
        and inline; ``consistent=True`` first catches up with the broker in a worker thread."""
        if consistent:
            await asyncio.to_thread(self.sync.sync_with_broker)
        return self.sync.get(key, default)

    async def get_many(self, keys: Iterable[str], *, consistent: bool = False
                       ) -> dict[str, Any]:
        """The values of several keys at one seq (dict in the order given, absent ones left
        out). Local and inline; see ``get`` for ``consistent``."""
        keys = list(keys)
        if consistent:
            await asyncio.to_thread(self.sync.sync_with_broker)
        return self.sync.get_many(keys)

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is present and not expired in the local replica (inline)."""
        return self.sync.exists(key)

    async def get_metadata(self, key: str) -> Metadata:
        """Size, timestamps, expiry and version of ``key``; KeyNotFound if absent (inline)."""
        return self.sync.get_metadata(key)

    async def list_keys(self, pattern: str = "*", *, consistent: bool = False) -> list[str]:
        """The sorted keys matching the glob ``pattern`` (PatternError if malformed); see
        ``get`` for ``consistent``."""
        if consistent:
            await asyncio.to_thread(self.sync.sync_with_broker)
        return self.sync.list_keys(pattern)

    async def status(self) -> Status:
        """How fresh this handle's replica is (inline)."""
        return self.sync.status()

    async def set(self, key: str, value: Any, *, ttl: float | timedelta | None = None,
                  if_version: int | None = None) -> int:
        """Write ``value`` under ``key`` (worker thread); returns its version. ``ttl``: seconds
        or timedelta, None = the config's default, 0 = never; ``if_version``: compare-and-set
        (0 = only if absent), else VersionConflict."""
        return await asyncio.to_thread(self.sync.set, key, value, ttl=ttl,
                                       if_version=if_version)

    async def set_many(self, mapping: Mapping[str, Any], *,
                       ttl: float | timedelta | None = None) -> int:
        """Write every item of ``mapping`` as one atomic batch (worker thread); returns the
        version of the last one."""
        return await asyncio.to_thread(self.sync.set_many, mapping, ttl=ttl)

    async def delete(self, key: str, *, if_version: int | None = None) -> bool:
        """Delete ``key`` (worker thread); True if it existed."""
        return await asyncio.to_thread(self.sync.delete, key, if_version=if_version)

    async def touch(self, key: str, ttl: float | timedelta) -> int:
        """Give ``key`` a new time to live from now (0 = never expires), keeping its value
        and version (worker thread); KeyNotFound if absent."""
        return await asyncio.to_thread(self.sync.touch, key, ttl)

    async def delete_many(self, keys: Iterable[str]) -> int:
        """Remove several keys atomically (worker thread); returns how many were removed."""
        if isinstance(keys, str):
            raise InvalidValue("delete_many takes an iterable of keys, not one str")
        return await asyncio.to_thread(self.sync.delete_many, list(keys))

    async def delete_pattern(self, pattern: str) -> int:
        """Remove every key matching the glob atomically (worker thread); returns how many."""
        return await asyncio.to_thread(self.sync.delete_pattern, pattern)

    async def drop_namespace(self) -> int:
        """Admin: delete every key of the namespace in one batch (worker thread)."""
        return await asyncio.to_thread(self.sync.drop_namespace)

    async def set_max_keys(self, max_keys: int) -> None:
        """Admin: change the namespace's ``max_keys`` for every node (worker thread)."""
        await asyncio.to_thread(self.sync.set_max_keys, max_keys)
        self.config = self.sync.config

    async def namespace_info(self) -> NamespaceInfo:
        """The broker's key count, seq and ``max_keys`` of this namespace (worker thread)."""
        return await asyncio.to_thread(self.sync.namespace_info)

    async def update(self, key: str, fn: Callable[[Any], Any], *, default: Any = None,
                     ttl: float | timedelta | None = None, retries: int = 1000) -> Any:
        """Read-modify-write ``key`` with compare-and-set retries (worker thread; ``fn`` runs
        there too); returns the value written."""
        return await asyncio.to_thread(self.sync.update, key, fn, default=default, ttl=ttl,
                                       retries=retries)

    def watch(self, pattern: str = "*", *, initial: bool = True,
              from_version: int | None = None) -> Watcher:
        """An async iterator of changes (``async for change in shm.watch(...)``, or
        ``await watcher.aget(timeout=...)``). Call it inside the running loop."""
        return self.sync._watch(pattern, initial, from_version, asyncio.get_running_loop())

    @property
    def seq(self) -> int:
        """The seq of the namespace's last event applied to this replica."""
        return self.sync.seq

    def local_digest(self) -> tuple[int, str]:
        """(seq, digest) of this replica's state (inline, not awaited)."""
        return self.sync.local_digest()

    async def broker_digest(self) -> tuple[int, str]:
        """(seq, digest) of the broker's state of the namespace (worker thread)."""
        return await asyncio.to_thread(self.sync.broker_digest)


class Registry:
    """Hands out one ``SharedMemory`` per distinct config (the seed's
    ``get_or_create_shared_memory_plugin``)."""

    def __init__(self) -> None:
        self._items: dict[SharedMemoryConfig, SharedMemory] = {}
        self._lock = threading.Lock()

    def get_or_create(self, config: SharedMemoryConfig) -> SharedMemory:
        with self._lock:
            shm = self._items.get(config)
            if shm is None or shm.closed:
                shm = self._items[config] = SharedMemory(config)
            return shm

    def close(self) -> None:
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for shm in items:
            shm.close()


_registry = Registry()


def get_or_create(config: SharedMemoryConfig) -> SharedMemory:
    """The process-wide registry's handle for ``config``."""
    return _registry.get_or_create(config)
