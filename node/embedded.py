"""The embedded default: one in-process broker per process, on the inproc transport.

With no broker configured, every node of the process talks to this broker through the same code
path as to a remote one (inproc needs the shared ``zmq.Context.instance()``). It lives until the
process exits. The broker shell is imported only when that broker is started, so importing the
node package never loads it.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import zmq

if TYPE_CHECKING:
    from broker.server import Broker

_lock = threading.Lock()
_broker: Broker | None = None


def embedded_address() -> str:
    """Start the process's embedded broker if needed; return its request endpoint."""
    global _broker
    with _lock:
        if _broker is None or _broker.stopped:
            from broker.server import Broker, BrokerConfig

            endpoint = f"inproc://sharedmem-embedded-{os.getpid()}"
            _broker = Broker(BrokerConfig(bind=[endpoint]), context=zmq.Context.instance())
            _broker.start()
        return _broker.endpoints[0]
