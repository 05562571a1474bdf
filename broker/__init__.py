"""sharedmem broker: the authoritative, ordered log of every namespace and its state."""

from broker.core import BrokerCore
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
from broker.server import Broker, BrokerConfig

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
