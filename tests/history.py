"""A history checker for the guarantees of docs/consistency.md (pure: no sockets).

Tests record what clients did and saw, then check it against the broker's complete ordered event
log of the namespace:

- ``attempt(writer, op, key, value)``: a write was sent (whatever its outcome; record it before
  sending, so a write whose reply was lost still counts as attempted);
- ``ack(writer, op, key, value, version)``: the write was acknowledged at ``version`` (the seq
  of its event; ``set_many`` gives the last one -- use ``ack_many``);
- ``read(node, key, value, seq, epoch)``: ``node`` read ``value`` (``MISSING`` if absent) from a
  replica at ``seq`` of ``epoch``. Record reads of one node in the order they were taken (take
  them with ``observe``, which reads and records under the node's lock).

``check(log_events)`` verifies, raising ``AssertionError`` with a precise message:

1. the log's seqs are exactly 1..N;
2. every acknowledged write is in the log at its version (``KeySet`` with that key and value,
   ``KeyDeleted`` for a delete), and no two acks claim the same version;
3. no write is applied more often than it was attempted: a ``KeySet`` of (key, value) occurs at
   most as often as (key, value) was attempted (a retried request appears once; a write nobody
   attempted appears never), likewise ``KeyDeleted`` per key;
4. every read is what the log says at the read's seq (replay of events 1..seq): the value, or
   ``MISSING`` if the key is absent then. A key that was set with a TTL may read ``MISSING``
   early (expiry is a view on each node; the ``KeyExpired`` event comes later);
5. each node's read seqs never decrease within an epoch (monotonic reads).

``check_final(node_digests, broker_digest)`` checks convergence: every node's (seq, digest)
equals the broker's; with ``log_events`` it also replays the log and requires the same digest.
Values are compared as canonical JSON (``1`` and ``True`` and ``1.0`` differ).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

_OPS = ("set", "delete")


_canonical = msgspec.json.Encoder(order="sorted").encode


def canon(value: Any) -> str:
    """Canonical JSON text of a value: sorted keys, no spaces (MISSING stays distinct)."""
    if value is MISSING:
        return "<MISSING>"
    return _canonical(value).decode()


def _show(value: Any, limit: int = 80) -> str:
    """A value for an error message (long values shortened)."""
    text = canon(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _vkey(value: Any) -> bytes:
    """A compact identity of a value's canonical JSON (logs of big values stay cheap)."""
    if value is MISSING:
        return b"<MISSING>"
    return hashlib.blake2b(_canonical(value), digest_size=16).digest()


_MISSING_KEY = _vkey(MISSING)


@dataclass(frozen=True)
class Ack:
    writer: str
    op: str
    key: str
    value: Any
    version: int | None


@dataclass(frozen=True)
class Attempt:
    writer: str
    op: str
    key: str
    value: Any


@dataclass(frozen=True)
class Read:
    node: str
    key: str
    value: Any
    seq: int
    epoch: str | None


@dataclass(frozen=True)
class Summary:
    events: int
    acks: int
    attempts: int
    reads: int
    nodes: int


def _event_kind(event: Any) -> str:
    return type(event).__name__


