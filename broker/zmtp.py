"""ZMTP-level socket options shared by the broker's and the node's sockets.

Why a module of its own: both ends must agree on them, and the node may import the broker's
small modules, never the other way round (tests/core/test_layering.py).
"""

from __future__ import annotations

import zmq

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000


def set_heartbeats(sock: zmq.Socket) -> None:
    """ZMTP heartbeats close dead TCP links (a cut cable sends no RST) within about 5 s; the
    application heartbeat on the event stream is what tells nodes about lost messages."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
