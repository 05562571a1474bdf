"""sharedmem node: a local replica of shared namespaces, with the SharedMemory API.

The API names (``SharedMemory`` and the rest, which bring zmq and the I/O thread with them)
are imported on first use, so that the pure parts of this package (``node.replica``,
``node.watch``) import without the socket shell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import errors
from broker.errors import *  # noqa: F403 -- the user's errors, one list (errors.__all__)
from broker.lazy import lazy_getattr

if TYPE_CHECKING:
    from node.api import (
        AsyncSharedMemory,
        Metadata,
        NamespaceInfo,
        Registry,
        SharedMemory,
        Status,
        get_or_create,
    )
    from node.config import SharedMemoryConfig
    from node.watch import CallbackHandle, ChangeEvent, Watcher

_LAZY = {
    "AsyncSharedMemory": "node.api",
    "Metadata": "node.api",
    "NamespaceInfo": "node.api",
    "Registry": "node.api",
    "SharedMemory": "node.api",
    "Status": "node.api",
    "get_or_create": "node.api",
    "SharedMemoryConfig": "node.config",
    "CallbackHandle": "node.watch",
    "ChangeEvent": "node.watch",
    "Watcher": "node.watch",
}


__getattr__ = lazy_getattr(globals(), "node", _LAZY)  # the API on first use


__all__ = [
    "AsyncSharedMemory",
    "CallbackHandle",
    "ChangeEvent",
    "Metadata",
    "NamespaceInfo",
    "Registry",
    "SharedMemory",
    "SharedMemoryConfig",
    "Status",
    "Watcher",
    "get_or_create",
]
__all__ += errors.__all__
