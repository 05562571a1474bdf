"""How a broker listens and behaves: ``BrokerConfig``, the publisher endpoint beside each
request endpoint, and the bind policy (no non-loopback address without CURVE unless
``insecure``).

Why a module of its own: the loop (broker/server.py), ``python -m broker`` and the embedded
broker all build one, and the bind policy is checked when it is built -- before any socket.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from broker.durable import FSYNC_POLICIES
from broker.security import Security, is_loopback_endpoint
from broker.validation import DEFAULT_MAX_VALUE_BYTES

logger = logging.getLogger("sharedmem.broker")


def default_pub_endpoint(endpoint: str) -> str:
    """Publisher endpoint beside a request endpoint: tcp port + 1, or ``<inproc>-pub``."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if port in ("0", "*"):
            return f"tcp://{host}:{port}"
        return f"tcp://{host}:{int(port) + 1}"
    return endpoint + "-pub"


def check_bind_policy(endpoints: list[str], *, secured: bool, insecure: bool) -> None:
    """Refuse (ValueError) a non-loopback endpoint without CURVE unless ``insecure``; with
    ``insecure``, warn loudly. Loopback, ipc and inproc are always allowed."""
    if secured:
        return
    exposed = [e for e in endpoints if not is_loopback_endpoint(e)]
    if exposed and not insecure:
        raise ValueError(
            f"bind: refusing to listen on {', '.join(exposed)} without CURVE "
            "authentication; give a --config with keys, or --insecure to accept the risk")
    if exposed:
        logger.warning("INSECURE: listening on %s without authentication or encryption: "
                       "anyone who reaches it can read and overwrite every namespace",
                       ", ".join(exposed))


@dataclass
class BrokerConfig:
    """How a broker listens and behaves. All fields have loopback-safe defaults."""

    bind: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:7400"])
    pub_bind: list[str] | None = None  # default: beside each ``bind`` (port + 1)
    heartbeat_interval: float = 0.5
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    log_retention: int = 100_000
    hwm: int = 200_000  # SNDHWM of the publisher per subscriber, RCVHWM of the router
    pub_hwm: int | None = None  # publisher SNDHWM per subscriber (default: ``hwm``)
    data_dir: str | None = None  # None: the log lives in memory only
    fsync: str = "always"  # always | everysec | no (with data_dir)
    compact_bytes: int = 64 * 1024 * 1024  # rotate + snapshot when a segment grows past this
    security: Security | None = None  # CURVE keys and permissions (None: no authentication)
    insecure: bool = False  # allow binding a non-loopback address without CURVE
    max_message_bytes: int = 64 * 1024 * 1024  # ZMQ_MAXMSGSIZE of every broker socket
    metrics_port: int | None = None  # Prometheus text on http://metrics_host:port/metrics
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.bind:
            raise ValueError("bind: at least one endpoint is needed")
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0, got {self.heartbeat_interval}")
        if self.max_value_bytes <= 0:
            raise ValueError(f"max_value_bytes must be > 0, got {self.max_value_bytes}")
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, "
                             f"got {self.fsync!r}")
        if self.compact_bytes <= 0:
            raise ValueError(f"compact_bytes must be > 0, got {self.compact_bytes}")
        check_bind_policy([*self.bind, *(self.pub_bind or [])],
                          secured=self.security is not None, insecure=self.insecure)

    def pub_endpoints(self) -> list[str]:
        if self.pub_bind:
            return list(self.pub_bind)
        return [default_pub_endpoint(b) for b in self.bind]
