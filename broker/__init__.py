"""sharedmem broker: the authoritative, ordered log of every namespace and its state.

Importing this package loads nothing heavy: the socket shell (``Broker``, ``BrokerConfig``:
zmq, threads, http.server) is imported on first use of those names, so a pure module such as
``broker.state`` can be imported (by the node, or a test) without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import errors
from broker.errors import *  # noqa: F403 -- the user's errors, one list (errors.__all__)
from broker.errors import ProtocolError
from broker.lazy import lazy_getattr

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.core import BrokerCore
    from broker.server import Broker

_LAZY = {"Broker": "broker.server", "BrokerConfig": "broker.config", "BrokerCore": "broker.core"}


__getattr__ = lazy_getattr(globals(), "broker", _LAZY)  # the shell on first use


__all__ = ["Broker", "BrokerConfig", "BrokerCore", "ProtocolError"]
__all__ += errors.__all__
