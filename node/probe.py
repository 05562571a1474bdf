"""Is anything listening at a broker address? One plain socket connect, no ZeroMQ.

Why: a ZeroMQ connect never fails; it retries in the background, so a wrong port or a stopped
broker would only show as a timeout (10 s by default). A refused TCP connect (or a missing IPC
socket file) answers at once, so the node can say "nothing listens there" in well under a
second. Anything but a clear refusal (a filtered port, a slow network) counts as "maybe": the
caller then waits for the broker's answer as before.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

DEFAULT_LOCAL_BROKER = "tcp://127.0.0.1:7400"  # where scripts/broker listens


def refused(address: str, timeout: float = 1.0) -> bool:
    """True when nothing listens at ``address`` (every resolved host refused the connect, or
    the IPC socket file is missing); False when something accepted or the answer is unclear.

    The connection is closed at once; a broker sees a peer that left before its greeting."""
    scheme, _, rest = address.partition("://")
    if scheme == "ipc":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(rest)
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except OSError:
            return False
        finally:
            s.close()
        return False
    if scheme != "tcp":
        return False  # inproc: in this process, nothing to probe
    try:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port
    except ValueError:
        return False
    if not host or host == "*" or port is None:
        return False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False  # name resolution failed: let the normal path report it
    for family, kind, proto, _, sockaddr in infos:
        s = socket.socket(family, kind, proto)
        s.settimeout(timeout)
        try:
            s.connect(sockaddr)
        except ConnectionRefusedError:
            continue
        except OSError:
            return False  # timeout, unreachable: unclear, not a refusal
        finally:
            s.close()
        return False
    return bool(infos)
