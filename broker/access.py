"""Access rules at the broker's sockets: the ZAP/CURVE glue (who may connect at all) and the
permission decision per request and per subscription (what a connected client may do).

Why a module of its own: the loop (broker/server.py) and the subscriptions
(broker/subscriptions.py) both ask it, and with no ``Security`` configured every answer is
"allowed" here, so neither needs an ``if security`` of its own beyond the hot path's.
The rules themselves (the TOML grants) live in broker/security.py; docs/security.md.
"""

from __future__ import annotations

import logging
from collections.abc import Container

import zmq

from broker.protocol import PERMISSION_NEEDED, Error, Open, StatsReply
from broker.security import Security

ZAP_DOMAIN = "sharedmem"
# The replication endpoint of a group member has a ZAP domain of its own, whose handler
# accepts only the keys of ``[members]``: a client key cannot complete that handshake.
GROUP_ZAP_DOMAIN = "sharedmem-group"


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP-authenticated identity (z85 public key) on a message, if any."""
    try:
        # pyzmq's stub types get(str) as int | str; a named metadata property such as User-Id
        # is always a str (zmq_msg_gets). No cast: this runs once per message.
        return frame.get("User-Id")  # type: ignore[return-value]
    except zmq.ZMQError:  # EINVAL: no such property (inproc, or a disconnect's unsubscribe)
        return None


class _KnownKeys:
    """ZAP credentials provider: only listed public keys complete the CURVE handshake."""

    def __init__(self, sec: Security) -> None:
        self._sec = sec

    def callback(self, domain: str, key: bytes) -> bool:
        return self._sec.is_known_key(key)


class _MemberKeys:
    """ZAP credentials provider of the replication endpoint: member keys only."""

    def __init__(self, sec: Security) -> None:
        self._sec = sec

    def callback(self, domain: str, key: bytes) -> bool:
        return self._sec.is_member_key(key)


class Access:
    """The permission decisions of one broker (``security`` None: everything is allowed)."""

    def __init__(self, security: Security | None) -> None:
        self.security = security
        self._auth: object | None = None

    def who(self, user: str | None) -> str:
        c = self.security.client(user) if self.security is not None else None
        return f"client {c.name!r}" if c is not None else "an unauthenticated peer"

    # ------------------------------------------------------------------ CURVE / ZAP

    def start(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler on ``ctx`` -- before any socket binds: a CURVE server with no
        handler running accepts anyone."""
        if self.security is None:
            return
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx, log=logging.getLogger("sharedmem.broker.zap"))
        auth.start()
        auth.configure_curve_callback(domain=ZAP_DOMAIN,
                                      credentials_provider=_KnownKeys(self.security))
        auth.configure_curve_callback(domain=GROUP_ZAP_DOMAIN,
                                      credentials_provider=_MemberKeys(self.security))
        self._auth = auth

    def secure(self, sock: zmq.Socket, domain: str = ZAP_DOMAIN) -> None:
        """Make ``sock`` a CURVE server in the ZAP ``domain`` (nothing without security)."""
        sec = self.security
        if sec is not None:
            sock.curve_server = True
            sock.curve_secretkey = sec.secret_key
            sock.curve_publickey = sec.public_key
            sock.zap_domain = domain.encode()

    def secure_replication(self, sock: zmq.Socket) -> None:
        """A member's replication ROUTER: a CURVE server in the group's domain (member keys
        only). Nothing without security (the loopback rule applies then)."""
        self.secure(sock, GROUP_ZAP_DOMAIN)

    def secure_follower(self, sock: zmq.Socket, primary: str) -> bool:
        """A standby's DEALER to ``primary``: a CURVE client with this broker's own key pair
        that accepts only ``primary``'s listed key as the server's. False: ``primary`` has no
        listed key (the standby must not follow it)."""
        sec = self.security
        if sec is None:
            return True
        key = sec.members.get(primary)
        if key is None:
            return False
        sock.curve_secretkey = sec.secret_key
        sock.curve_publickey = sec.public_key
        sock.curve_serverkey = key
        return True

    def member(self, user: str | None) -> str | None:
        """The member name of an authenticated replication peer (None without security, or
        for a key that is no member's)."""
        return self.security.member_named(user) if self.security is not None else None

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()  # type: ignore[attr-defined]
            self._auth = None

    # ------------------------------------------------------------------ permissions

    def may_read(self, user: str | None, namespace: str) -> bool:
        return self.security is None or self.security.allowed(user, namespace, "read")

    def check(self, request: object, user: str | None, known: Container[str]) -> Error | None:
        """``Error("AccessDenied")`` for a request the client may not make, else None.
        ``known``: the namespaces that exist (an ``Open`` of a new one creates it: a write)."""
        sec = self.security
        if sec is None:
            return None
        namespace = getattr(request, "namespace", None)
        if namespace is None:
            return None  # Hello, Stats (filtered per namespace)
        t = type(request)
        need = PERMISSION_NEEDED.get(t, "read")
        if t is Open and namespace not in known:
            need = "write"  # opening a namespace that does not exist creates it
        if sec.allowed(user, namespace, need):
            return None
        return Error("AccessDenied", f"{self.who(user)} may not {need} namespace {namespace!r}")

    def filter_stats(self, stats: StatsReply, user: str | None) -> StatsReply:
        """``stats`` with only the namespaces ``user`` may read."""
        if self.security is None:
            return stats
        return StatsReply(stats.epoch, {k: v for k, v in stats.namespaces.items()
                                        if self.may_read(user, k)}, stats.counters,
                          stats.group)
