"""Planned switchover (``python -m broker switchover --group G --etcd ... --to MEMBER``): hand
a group's leadership to a named in-sync standby with no acknowledged write lost.

The operator's command checks the config (the target must be in the sync set, which is what
makes it hold every acknowledged write) and puts a ``SwitchoverRequest`` at
``/sharedmem/<group>/switchover`` under a lease of its own, so a forgotten request vanishes.
The primary watches the group's keys; on a request for its own term it takes no new write, waits
until the target has acked every record, and runs one transaction guarded by its leader key and
the config's revision: the leader key naming the target (under the target's lease) and the config
``{term + 1, primary: target, sync_set: []}``. The target sees a config naming it primary of a
term it never promised, with the leader key its own, and leads (``GroupCore._take_handoff``
is the rule, docs/groups.md the reference). The command then waits for that config.

Why no write is lost: every commit of the old term needs the target's ack (it is in the sync
set), and the target refuses the old term from the moment it has seen the new config; so a
record is acknowledged in the old term only if the target holds it when it starts leading.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from broker.coordination import (
    CoordinationError,
    EtcdCoordinator,
    EtcdTLS,
    GroupConfig,
    GroupKeys,
    InvalidGroupValue,
    check_name,
    parse_endpoints,
)


class SwitchoverRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The value of the ``switchover`` key: hand over to ``to`` if the primary's term is
    ``term``; give up after ``timeout`` seconds (and take writes again)."""

    to: str
    term: int
    timeout: float = 10.0

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> SwitchoverRequest:
        try:
            return _decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidGroupValue(f"switchover request does not decode: {exc}") from None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SwitchoverRequest)


def switchover_key(keys: GroupKeys) -> str:
    """``/sharedmem/<group>/switchover``: the operator's request, watched by the primary."""
    return keys.prefix + "switchover"


class SwitchoverRefused(ValueError):
    """The request makes no sense for the group as it is (nothing was written to etcd)."""


class SwitchoverFailed(RuntimeError):
    """The request was made, but the group did not end with the target as primary."""


def switchover(etcd_endpoints: str, group: str, target: str, timeout: float = 10.0,
               poll: Callable[[float], None] = time.sleep, *,
               tls: EtcdTLS | None = None) -> GroupConfig:
    """Ask the primary to hand over to ``target`` and wait for the config naming it primary of
    the next term (returned). Raises ``SwitchoverRefused`` (bad target, no primary),
    ``SwitchoverFailed`` (timed out, or the group moved on otherwise) or
    ``CoordinationError`` (etcd unreachable)."""
    keys = GroupKeys(check_name("group", group))
    check_name("member", target)
    etcd = EtcdCoordinator(parse_endpoints(etcd_endpoints), tls=tls)
    try:
        kv = etcd.get(keys.config).first
        if kv is None:
            raise SwitchoverRefused(f"group {group!r} has no config in etcd: it never formed")
        config = GroupConfig.decode(kv.value)
        leader = etcd.get(keys.leader).first
        if leader is None or leader.value.decode() != config.primary:
            raise SwitchoverRefused(f"group {group!r} has no primary right now (an election "
                                    "is under way): try again once it has one")
        if target == config.primary:
            raise SwitchoverRefused(f"{target} is the primary of group {group!r} already "
                                    f"(term {config.term})")
        if target not in config.sync_set:
            raise SwitchoverRefused(
                f"{target} is not in the sync set of group {group!r} "
                f"({', '.join(config.sync_set) or 'empty'}): only an in-sync standby holds "
                "every acknowledged write")
        lease = etcd.grant_lease(max(2, int(timeout) + 5))
        try:
            etcd.put(switchover_key(keys),
                     SwitchoverRequest(to=target, term=config.term, timeout=timeout).encode(),
                     lease)
            deadline = time.monotonic() + timeout + 2
            while time.monotonic() < deadline:
                now_kv = etcd.get(keys.config).first
                now = GroupConfig.decode(now_kv.value) if now_kv is not None else None
                if now is not None and now.term > config.term:
                    if now.primary == target and now.term == config.term + 1:
                        return now
                    raise SwitchoverFailed(
                        f"the group moved on otherwise: term {now.term}, primary {now.primary}")
                poll(0.1)  # poll: the config changes once, through the primary's transaction
            raise SwitchoverFailed(
                f"no hand-off within {timeout}s: the primary {config.primary} gave up (is "
                f"{target} acking? see the primary's log); it takes writes again")
        finally:
            try:
                etcd.revoke(lease)  # the request goes with its lease
            except CoordinationError:
                pass  # it expires on its own
    finally:
        etcd.close()