class History:
    """Recorded operations of one namespace; thread-safe to record into."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acks: list[Ack] = []
        self.attempts: list[Attempt] = []
        self.reads: list[Read] = []

    # ------------------------------------------------------------------ recording

    def attempt(self, writer: str, op: str, key: str, value: Any = None) -> None:
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, got {op!r}")
        with self._lock:
            self.attempts.append(Attempt(writer, op, key, value if op == "set" else None))

    def ack(self, writer: str, op: str, key: str, value: Any, version: int | None) -> None:
        """An acknowledged write. ``version`` None: the API did not say (e.g. ``delete``);
        then only its presence somewhere in the log is checked. Do not record a delete that
        reported ``False`` (it produced no event)."""
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, got {op!r}")
        with self._lock:
            self.acks.append(Ack(writer, op, key, value if op == "set" else None, version))

    def attempt_many(self, writer: str, items: Mapping[str, Any]) -> None:
        for key, value in items.items():
            self.attempt(writer, "set", key, value)

    def ack_many(self, writer: str, items: Mapping[str, Any], last_version: int) -> None:
        """A ``set_many`` acknowledged at ``last_version``: its items hold the seqs
        ``last_version - len(items) + 1 .. last_version`` in the mapping's order."""
        first = last_version - len(items) + 1
        for i, (key, value) in enumerate(items.items()):
            self.ack(writer, "set", key, value, first + i)

    def read(self, node: str, key: str, value: Any, seq: int, epoch: str | None = None) -> None:
        with self._lock:
            self.reads.append(Read(node, key, value, seq, epoch))

    # ------------------------------------------------------------------ checking

    def check(self, log_events: Sequence[Any], *, epoch: str | None = None) -> Summary:
        """Check everything recorded against the namespace's complete log (see module doc).
        ``epoch``: the log's epoch; reads from any other epoch are then an error."""
        with self._lock:
            acks, attempts, reads = list(self.acks), list(self.attempts), list(self.reads)
        events = list(log_events)
        self._check_contiguous(events)
        vkeys = [_vkey(_decode(e.value)) if _event_kind(e) == "KeySet" else None
                 for e in events]
        # Acks and attempts usually share their value objects: hash each object once.
        cache: dict[int, bytes] = {}

        def vkey_of(value: Any) -> bytes:
            k = cache.get(id(value))
            if k is None:
                k = cache[id(value)] = _vkey(value)
            return k

        self._check_acks(events, vkeys, acks, vkey_of)
        self._check_attempts(events, vkeys, attempts, vkey_of)
        self._check_reads(events, vkeys, reads, epoch)
        return Summary(len(events), len(acks), len(attempts), len(reads),
                       len({r.node for r in reads}))

    @staticmethod
    def _check_contiguous(events: Sequence[Any]) -> None:
        for i, event in enumerate(events):
            if event.seq != i + 1:
                prev = events[i - 1].seq if i else None
                raise AssertionError(
                    f"log seqs are not 1..{len(events)} contiguous: position {i} holds seq "
                    f"{event.seq} (previous seq {prev})"
                )

    @staticmethod
    def _check_acks(events: Sequence[Any], vkeys: Sequence[bytes | None],
                    acks: Iterable[Ack], vkey_of: Callable[[Any], bytes]) -> None:
        n = len(events)
        claimed: dict[int, Ack] = {}
        for a in acks:
            akey = vkey_of(a.value) if a.op == "set" else None
            if a.version is None:
                if not any(_matches(e, vk, a, akey) for e, vk in zip(events, vkeys, strict=True)):
                    raise AssertionError(f"{_what(a)} is not in the log at all (lost write)")
                continue
            if not 1 <= a.version <= n:
                raise AssertionError(
                    f"{_what(a)} at version {a.version} is not in the log (log holds seqs "
                    f"1..{n}): lost write"
                )
            other = claimed.get(a.version)
            if other is not None:
                raise AssertionError(
                    f"two acknowledged writes claim version {a.version}: {other} and {a}"
                )
            claimed[a.version] = a
            e = events[a.version - 1]
            if not _matches(e, vkeys[a.version - 1], a, akey):
                raise AssertionError(
                    f"{_what(a)} at version {a.version}, but the log has {_describe(e)} there "
                    f"(lost write)"
                )

    @staticmethod
    def _check_attempts(events: Sequence[Any], vkeys: Sequence[bytes | None],
                        attempts: Iterable[Attempt], vkey_of: Callable[[Any], bytes]) -> None:
        tried_sets: Counter[tuple[str, bytes]] = Counter()
        tried_deletes: Counter[str] = Counter()
        for t in attempts:
            if t.op == "set":
                tried_sets[(t.key, vkey_of(t.value))] += 1
            else:
                tried_deletes[t.key] += 1
        seen_sets: dict[tuple[str, bytes], list[Any]] = defaultdict(list)
        seen_deletes: dict[str, list[int]] = defaultdict(list)
        for e, vk in zip(events, vkeys, strict=True):
            if vk is not None:
                seen_sets[(e.key, vk)].append(e)
            elif _event_kind(e) == "KeyDeleted":
                seen_deletes[e.key].append(e.seq)
        for pair, applied in seen_sets.items():
            tried = tried_sets.get(pair, 0)
            if len(applied) <= tried:
                continue
            seqs = [e.seq for e in applied]
            shown = f"{pair[0]!r}={_show(_decode(applied[0].value))}"
            if tried == 0:
                raise AssertionError(
                    f"the log sets {shown} (seq {seqs}) but that write was never attempted "
                    f"by any client"
                )
            raise AssertionError(
                f"the log sets {shown} {len(applied)} times (seqs {seqs}) but it was "
                f"attempted only {tried} time(s): a write was applied more than once"
            )
        for key, seqs in seen_deletes.items():
            tried = tried_deletes.get(key, 0)
            if len(seqs) > tried:
                raise AssertionError(
                    f"the log deletes {key!r} {len(seqs)} times (seqs {seqs}) but a delete of "
                    f"it was attempted {tried} time(s)"
                )

    @staticmethod
    def _check_reads(events: Sequence[Any], vkeys: Sequence[bytes | None],
                     reads: Iterable[Read], epoch: str | None) -> None:
        # Per key: the seqs at which it changed and what it held from then on.
        change_seqs: dict[str, list[int]] = defaultdict(list)
        change_vals: dict[str, list[tuple[bytes, bool]]] = defaultdict(list)  # (value, has_ttl)
        for e, vk in zip(events, vkeys, strict=True):
            if vk is not None:
                val = (vk, e.ttl is not None)
            elif _event_kind(e) in ("KeyDeleted", "KeyExpired"):
                val = (_MISSING_KEY, False)
            else:
                raise AssertionError(f"not an event in the log: {e!r}")
            change_seqs[e.key].append(e.seq)
            change_vals[e.key].append(val)
        n = len(events)
        last: dict[tuple[str, str | None], Read] = {}
        for r in reads:
            if epoch is not None and r.epoch != epoch:
                raise AssertionError(
                    f"{r.node} read {r.key!r} at seq {r.seq} of epoch {r.epoch}, but the log is "
                    f"of epoch {epoch}"
                )
            prev = last.get((r.node, r.epoch))
            if prev is not None and r.seq < prev.seq:
                raise AssertionError(
                    f"non-monotonic reads on {r.node}: read {prev.key!r} at seq {prev.seq}, "
                    f"then {r.key!r} at seq {r.seq} (epoch {r.epoch})"
                )
            last[(r.node, r.epoch)] = r
            if not 0 <= r.seq <= n:
                raise AssertionError(
                    f"{r.node} read {r.key!r} at seq {r.seq}, beyond the log (seqs 1..{n})"
                )
            seqs = change_seqs.get(r.key, [])
            i = bisect.bisect_right(seqs, r.seq) - 1
            if i < 0:
                expected, has_ttl, at = _MISSING_KEY, False, None
            else:
                (expected, has_ttl), at = change_vals[r.key][i], seqs[i]
            if _vkey(r.value) == expected:
                continue
            if has_ttl and r.value is MISSING:
                continue  # expired on the node's clock before its KeyExpired event
            if at is None:
                where = f"{r.key!r} was never written up to then"
            elif expected == _MISSING_KEY:
                where = f"{r.key!r} was removed at seq {at}"
            else:
                where = f"{r.key!r}={_show(_decode(events[at - 1].value))} (set at seq {at})"
            raise AssertionError(
                f"{r.node} read {r.key!r}={_show(r.value)} at seq {r.seq}, but in the log up "
                f"to seq {r.seq} {where}: the read is not a prefix of the log"
            )

    # ------------------------------------------------------------------ convergence

    @staticmethod
    def check_final(node_digests: Mapping[str, tuple[int, str]],
                    broker_digest: tuple[int, str], *, log_events: Sequence[Any] | None = None,
                    namespace: str | None = None) -> None:
        """Every node's (seq, digest) equals the broker's; with ``log_events`` and
        ``namespace``, the broker's digest also equals a replay of the log."""
        if not node_digests:
            raise AssertionError("check_final: no node digests given")
        wrong = {name: d for name, d in node_digests.items() if tuple(d) != tuple(broker_digest)}
        if wrong:
            detail = ", ".join(f"{name} at seq {d[0]} digest {d[1][:12]}"
                               for name, d in sorted(wrong.items()))
            raise AssertionError(
                f"{len(wrong)} of {len(node_digests)} nodes did not converge to the broker "
                f"(seq {broker_digest[0]} digest {broker_digest[1][:12]}): {detail}"
            )
        if log_events is not None:
            if namespace is None:
                raise ValueError("check_final: log_events needs namespace")
            replayed = replay_digest(namespace, log_events)
            if replayed != tuple(broker_digest):
                raise AssertionError(
                    f"the broker's state (seq {broker_digest[0]} digest {broker_digest[1][:12]}) "
                    f"is not the replay of its log (seq {replayed[0]} digest {replayed[1][:12]})"
                )


