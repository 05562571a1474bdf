"""ZMTP-level socket options and message I/O shared by the broker's and the node's sockets.

Why a module of its own: both ends must agree on the options, and both hot loops want the same
cheap way to move a multipart message; the node may import the broker's small modules, never
the other way round (tests/core/test_layering.py).

Why not ``recv_multipart``/``send_multipart``: per message they cost a Python loop, a
``getsockopt(RCVMORE)`` per frame (which builds a ``SocketOption`` enum), an ``int | Flag``
enum construction per frame sent and the sugar layer's ``send`` wrapper (routing-id and group
checks). On the 2-core VM (pyzmq 27.3, inproc, 3-frame messages, docs/benchmarks.md §12):
``recv_multipart`` 3.1 us per message, ``recv_message`` 1.6 us (2.4 us with the frames turned
into bytes); ``send_multipart`` 4.1 us, ``send_message`` 0.5 us. A ``zmq.Again`` raised to end
a drain costs 2.7 us; ``readable`` (one ``EVENTS`` read) 1.5 us.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq
from zmq.backend import Socket as _BackendSocket

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000

# Plain ints: pyzmq's enum flags cost an Enum construction per call on the hot path.
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)

# The C-level send, under pyzmq's sugar ``Socket.send`` (whose only extra is the DRAFT
# routing_id/group arguments this project never uses).
_send = _BackendSocket.send


def set_heartbeats(sock: zmq.Socket) -> None:
    """ZMTP heartbeats close dead TCP links (a cut cable sends no RST) within about 5 s; the
    application heartbeat on the event stream is what tells nodes about lost messages."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


def recv_message(sock: zmq.Socket, flags: int = NOBLOCK) -> list[zmq.Frame]:
    """One whole multipart message, as zero-copy ``zmq.Frame`` objects.

    Each frame's ``more`` comes from the C-level receive, so no ``getsockopt(RCVMORE)`` is
    made. Raises ``zmq.Again`` when ``flags`` has NOBLOCK and nothing is waiting (call
    ``readable`` first in a loop: cheaper than the exception). The rest of a message never
    raises Again: ZeroMQ delivers a multipart message whole or not at all. A frame is a buffer
    (msgspec decodes it in place); ``frame.bytes`` is a copy, for comparing or keeping."""
    recv = sock.recv
    frame = recv(flags, False)
    frames = [frame]
    while frame.more:
        frame = recv(flags, False)
        frames.append(frame)
    return frames


def send_message(sock: zmq.Socket, frames: Sequence[bytes | zmq.Frame],
                 flags: int = NOBLOCK) -> None:
    """Send ``frames`` as one multipart message with ``flags`` (NOBLOCK by default), one
    C-level send per frame. Raises what ``send`` raises (``zmq.Again``, or a ``ZMQError`` such
    as EHOSTUNREACH on a ROUTER_MANDATORY socket); only the first frame can fail that way,
    because a pipe's high-water mark counts whole messages."""
    last = len(frames) - 1
    more = flags | SNDMORE
    for i in range(last):
        _send(sock, frames[i], more)
    _send(sock, frames[last], flags)


def readable(sock: zmq.Socket) -> bool:
    """Whether a message is waiting on ``sock`` (one ``ZMQ_EVENTS`` read): the drain loops'
    end test, cheaper than ending each drain with a ``zmq.Again``."""
    # The backend stub types get(int) as int | bytes; ZMQ_EVENTS is an int option. No cast
    # or isinstance: this is the drain loops' per-message test.
    return bool(sock.get(_EVENTS) & POLLIN)  # type: ignore[operator]
