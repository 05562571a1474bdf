"""Where a node sends its requests: the rotation and redirect decisions, pure (no sockets, no
clock, no threads; randomness comes in as an argument).

Owns: the node's view of the broker group it talks to: the seeds it was given, the member list
the brokers told it (``HelloReply.members``), the primary's request endpoint and the highest
term seen. The shell (node/requests.py, node/node.py) asks ``target()`` before each send and
reports what happened (a Hello answer, a ``NotPrimary``, a timeout); each report returns the
endpoint to use next.

Rules (docs/groups.md):
- Requests go to the primary when one is known, else to the member under the cursor.
- ``NotPrimary(term, primary)`` of a term not below ours: go to ``primary`` at once (it joins
  the member list if new); with ``primary == ""`` (an election is running) rotate to the next
  member. A lower term's answer names a deposed primary: only rotate away from who said it.
- A timeout rotates to the member after the one that did not answer, and forgets the primary if
  that was it (it may be dead; the next member will name its successor).
- A single broker (term 0, no members) pins the seed that answered, so it behaves exactly as a
  node with that one address: every retry goes to it, with no jitter.
- Retries keep their request ids: this module only picks endpoints, never builds requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def derived_pub_endpoint(endpoint: str) -> str:
    """The event endpoint beside a member's request endpoint, by the group's layout
    (docs/groups.md, broker/config.py ``default_pub_endpoint``): tcp port + 1, else
    ``<ep>-pub``.

    Used only for a member whose own Hello could not be had (down at start-up, or learned later
    from a redirect), so the SUB is connected before it becomes primary."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if port.isdigit():
            return f"tcp://{host}:{int(port) + 1}"
        return endpoint
    return endpoint + "-pub"


def rotation_delay(candidates: int, retry_interval: float, rand: Callable[[], float]) -> float:
    """Seconds to wait before trying the next member after a timeout or an election-time
    ``NotPrimary``: a random share of a quarter of ``retry_interval``, so the writers of many
    nodes do not all arrive at the new primary in the same instant. Zero with one candidate (a
    single broker keeps today's timing)."""
    if candidates <= 1:
        return 0.0
    return rand() * retry_interval / 4


class Route:
    """The node's view of its broker group and the next endpoint to ask. Not thread-safe: the
    shell serialises calls (``requests.SharedRoute``)."""

    def __init__(self, seeds: Sequence[str]) -> None:
        if not seeds:
            raise ValueError("a route needs at least one seed address")
        self.seeds: tuple[str, ...] = tuple(seeds)
        self.members: list[str] = list(self.seeds)
        self.primary = ""  # the primary's request endpoint; "" = unknown (or a single broker)
        self.term = 0  # highest term heard from any member (0 = single broker)
        self.group = False  # True once a member list came in a Hello reply
        self.changes = 0  # bumped whenever members or primary change (the shell re-reads)
        self._cursor = 0

    # ------------------------------------------------------------------ queries

    def target(self) -> str:
        """The endpoint the next request goes to."""
        if self.primary:
            return self.primary
        return self.members[self._cursor % len(self.members)]

    # ------------------------------------------------------------------ reports

    def on_hello(self, answered_by: str, term: int, primary: str, members: Sequence[str]
                 ) -> bool:
        """A Hello reply from ``answered_by``. Returns True if the route changed.

        Non-empty ``members`` replaces the list (the group knows its members better than the
        seeds); an empty one (a single broker) pins ``answered_by``. The primary is taken only
        from a term not below ours: a lagging standby may still name a deposed one."""
        before = (list(self.members), self.primary, self.term)
        if members:
            self.group = True
            self.members = list(dict.fromkeys(members))
        elif not self.group:
            self.members = [answered_by]
        if term >= self.term:
            self.term = term
            self.primary = primary
            if primary and primary not in self.members:
                self.members.append(primary)
        if answered_by in self.members and not self.primary:
            self._cursor = self.members.index(answered_by)
        return self._changed(before)

    def on_not_primary(self, asked: str, term: int, primary: str) -> str:
        """``asked`` refused the request as a standby; returns where to send it next."""
        before = (list(self.members), self.primary, self.term)
        if term >= self.term and primary and primary != asked:
            self.term = term
            self.primary = primary
            if primary not in self.members:
                self.members.append(primary)
        else:
            if term > self.term:
                self.term = term
            self._forget(asked)
            self._rotate_past(asked)
        self._changed(before)
        return self.target()

    def on_timeout(self, asked: str) -> str:
        """``asked`` did not answer in time; returns the next member to try."""
        before = (list(self.members), self.primary, self.term)
        self._forget(asked)
        self._rotate_past(asked)
        self._changed(before)
        return self.target()

    def note_term(self, term: int) -> bool:
        """A higher term was seen on the event stream: a new primary exists whose address we
        may not know. True if ``term`` is news; the primary is then forgotten, so the next
        request (or the shell's Hello) goes to a member, which names the new primary."""
        if term <= self.term:
            return False
        before = (list(self.members), self.primary, self.term)
        self.term = term
        self.primary = ""
        self._changed(before)
        return True

    # ------------------------------------------------------------------ helpers

    def _forget(self, endpoint: str) -> None:
        if self.primary == endpoint:
            self.primary = ""

    def _rotate_past(self, endpoint: str) -> None:
        n = len(self.members)
        at = self.members.index(endpoint) if endpoint in self.members else self._cursor
        self._cursor = (at + 1) % n

    def _changed(self, before: tuple[list[str], str, int]) -> bool:
        if before != (self.members, self.primary, self.term):
            self.changes += 1
            return True
        return False
