"""The error kinds of the SharedMemoryCapability contract.

Owned here (not in ``node``) because the broker names them in its ``Error`` replies and the
node turns those names back into these classes: one list, used by both sides.

Whose fault (trio's rule): InvalidKey, InvalidValue and PatternError are the caller's and are
raised before anything leaves the process. StorageError and AccessDenied mean the broker refused
the write and nothing changed. The third outcome is BrokerUnavailable with
``outcome_unknown=True``: the request left, the broker went away, and the write may or may not
have been applied; retrying it is safe.
"""

from __future__ import annotations

# The errors a user catches: re-exported by both packages (``broker`` and ``node``) from this
# one list, so a new error kind is public in both by one edit. ProtocolError is the broker's.
__all__ = [
    "AccessDenied",
    "BrokerUnavailable",
    "InvalidKey",
    "InvalidNamespace",
    "InvalidValue",
    "KeyNotFound",
    "PatternError",
    "SharedMemoryError",
    "StorageError",
    "VersionConflict",
]


class SharedMemoryError(Exception):
    """Raised for every failure of a shared-memory operation; catch this to catch them all."""

    kind = "SharedMemoryError"


class KeyNotFound(SharedMemoryError, KeyError):
    """Raised when a key is absent or expired and no default was given."""

    kind = "KeyNotFound"

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class InvalidKey(SharedMemoryError, ValueError):
    """Raised when a key or namespace name breaks the limits (caller's fault, nothing sent)."""

    kind = "InvalidKey"


class InvalidNamespace(InvalidKey):
    """Raised when a namespace name is not ``[A-Za-z0-9_.-]{1,128}``."""

    kind = "InvalidNamespace"


class InvalidValue(SharedMemoryError, ValueError):
    """Raised when a value is not plain JSON or is larger than ``max_value_bytes``."""

    kind = "InvalidValue"


class PatternError(SharedMemoryError, ValueError):
    """Raised when a ``list_keys`` pattern is malformed (unclosed ``[``, dangling ``\\``)."""

    kind = "PatternError"


class StorageError(SharedMemoryError):
    """Raised when the broker refused a write (capacity, settings, internal error), and for a
    stale replica under ``max_staleness``.

    Nothing was changed by a refused request -- except for the subclass BrokerUnavailable with
    ``outcome_unknown=True``, whose outcome is not known: check that flag before assuming.
    """

    kind = "StorageError"


class BrokerUnavailable(StorageError):
    """Raised when the broker could not be reached before the deadline.

    For a write this means the request never got an answer: see ``outcome_unknown``. When True,
    the request may have been applied; calling again is safe because retries of one request id
    are applied once, but a *new* call is a new request.
    """

    kind = "BrokerUnavailable"

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


class VersionConflict(StorageError):
    """Raised when a compare-and-set found another version; nothing changed.

    ``current_version`` is the key's version at the broker when it refused (0 = absent).
    """

    kind = "VersionConflict"

    def __init__(self, message: str, current_version: int | None = None) -> None:
        super().__init__(message)
        self.current_version = current_version


class AccessDenied(SharedMemoryError):
    """Raised when the caller lacks permission for the namespace; nothing changed."""

    kind = "AccessDenied"


class ProtocolError(SharedMemoryError):
    """Raised when a peer sent bytes that are not a valid message of our protocol (or a
    Hello of another protocol version). Not a ``StorageError``: a garbled message is not a
    refusal of a valid request, and nothing about the store is implied."""

    kind = "ProtocolError"


ERROR_KINDS: dict[str, type[SharedMemoryError]] = {
    cls.kind: cls
    for cls in (
        SharedMemoryError,
        KeyNotFound,
        InvalidKey,
        InvalidNamespace,
        InvalidValue,
        PatternError,
        StorageError,
        BrokerUnavailable,
        VersionConflict,
        AccessDenied,
        ProtocolError,
    )
}


def error_from_kind(kind: str, message: str,
                    current_version: int | None = None) -> SharedMemoryError:
    """Rebuild the exception named by a broker ``Error`` reply (unknown kinds -> StorageError)."""
    cls = ERROR_KINDS.get(kind, StorageError)
    if cls is VersionConflict:
        return VersionConflict(message, current_version)
    return cls(message)
