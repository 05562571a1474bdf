"""sharedmem node: a local replica of shared namespaces, with the SharedMemory API."""

from broker.errors import (
    AccessDenied,
    BrokerUnavailable,
    InvalidKey,
    InvalidNamespace,
    InvalidValue,
    KeyNotFound,
    PatternError,
    SharedMemoryError,
    StorageError,
    VersionConflict,
)
from node.api import (
    AsyncSharedMemory,
    Metadata,
    Registry,
    SharedMemory,
    Status,
    get_or_create,
)
from node.config import SharedMemoryConfig
from node.watch import CallbackHandle, ChangeEvent, Watcher

__all__ = [
    "AccessDenied",
    "AsyncSharedMemory",
    "CallbackHandle",
    "ChangeEvent",
    "BrokerUnavailable",
    "InvalidKey",
    "InvalidNamespace",
    "InvalidValue",
    "KeyNotFound",
    "Metadata",
    "PatternError",
    "Registry",
    "SharedMemory",
    "SharedMemoryConfig",
    "SharedMemoryError",
    "Status",
    "StorageError",
    "VersionConflict",
    "Watcher",
    "get_or_create",
]
