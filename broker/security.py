"""Who may do what: CURVE keys and per-namespace permissions, loaded from a TOML file.

Owns the decision "may the client with this authenticated key do <read|write|admin> on this
namespace?" -- pure, no sockets. The ZeroMQ shell supplies the key (the ``User-Id`` that ZAP
attached to each message) and enforces the answer on every socket, subscriptions included.

Config file (``python -m broker --config FILE``)::

    [broker]
    secret_key_file = "keys/broker.key_secret"   # from `python -m broker keygen`
    bind = ["tcp://0.0.0.0:7400"]                 # optional; --bind wins

    [clients.alice]
    public_key_file = "keys/alice.key"            # or public_key = "<z85>"
    permissions = { "app1" = ["read", "write"], "app2" = ["read"], "logs_*" = ["read"] }

    [members.m1]                                  # broker groups (docs/groups.md):
    public_key_file = "keys/m1.key"               # the key of member m1's [broker] pair

Namespace keys are glob patterns (the ``list_keys`` syntax). A client may do exactly what one
of its matching entries grants (``admin`` implies ``write`` implies ``read``); anything else is
AccessDenied. A key that is not listed cannot even complete the CURVE handshake.

``[members.NAME]`` lists the group's members by ``--member`` name: only those keys complete the
handshake on a member's replication endpoint, and only they may ship records,
ack, or announce a term. Member keys and client keys are kept apart (a key may not be both), so
a client key can never speak on the replication link, and a member key makes no requests.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import zmq.auth

from broker.pattern import Pattern, compile_pattern

PERMISSIONS = ("read", "write", "admin")
_IMPLIES = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}


class SecurityConfigError(ValueError):
    """Raised when the security file is malformed; the message names the field."""


@dataclass
class Client:
    name: str
    public_key: bytes  # z85
    grants: list[tuple[Pattern, frozenset[str]]] = field(default_factory=list)

    def may(self, namespace: str, permission: str) -> bool:
        return any(permission in perms and p.matches(namespace) for p, perms in self.grants)


@dataclass
class Security:
    """CURVE key pair of the broker and the known clients, by z85 public key."""

    public_key: bytes
    secret_key: bytes
    clients: dict[bytes, Client]
    members: dict[str, bytes] = field(default_factory=dict)  # member name -> z85 public key

    def member_named(self, user_id: bytes | str | None) -> str | None:
        """The member whose key authenticated ``user_id`` (a ZAP User-Id), if any."""
        if user_id is None:
            return None
        key = user_id.encode() if isinstance(user_id, str) else user_id
        for name, k in self.members.items():
            if k == key:
                return name
        return None

    def is_member_key(self, z85_key: bytes) -> bool:
        return z85_key in self.members.values()

    def client(self, user_id: bytes | str | None) -> Client | None:
        if user_id is None:
            return None
        key = user_id.encode() if isinstance(user_id, str) else user_id
        return self.clients.get(key)

    def allowed(self, user_id: bytes | str | None, namespace: str, permission: str) -> bool:
        c = self.client(user_id)
        return c is not None and c.may(namespace, permission)

    def is_known_key(self, z85_key: bytes) -> bool:
        return z85_key in self.clients


def _read_key(base: Path, table: dict, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    field_name = "secret_key_file" if secret else "public_key_file"
    if field_name in table:
        path = (base / table[field_name]).resolve()
        try:
            public, secret_key = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as exc:
            raise SecurityConfigError(f"{name}.{field_name}: cannot load {path}: {exc}") from None
        if secret and secret_key is None:
            raise SecurityConfigError(f"{name}.{field_name}: {path} holds no secret key")
        return public, secret_key
    if not secret and "public_key" in table:
        key = str(table["public_key"]).encode()
        if len(key) != 40:
            raise SecurityConfigError(f"{name}.public_key: a z85 CURVE key has 40 characters")
        return key, None
    raise SecurityConfigError(f"{name}: needs {field_name}" + ("" if secret else " or public_key"))


def load_security(path: str | Path) -> tuple[Security, dict]:
    """Parse the config file; returns the Security and the raw ``[broker]`` table."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SecurityConfigError(f"cannot read {path}: {exc}") from None
    base = path.parent
    broker = data.get("broker", {})
    public, secret = _read_key(base, broker, "broker", secret=True)
    assert secret is not None
    clients: dict[bytes, Client] = {}
    for name, table in (data.get("clients") or {}).items():
        key, _ = _read_key(base, table, f"clients.{name}", secret=False)
        grants = []
        for ns_pattern, perms in (table.get("permissions") or {}).items():
            if isinstance(perms, str):
                perms = [perms]
            unknown = set(perms) - set(PERMISSIONS)
            if unknown:
                raise SecurityConfigError(
                    f"clients.{name}.permissions.{ns_pattern}: unknown {sorted(unknown)}; "
                    f"use {', '.join(PERMISSIONS)}")
            implied: set[str] = set()
            for perm in perms:
                implied |= _IMPLIES[perm]
            grants.append((compile_pattern(ns_pattern), frozenset(implied)))
        if key in clients:
            raise SecurityConfigError(f"clients.{name}: same key as {clients[key].name}")
        clients[key] = Client(name, key, grants)
    members: dict[str, bytes] = {}
    for name, table in (data.get("members") or {}).items():
        if not isinstance(table, dict):
            raise SecurityConfigError(f"members.{name}: must be a table with public_key_file "
                                      "or public_key")
        key, _ = _read_key(base, table, f"members.{name}", secret=False)
        if key in clients:
            raise SecurityConfigError(f"members.{name}: same key as client "
                                      f"{clients[key].name}: a member key is never a client's")
        other = next((n for n, k in members.items() if k == key), None)
        if other is not None:
            raise SecurityConfigError(f"members.{name}: same key as member {other}")
        members[name] = key
    return Security(public, secret, clients, members), broker


def keygen(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret) in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(d), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for inproc/ipc and tcp on 127.0.0.0/8, localhost or ::1."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"
