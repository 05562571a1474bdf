"""One request to one broker over a bare REQ socket, below the node: the group tests and
scripts/benchkit/localgroup.py ask a particular member (stats, a write that must reach exactly
that member, a forged or CURVE-authenticated request), which a ``SharedMemory`` handle, with
its failover and retries, would hide."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from broker.protocol import reply_codec, request_codec

_requests = request_codec()
_replies = reply_codec()


def raw_call(address: str, request: Any, timeout: float = 2.0,
             prepare: Callable[[zmq.Socket], zmq.Socket] | None = None) -> Any:
    """Send ``request`` to ``address`` and return the decoded reply, or None after
    ``timeout`` seconds. ``prepare`` sets the socket up before it connects (CURVE keys)."""
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    if prepare is not None:
        s = prepare(s)
    try:
        s.connect(address)
        s.send(_requests.encode(request))
        if not s.poll(int(timeout * 1000)):
            return None
        return _replies.decode(s.recv())
    finally:
        s.close(linger=0)