def replay_digest(namespace: str, log_events: Sequence[Any]) -> tuple[int, str]:
    """(seq, digest) of the state the events 1..N build (the product's digest function)."""
    from broker.state import NamespaceState

    state = NamespaceState(namespace)
    state.apply_batch(list(log_events), time.monotonic())
    return state.seq, state.digest()


def observe(history: History, node: str, shm: Any, key: str) -> Any:
    """Read ``key`` from a ``SharedMemory`` and record the read with the seq and epoch it
    reflects, all under the node's lock (so one node's reads are recorded in order)."""
    with shm._lock:
        replica = shm._replica
        state = replica.state
        entry = state.live(key, time.monotonic())
        value = MISSING if entry is None else json.loads(entry.value)
        history.read(node, key, value, state.seq, replica.epoch)
    return value


def _decode(data: bytes) -> Any:
    return msgspec.json.decode(data)


def _what(a: Ack) -> str:
    shown = f"={_show(a.value)}" if a.op == "set" else ""
    return f"acknowledged {a.op} of {a.key!r}{shown} by {a.writer}"


def _matches(event: Any, vkey: bytes | None, a: Ack, akey: bytes | None) -> bool:
    kind = _event_kind(event)
    if a.op == "set":
        return kind == "KeySet" and event.key == a.key and vkey == akey
    return kind == "KeyDeleted" and event.key == a.key


def _describe(event: Any) -> str:
    kind = _event_kind(event)
    if kind == "KeySet":
        return f"KeySet({event.key!r}={_show(_decode(event.value))})"
    return f"{kind}({event.key!r})"
