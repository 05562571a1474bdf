"""sharedmem broker: the authoritative, ordered log of every namespace and its state.

Importing this package loads nothing heavy: the socket shell (``Broker``, ``BrokerConfig``:
zmq, threads, http.server) is imported on first use of those names, so a pure module such as
``broker.state`` can be imported (by the node, or a test) without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.errors import (
    AccessDenied,
    BrokerUnavailable,
    InvalidKey,
    InvalidNamespace,
    InvalidValue,
    KeyNotFound,
    PatternError,
    ProtocolError,
    SharedMemoryError,
    StorageError,
    VersionConflict,
)

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.core import BrokerCore
    from broker.server import Broker

_LAZY = {"Broker": "broker.server", "BrokerConfig": "broker.config", "BrokerCore": "broker.core"}


def __getattr__(name: str) -> Any:
    """Import the shell (or the core) on first use of its name."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AccessDenied",
    "Broker",
    "BrokerConfig",
    "BrokerCore",
    "BrokerUnavailable",
    "InvalidKey",
    "InvalidNamespace",
    "InvalidValue",
    "KeyNotFound",
    "PatternError",
    "ProtocolError",
    "SharedMemoryError",
    "StorageError",
    "VersionConflict",
]
