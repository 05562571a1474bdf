"""``SharedMemoryConfig``: what a ``SharedMemory`` connects to and its defaults, validated once.

Frozen and hashable, so equal configs find the same object in a ``Registry``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from broker.errors import InvalidNamespace
from broker.validation import MAX_TTL_SECONDS, check_namespace, has_scheme, scheme_hint

EMBEDDED = "embedded"
DEFAULT_MAX_KEYS = 10000  # what max_keys=None creates a namespace with


def seed_list(value: str | Sequence[str], *, source: str = "broker") -> tuple[str, ...]:
    """The seed addresses of ``value``: one address, several separated by commas, or a list.

    A seed list names a broker group (or a single broker) reachable at any of its entries
    (docs/groups.md, "Nodes"). Each entry must be an address as a single ``broker`` is
    (``tcp://``, ``ipc://`` or ``inproc://``); ``"embedded"`` stands only alone, since the
    in-process broker is never part of a group. Duplicates are dropped, the order is kept
    (it is the order the seeds are tried in).

    Raises:
        ValueError: naming ``source``, the bad entry and what is wrong with it.
    """
    if isinstance(value, str):
        entries = [e.strip() for e in value.split(",")] if "," in value else [value]
    elif isinstance(value, Sequence) and value and all(isinstance(e, str) for e in value):
        entries = [e.strip() for e in value]
    else:
        raise ValueError(f"{source} must be an address string or a non-empty list of address "
                         f"strings, got {value!r}")
    if len(entries) == 1 and entries[0] == EMBEDDED:
        return (EMBEDDED,)
    out: list[str] = []
    for i, entry in enumerate(entries, 1):
        where = f"{source}: entry {i} of {value!r}" if len(entries) > 1 else source
        if entry == EMBEDDED:
            raise ValueError(f"{where} is 'embedded': the in-process broker cannot be part of "
                             "a seed list (give it alone)")
        if not entry:
            raise ValueError(f"{where} is empty (a stray comma?)")
        if not has_scheme(entry) or entry.endswith("://"):
            raise ValueError(
                f"{where} must be 'tcp://HOST:PORT' (or ipc:// / inproc://, or 'embedded' "
                f"alone), got {entry!r}" + scheme_hint(entry))
        if entry not in out:
            out.append(entry)
    return tuple(out)


def to_seconds(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """A duration given as int, float or ``timedelta`` -> float seconds (ValueError naming
    ``name`` if negative, not finite or not a number). Shared by the config, the API's ``ttl``
    arguments and the CLI; the wire's TTL <-> deadline conversion is broker/ttl.py."""
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be seconds (int, float or timedelta), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _load_certificate(name: str, path: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a zmq certificate file; ValueError naming the field."""
    import zmq.auth

    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: cannot load {path}: {exc}") from None


def _as_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode("ascii")


@dataclass(frozen=True)
class SharedMemoryConfig:
    """Settings of one shared-memory handle.

    - ``max_keys``: the namespace's capacity, 0 = unlimited. A setting of the *namespace*: the
      first opener creates it with this limit; a handle opening an existing namespace uses the
      namespace's limit (one WARNING naming both if this one differs; None = adopt silently,
      or create with ``DEFAULT_MAX_KEYS``). The handle's ``config.max_keys`` is the limit in
      effect.
    - ``ttl``: default time to live of a write in seconds (int, float or timedelta), 0 = never.
    - ``namespace``: ``[A-Za-z0-9_.-]{1,128}``.
    - ``broker``: ``"tcp://HOST:PORT"``, or ``"embedded"`` for the process's in-process broker
      (nothing shared with other processes). None = ``$SHAREDMEM_BROKER`` if set, else the
      local default broker ``tcp://127.0.0.1:7400`` if one listens, else the embedded broker
      with one WARNING (other processes will not see its writes). A seed list
      (``"tcp://h1:7400,tcp://h2:7400"`` or a list of such strings; the same string in
      ``$SHAREDMEM_BROKER``) names a broker group, or a single broker, at any of them; a list
      is stored as a tuple (hashable).
    - ``request_timeout``: how long a write may take, retries included, before
      ``BrokerUnavailable``; ``connect_timeout``: the same for opening the namespace;
      ``retry_interval``: the first Lazy Pirate timeout (grows up to 4x per attempt).
    - ``max_staleness``: seconds; when set, reads raise StorageError ("stale: ...") once the
      node has heard nothing from the broker for longer. None = always serve.
    - ``receive_hwm``: the node's SUB high-water mark in messages (a slow consumer past it
      loses events, detects the gap and repairs). Fixed by the first handle of a process for a
      broker address.
    - CURVE (docs/security.md): ``curve_key_file`` (this node's ``NAME.key_secret``) and
      ``broker_key_file`` (the broker's ``NAME.key``), or the z85 strings
      ``curve_public_key``/``curve_secret_key``/``broker_public_key``. All or nothing.
    """

    max_keys: int | None = 10000
    ttl: float | timedelta = 3600.0  # stored as float seconds
    namespace: str = "shared"
    broker: str | Sequence[str] | None = None
    request_timeout: float = 10.0
    connect_timeout: float = 10.0
    retry_interval: float = field(default=1.0, compare=True)
    max_staleness: float | None = None
    receive_hwm: int = 1_000_000
    curve_public_key: str | None = None
    curve_secret_key: str | None = None
    broker_public_key: str | None = None
    curve_key_file: str | None = None
    broker_key_file: str | None = None

    def __post_init__(self) -> None:
        if self.max_keys is not None and (isinstance(self.max_keys, bool)
                                          or not isinstance(self.max_keys, int)
                                          or self.max_keys < 0):
            raise ValueError(f"max_keys must be an int >= 0 (0 = unlimited) or None, got "
                             f"{self.max_keys!r}")
        ttl = to_seconds("ttl", self.ttl)
        if ttl is not None and ttl > MAX_TTL_SECONDS:
            raise ValueError(f"ttl must be at most {MAX_TTL_SECONDS} seconds (10 years), "
                             f"got {self.ttl!r}")
        object.__setattr__(self, "ttl", ttl)
        try:
            check_namespace(self.namespace)
        except InvalidNamespace as exc:  # a ValueError too, as the contract asks
            raise InvalidNamespace(f"namespace: {exc}") from None
        if self.broker is not None:
            seeds = seed_list(self.broker)
            if not isinstance(self.broker, str):  # a list: kept as a tuple, so still hashable
                object.__setattr__(self, "broker", seeds)
        for name in ("request_timeout", "connect_timeout", "retry_interval"):
            v = to_seconds(name, getattr(self, name))
            if not v:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)

        if self.max_staleness is not None:
            v = to_seconds("max_staleness", self.max_staleness)
            if not v:
                raise ValueError(f"max_staleness must be > 0 or None, got {self.max_staleness!r}")
            object.__setattr__(self, "max_staleness", v)
        if isinstance(self.receive_hwm, bool) or not isinstance(self.receive_hwm, int) \
                or self.receive_hwm < 0:
            raise ValueError(f"receive_hwm must be an int >= 0, got {self.receive_hwm!r}")

        own = (self.curve_public_key or self.curve_secret_key) is not None or \
            self.curve_key_file is not None
        server = self.broker_public_key is not None or self.broker_key_file is not None
        if own != server:
            raise ValueError("curve: give this node's keys (curve_key_file or curve_public_key + "
                             "curve_secret_key) together with the broker's (broker_key_file or "
                             "broker_public_key)")
        if own:
            self.curve_keys()  # fail now, naming the field, if a key cannot be read

    def curve_keys(self) -> tuple[bytes, bytes, bytes] | None:
        """(public, secret, broker public) as z85 bytes, or None without CURVE."""
        if self.curve_key_file is None and self.curve_public_key is None \
                and self.curve_secret_key is None:
            return None
        if self.curve_key_file is not None:
            public, secret = _load_certificate("curve_key_file", self.curve_key_file)
            if secret is None:
                raise ValueError(f"curve_key_file: {self.curve_key_file} holds no secret key")
        else:
            if not self.curve_public_key or not self.curve_secret_key:
                raise ValueError("curve_public_key and curve_secret_key go together")
            public, secret = _as_bytes(self.curve_public_key), _as_bytes(self.curve_secret_key)
        if self.broker_key_file is not None:
            server, _ = _load_certificate("broker_key_file", self.broker_key_file)
        else:
            assert self.broker_public_key is not None
            server = _as_bytes(self.broker_public_key)
        for name, key in (("curve public key", public), ("curve secret key", secret),
                          ("broker_public_key", server)):
            if len(key) != 40:
                raise ValueError(f"{name}: a z85 CURVE key has 40 characters")
        return public, secret, server

    def resolved_broker(self) -> str | None:
        """The configured broker address (or ``"embedded"``); None = nothing configured (the
        handle then looks for the local default broker, see ``broker``). A seed list comes
        back as one string, its entries joined by commas."""
        if self.broker is not None:
            return ",".join(seed_list(self.broker))
        env = os.environ.get("SHAREDMEM_BROKER")
        if not env:
            return None
        return ",".join(seed_list(env, source="SHAREDMEM_BROKER"))
