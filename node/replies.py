"""The one place a broker reply is unwrapped: an ``Error`` becomes the exception it names, a
reply of another type than the request expects becomes an error saying which.

Why a module of its own: the API, the node, the admin calls and the CLI all send requests; one
unwrap keeps the error mapping (``error_from_kind``, ``VersionConflict``'s current version)
identical everywhere. Pure: it imports only the broker's errors and wire structs.
"""

from __future__ import annotations

from typing import TypeVar

from broker.errors import StorageError, error_from_kind
from broker.protocol import Error

T = TypeVar("T")


def raise_if_error(reply: object) -> None:
    """Raise the class an ``Error`` reply names (unknown kinds -> StorageError); else nothing."""
    if isinstance(reply, Error):
        raise error_from_kind(reply.kind, reply.message, reply.current_version)


def expect(reply: object, kind: type[T], what: str, *,
           unexpected: type[Exception] = StorageError) -> T:
    """``reply`` as a ``kind``: an ``Error`` is raised as its class, any other type as
    ``unexpected("unexpected reply to <what>: <type>")``."""
    raise_if_error(reply)
    if not isinstance(reply, kind):
        raise unexpected(f"unexpected reply to {what}: {type(reply).__name__}")
    return reply
