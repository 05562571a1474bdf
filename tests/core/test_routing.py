"""The node's routing decisions for broker groups (node/routing.py), without sockets; and the
seed-list parsing of ``SharedMemoryConfig``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import SharedMemoryConfig, seed_list
from node.routing import Route, derived_pub_endpoint, rotation_delay

ROOT = Path(__file__).resolve().parents[2]
H1, H2, H3 = "tcp://127.0.0.1:7400", "tcp://127.0.0.1:7410", "tcp://127.0.0.1:7420"


def group_route(primary: str = H1, term: int = 3) -> Route:
    r = Route([H1, H2, H3])
    r.on_hello(H2, term, primary, [H1, H2, H3])
    return r


# --------------------------------------------------------------------------- Hello


def test_a_single_broker_pins_the_seed_that_answered_and_never_rotates() -> None:
    r = Route(["tcp://127.0.0.1:1", H2])
    assert r.on_hello(H2, 0, "", []) is True
    assert r.members == [H2] and r.target() == H2 and not r.group
    assert r.on_timeout(H2) == H2 and r.on_timeout(H2) == H2  # today's Lazy Pirate: same peer
    assert (r.term, r.primary) == (0, "")


def test_hello_members_replace_the_seeds_and_requests_go_to_the_primary() -> None:
    r = Route(["tcp://seed-alias:7400"])
    r.on_hello("tcp://seed-alias:7400", 4, H3, [H1, H2, H3])
    assert r.members == [H1, H2, H3] and r.group
    assert (r.target(), r.term) == (H3, 4)


def test_a_lagging_standby_s_hello_does_not_bring_back_a_deposed_primary() -> None:
    r = group_route(primary=H2, term=5)
    r.on_hello(H3, 4, H1, [H1, H2, H3])
    assert (r.target(), r.term) == (H2, 5)


def test_hello_during_an_election_leaves_the_primary_unknown() -> None:
    r = Route([H1, H2, H3])
    r.on_hello(H2, 2, "", [H1, H2, H3])
    assert r.primary == "" and r.target() == H2  # ask the member that answered


# --------------------------------------------------------------------------- NotPrimary


def test_not_primary_redirects_to_the_named_primary() -> None:
    r = group_route(primary=H1, term=3)
    assert r.on_not_primary(H1, 4, H2) == H2
    assert (r.primary, r.term) == (H2, 4)


def test_not_primary_naming_a_new_member_adds_it() -> None:
    r = group_route(primary=H1, term=3)
    new = "tcp://127.0.0.1:7430"
    assert r.on_not_primary(H1, 4, new) == new and new in r.members


def test_not_primary_without_a_primary_rotates_to_the_next_member() -> None:
    r = group_route(primary=H1, term=3)
    assert r.on_not_primary(H1, 4, "") == H2
    assert r.on_not_primary(H2, 4, "") == H3
    assert r.on_not_primary(H3, 4, "") == H1  # wraps around
    assert r.term == 4 and r.primary == ""


def test_not_primary_of_a_lower_term_is_not_followed() -> None:
    """A standby that still believes in the term-3 primary H1, while we know term 5 elected
    H3 and H3 just answered NotPrimary (it stepped down): rotate, never back to H1 as primary."""
    r = group_route(primary=H3, term=5)
    assert r.on_not_primary(H3, 3, H1) == H1  # the next member in turn, not "the primary"
    assert r.primary == "" and r.term == 5


# --------------------------------------------------------------------------- timeouts


def test_a_timeout_of_the_primary_forgets_it_and_rotates() -> None:
    r = group_route(primary=H2, term=3)
    assert r.on_timeout(H2) == H3 and r.primary == ""
    assert r.on_timeout(H3) == H1
    changes = r.changes
    r.on_hello(H1, 4, H3, [H1, H2, H3])
    assert r.target() == H3 and r.changes == changes + 1


def test_a_timeout_of_a_member_that_is_not_the_primary_keeps_the_primary() -> None:
    r = group_route(primary=H1, term=3)
    assert r.on_timeout(H3) == H1 and r.primary == H1


def test_a_higher_term_on_the_stream_forgets_the_primary() -> None:
    r = group_route(primary=H1, term=3)
    assert r.note_term(3) is False and r.primary == H1
    assert r.note_term(4) is True and r.primary == "" and r.term == 4
    assert r.target() in r.members


def test_rotation_delay_is_jittered_below_a_quarter_interval_and_zero_alone() -> None:
    assert rotation_delay(1, 1.0, lambda: 0.9) == 0.0
    assert rotation_delay(3, 1.0, lambda: 0.0) == 0.0
    assert rotation_delay(3, 1.0, lambda: 0.5) == pytest.approx(0.125)
    assert rotation_delay(3, 2.0, lambda: 0.999) < 0.5


def test_derived_pub_endpoint_follows_the_group_layout() -> None:
    assert derived_pub_endpoint("tcp://10.0.0.5:7400") == "tcp://10.0.0.5:7401"
    assert derived_pub_endpoint("tcp://[::1]:7400") == "tcp://[::1]:7401"
    assert derived_pub_endpoint("ipc:///run/b.sock") == "ipc:///run/b.sock-pub"


def test_a_route_needs_a_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        Route([])


def test_routing_is_pure() -> None:
    """node.routing imports no zmq (the layering's kernel rule, checked in a fresh process)."""
    code = ("import sys; import node.routing; "
            "assert 'zmq' not in sys.modules, sorted(m for m in sys.modules if 'zmq' in m)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


# --------------------------------------------------------------------------- seed lists


def test_seed_list_from_a_string_a_list_and_one_address() -> None:
    assert seed_list(f"{H1},{H2}, {H3}") == (H1, H2, H3)
    assert seed_list([H1, H2]) == (H1, H2)
    assert seed_list(H1) == (H1,)
    assert seed_list(f"{H1},{H1},{H2}") == (H1, H2)  # duplicates dropped, order kept
    assert seed_list("embedded") == ("embedded",)


@pytest.mark.parametrize(("value", "says"), [
    (f"{H1},127.0.0.1:7410", "entry 2 .*did you mean 'tcp://127.0.0.1:7410'"),
    (f"{H1},,{H2}", "entry 2 .* empty"),
    (f"{H1},", "entry 2 .* empty"),
    (f"{H1},embedded", "entry 2 .* 'embedded'"),
    (f"{H1},http://x", "entry 2 .* 'http://x'"),
    ([H1, 7410], "list of address strings"),
    ([], "list of address strings"),
    ("tcp://", "must be 'tcp://HOST:PORT'"),
])
def test_bad_seed_entries_are_refused_naming_the_entry(value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        SharedMemoryConfig(broker=value)  # type: ignore[arg-type]


def test_a_list_is_stored_as_a_tuple_so_configs_stay_hashable() -> None:
    a = SharedMemoryConfig(broker=[H1, H2])
    b = SharedMemoryConfig(broker=(H1, H2))
    assert a.broker == (H1, H2) and a == b and hash(a) == hash(b)
    assert a.resolved_broker() == f"{H1},{H2}"
    assert SharedMemoryConfig(broker=H1).broker == H1  # one address stays as given


def test_sharedmem_broker_takes_a_seed_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAREDMEM_BROKER", f"{H1}, {H2}")
    assert SharedMemoryConfig().resolved_broker() == f"{H1},{H2}"
    monkeypatch.setenv("SHAREDMEM_BROKER", f"{H1},h2:7400")
    with pytest.raises(ValueError, match="SHAREDMEM_BROKER: entry 2 .*'tcp://h2:7400'"):
        SharedMemoryConfig().resolved_broker()
