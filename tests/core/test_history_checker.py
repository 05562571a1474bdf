"""The history checker (tests/history.py) catches each kind of violation it claims to, and
passes a correct history. No sockets."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

from broker.protocol import KeyDeleted, KeyExpired, KeySet
from broker.state import NamespaceState
from tests.history import MISSING, History, observe, replay_digest


def ks(seq: int, key: str, value: object, ttl: float | None = None) -> KeySet:
    return KeySet(seq, key, json.dumps(value).encode(), 1.0, 1.0, ttl)


def good_log() -> list:
    return [
        ks(1, "a", 1),
        ks(2, "b", {"x": [1, 2]}),
        ks(3, "a", 2),
        KeyDeleted(4, "b"),
        ks(5, "t", "short-lived", ttl=0.5),
        ks(6, "c", "m1"),
        ks(7, "d", "m2"),
        KeyExpired(8, "t"),
    ]


def good_history() -> History:
    h = History()
    for op, key, value in [("set", "a", 1), ("set", "b", {"x": [1, 2]}), ("set", "a", 2),
                           ("delete", "b", None), ("set", "t", "short-lived")]:
        h.attempt("w1", op, key, value)
    h.ack("w1", "set", "a", 1, 1)
    h.ack("w1", "set", "b", {"x": [1, 2]}, 2)
    h.ack("w1", "set", "a", 2, 3)
    h.ack("w1", "delete", "b", None, None)  # delete() does not report its version
    h.ack("w1", "set", "t", "short-lived", 5)
    h.attempt_many("w2", {"c": "m1", "d": "m2"})
    h.ack_many("w2", {"c": "m1", "d": "m2"}, 7)
    # a write that timed out and was never applied: attempted, not in the log, fine
    h.attempt("w2", "set", "lost", 0)
    # node n1 follows the log; n2 lags behind but never goes back
    h.read("n1", "a", MISSING, 0, "E")
    h.read("n1", "a", 1, 1, "E")
    h.read("n1", "b", {"x": [1, 2]}, 2, "E")
    h.read("n1", "a", 2, 3, "E")
    h.read("n1", "b", MISSING, 4, "E")
    h.read("n1", "t", "short-lived", 5, "E")
    h.read("n1", "t", MISSING, 6, "E")  # TTL passed on n1's clock before KeyExpired: allowed
    h.read("n1", "t", MISSING, 8, "E")
    h.read("n2", "a", 1, 2, "E")
    h.read("n2", "a", 1, 2, "E")
    h.read("n2", "d", "m2", 8, "E")
    return h


def test_a_correct_history_passes() -> None:
    summary = good_history().check(good_log(), epoch="E")
    assert summary.events == 8
    assert summary.acks == 7
    assert summary.attempts == 8
    assert summary.reads == 11
    assert summary.nodes == 2


def test_a_duplicated_write_is_caught() -> None:
    h = History()
    h.attempt("w", "set", "k", "v")
    h.ack("w", "set", "k", "v", 2)  # the retry's answer: the second application
    log = [ks(1, "k", "v"), ks(2, "k", "v")]
    with pytest.raises(AssertionError, match=r"'k'=\"v\" 2 times .*attempted only 1 time"):
        h.check(log)


def test_a_write_attempted_twice_may_appear_twice() -> None:
    h = History()
    h.attempt("w", "set", "k", "v")
    h.attempt("w", "set", "k", "v")
    h.ack("w", "set", "k", "v", 1)
    h.ack("w", "set", "k", "v", 2)
    h.check([ks(1, "k", "v"), ks(2, "k", "v")])


def test_a_duplicated_delete_is_caught() -> None:
    h = History()
    h.attempt("w", "set", "k", 1)
    h.attempt("w", "delete", "k")
    log = [ks(1, "k", 1), KeyDeleted(2, "k"), KeyDeleted(3, "k")]
    with pytest.raises(AssertionError, match=r"deletes 'k' 2 times"):
        h.check(log)


def test_a_lost_acked_write_is_caught() -> None:
    h = History()
    h.attempt("w", "set", "k", 1)
    h.attempt("w", "set", "k", 2)
    h.ack("w", "set", "k", 1, 1)
    h.ack("w", "set", "k", 2, 2)
    with pytest.raises(AssertionError, match=r"version 2 is not in the log .*lost write"):
        h.check([ks(1, "k", 1)])


def test_an_acked_write_overwritten_by_another_at_its_version_is_caught() -> None:
    h = History()
    h.attempt("w1", "set", "k", "mine")
    h.attempt("w2", "set", "k", "theirs")
    h.ack("w1", "set", "k", "mine", 1)
    with pytest.raises(AssertionError, match=r"log has KeySet\('k'=\"theirs\"\) there"):
        h.check([ks(1, "k", "theirs")])


def test_an_acked_delete_missing_from_the_log_is_caught() -> None:
    h = History()
    h.attempt("w", "set", "k", 1)
    h.attempt("w", "delete", "k")
    h.ack("w", "delete", "k", None, None)
    with pytest.raises(AssertionError, match=r"delete of 'k'.*not in the log at all"):
        h.check([ks(1, "k", 1)])


def test_two_acks_at_one_version_are_caught() -> None:
    h = History()
    h.attempt("w", "set", "k", 1)
    h.ack("w", "set", "k", 1, 1)
    h.ack("w", "set", "k", 1, 1)
    with pytest.raises(AssertionError, match=r"two acknowledged writes claim version 1"):
        h.check([ks(1, "k", 1)])


def test_an_unattempted_write_is_caught() -> None:
    h = History()
    h.attempt("w", "set", "k", 1)
    log = [ks(1, "k", 1), ks(2, "ghost", "boo")]
    with pytest.raises(AssertionError,
                       match=r"'ghost'=\"boo\" \(seq \[2\]\).*never attempted by any client"):
        h.check(log)


def test_values_compare_as_typed_json() -> None:
    h = History()
    h.attempt("w", "set", "k", True)
    with pytest.raises(AssertionError, match=r"never attempted by any client"):
        h.check([ks(1, "k", 1)])  # 1 is not true


def test_a_gap_in_the_log_is_caught() -> None:
    h = History()
    with pytest.raises(AssertionError, match=r"position 1 holds seq 3 \(previous seq 1\)"):
        h.check([ks(1, "k", 1), ks(3, "k", 2)])


def test_a_log_not_starting_at_one_is_caught() -> None:
    h = History()
    with pytest.raises(AssertionError, match=r"position 0 holds seq 2"):
        h.check([ks(2, "k", 1)])


def test_a_stale_read_that_is_not_a_prefix_is_caught() -> None:
    h = good_history()
    h.read("n3", "a", 1, 3, "E")  # seq 3 already set a=2
    with pytest.raises(AssertionError,
                       match=r"n3 read 'a'=1 at seq 3, .* 'a'=2 \(set at seq 3\)"):
        h.check(good_log())


def test_a_read_from_the_future_is_caught() -> None:
    h = History()
    h.attempt("w", "set", "k", 1)
    h.read("n", "k", 1, 0, None)  # at seq 0 nothing was set yet
    with pytest.raises(AssertionError, match=r"'k'=1 at seq 0.*never written up to then"):
        h.check([ks(1, "k", 1)])


def test_a_deleted_key_read_as_present_is_caught() -> None:
    h = good_history()
    h.read("n3", "b", {"x": [1, 2]}, 4, "E")
    with pytest.raises(AssertionError, match=r"removed at seq 4"):
        h.check(good_log())


def test_a_key_without_ttl_read_as_missing_is_caught() -> None:
    h = good_history()
    h.read("n3", "c", MISSING, 7, "E")  # c has no TTL: absent at seq 7 is wrong
    with pytest.raises(AssertionError, match=r"n3 read 'c'=<MISSING> at seq 7"):
        h.check(good_log())


def test_an_expired_key_read_as_present_after_its_event_is_caught() -> None:
    h = good_history()
    h.read("n3", "t", "short-lived", 8, "E")
    with pytest.raises(AssertionError, match=r"removed at seq 8"):
        h.check(good_log())


def test_a_read_seq_going_backwards_is_caught() -> None:
    h = good_history()
    h.read("n1", "a", 1, 2, "E")  # n1 already read at seq 8
    with pytest.raises(AssertionError, match=r"non-monotonic reads on n1: .*seq 8, then .*seq 2"):
        h.check(good_log())


def test_read_seqs_restart_with_a_new_epoch() -> None:
    h = History()
    h.attempt("w", "set", "k", 1)
    h.read("n", "k", 1, 1, "E1")
    h.read("n", "k", MISSING, 0, "E2")  # a new incarnation: a fresh history
    h.check([ks(1, "k", 1)])
    with pytest.raises(AssertionError, match=r"epoch E2, but the log is of epoch E1"):
        h.check([ks(1, "k", 1)], epoch="E1")


def test_a_read_beyond_the_log_is_caught() -> None:
    h = History()
    h.attempt("w", "set", "k", 1)
    h.read("n", "k", 1, 5, None)
    with pytest.raises(AssertionError, match=r"at seq 5, beyond the log \(seqs 1..1\)"):
        h.check([ks(1, "k", 1)])


def test_check_final_requires_every_node_equal_to_the_broker() -> None:
    log = good_log()
    broker = replay_digest("ns", log)
    History.check_final({"n1": broker, "n2": broker}, broker, log_events=log, namespace="ns")
    behind = replay_digest("ns", log[:6])
    with pytest.raises(AssertionError, match=r"1 of 2 nodes did not converge .* n2 at seq 6"):
        History.check_final({"n1": broker, "n2": behind}, broker)
    with pytest.raises(AssertionError, match=r"is not the replay of its log"):
        History.check_final({"n1": behind}, behind, log_events=log, namespace="ns")
    with pytest.raises(AssertionError, match=r"no node digests"):
        History.check_final({}, broker)


def test_observe_reads_and_records_under_the_lock() -> None:
    state = NamespaceState("ns")
    state.apply_batch(good_log()[:3], 0.0)
    lock = threading.Lock()
    shm = SimpleNamespace(_lock=lock, _replica=SimpleNamespace(state=state, epoch="E"))
    h = History()
    assert observe(h, "n", shm, "a") == 2
    assert observe(h, "n", shm, "zzz") is MISSING
    assert not lock.locked()
    assert [(r.key, r.value, r.seq, r.epoch) for r in h.reads] == [
        ("a", 2, 3, "E"), ("zzz", MISSING, 3, "E")]
