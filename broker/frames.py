"""What arrives on the broker's sockets before it is a message: the ROUTER envelope split, and
the rate-limited warning every piece of garbage gets.

Why a module of its own: the loop (requests) and the subscriptions (XPUB messages) both meet
garbage; one rate limit keeps a flood of bad frames from turning into a flood of log lines.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("sharedmem.broker")

MAX_ENVELOPE_FRAMES = 8  # identity + routing frames of proxies + delimiter


class RateLimitedLog:
    """Logs at most ``per_second`` garbage warnings a second, then one summary: a flood of bad
    frames must not turn into a flood of log lines (or a blocked stderr)."""

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._window = 0
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = int(time.monotonic())
        if now != self._window:
            if self._suppressed:
                logger.warning("%d more bad messages were not logged", self._suppressed)
            self._window, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count <= self.per_second:
            logger.warning(msg, *args)
        else:
            self._suppressed += 1


garbage_log = RateLimitedLog()


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], int] | None:
    """``[identity, ..., b"", body...]`` -> (envelope up to and including the delimiter, the
    number of body frames), or None (logged) when no reply can be routed: no delimiter, or an
    envelope longer than MAX_ENVELOPE_FRAMES."""
    try:
        delim = frames.index(b"", 1)
    except ValueError:
        garbage_log.warning("dropping request with %d frames: no envelope delimiter",
                            len(frames))
        return None
    if delim + 1 > MAX_ENVELOPE_FRAMES:
        garbage_log.warning("dropping request with a %d-frame envelope", delim + 1)
        return None
    return frames[: delim + 1], len(frames) - delim - 1
