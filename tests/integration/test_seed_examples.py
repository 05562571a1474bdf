"""Acceptance 1: every example of the seed's documentation, with the providers in separate
processes talking to a broker started as ``python -m broker``."""

from __future__ import annotations

import json

import pytest

from node import KeyNotFound, PatternError, SharedMemory, SharedMemoryConfig
from tests.conftest import BrokerProcess, run_agent

pytestmark = pytest.mark.timeout(120)

AGENT_PRELUDE = """
import json, sys
from node import SharedMemory, SharedMemoryConfig, KeyNotFound
broker, namespace = sys.argv[1], sys.argv[2]
shm = SharedMemory(SharedMemoryConfig(namespace=namespace, broker=broker, max_keys=100))
"""


def agent(broker: BrokerProcess, namespace: str, body: str) -> object:
    """Run ``body`` in another process with ``shm`` open; it prints one JSON line last."""
    out = run_agent(AGENT_PRELUDE + body + "\nshm.close()\n", broker.address, namespace)
    return json.loads(out.stdout.strip().splitlines()[-1])


def open_shm(broker: BrokerProcess, namespace: str, **kw: object) -> SharedMemory:
    return SharedMemory(SharedMemoryConfig(namespace=namespace, broker=broker.address,
                                           max_keys=100, **kw))


def test_key_value_operations(broker_process: BrokerProcess) -> None:
    with open_shm(broker_process, "kv") as shm:
        shm.set("user_123", {"name": "Alice", "role": "admin"})
        seen = agent(broker_process, "kv", """
user = shm.get("user_123")
exists = shm.exists("user_123")
deleted = shm.delete("user_123")
print(json.dumps([user, exists, deleted, shm.exists("user_123")]))
""")
        assert seen == [{"name": "Alice", "role": "admin"}, True, True, False]
        # the other process's delete has reached us (it waited for its own replica; ours
        # follows on the stream)
        from tests.conftest import wait_until

        wait_until(lambda: not shm.exists("user_123"), 5, message="delete to replicate")
        with pytest.raises(KeyNotFound):
            shm.get("user_123")


def test_working_with_metadata(broker_process: BrokerProcess) -> None:
    with open_shm(broker_process, "meta") as shm:
        shm.set("document_456", {"title": "Report", "content": "..."})
        meta = agent(broker_process, "meta", """
m = shm.get_metadata("document_456")
print(json.dumps([m.size, m.created_at.isoformat(), m.last_modified.isoformat(), m.version]))
""")
        local = shm.get_metadata("document_456")
        size, created, modified, version = meta
        assert size == len(json.dumps({"title": "Report", "content": "..."},
                                      separators=(",", ":")))
        assert created == local.created_at.isoformat()
        assert modified == local.last_modified.isoformat()
        assert version == local.version
        assert local.created_at.tzinfo is not None


def test_pattern_matching(broker_process: BrokerProcess) -> None:
    with open_shm(broker_process, "users") as shm:
        agent(broker_process, "users", """
shm.set("user_123", {"name": "Alice"})
shm.set("user_456", {"name": "Bob"})
shm.set("user_789", {"name": "Charlie"})
shm.set("admin_1", {"name": "Root"})
print(json.dumps(True))
""")
        from tests.conftest import wait_until

        wait_until(lambda: len(shm.list_keys("user_*")) == 3, 5, message="users to replicate")
        names = [shm.get(k)["name"] for k in shm.list_keys("user_*")]
        assert names == ["Alice", "Bob", "Charlie"]
        assert shm.list_keys("user_?") == []
        assert shm.list_keys("user_[0-9]*") == ["user_123", "user_456", "user_789"]
        assert shm.list_keys("admin_[0-9]") == ["admin_1"]
        assert shm.list_keys("nothing*") == []
        with pytest.raises(PatternError):
            shm.list_keys("user_[0-9")


def test_namespace_isolation(broker_process: BrokerProcess) -> None:
    with open_shm(broker_process, "app1") as app1:
        agent(broker_process, "app2", """
shm.set("settings", {"theme": "light"})
print(json.dumps(True))
""")
        app1.set("settings", {"theme": "dark"})
        with open_shm(broker_process, "app2") as app2:
            assert app1.get("settings")["theme"] == "dark"
            assert app2.get("settings")["theme"] == "light"
            assert app1.list_keys() == ["settings"] and app2.list_keys() == ["settings"]


def test_caching_pattern(broker_process: BrokerProcess) -> None:
    calls: list[str] = []

    def fetch_user_from_database(user_id: str) -> dict[str, str]:
        calls.append(user_id)
        return {"id": user_id, "name": f"user {user_id}"}

    def get_user_data(user_id: str, shm: SharedMemory) -> object:
        cache_key = f"user_{user_id}"
        if shm.exists(cache_key):
            return shm.get(cache_key)
        data = fetch_user_from_database(user_id)
        shm.set(cache_key, data)
        return data

    with open_shm(broker_process, "cache", ttl=60) as shm:
        assert get_user_data("7", shm) == {"id": "7", "name": "user 7"}
        assert get_user_data("7", shm) == {"id": "7", "name": "user 7"}
        assert calls == ["7"]
        # another agent finds the cached entry without touching the "database"
        hit = agent(broker_process, "cache", """
print(json.dumps([shm.exists("user_7"), shm.get("user_7")]))
""")
        assert hit == [True, {"id": "7", "name": "user 7"}]
        assert shm.get_metadata("user_7").expires_at is not None


def test_session_state_pattern(broker_process: BrokerProcess) -> None:
    with open_shm(broker_process, "sessions") as shm:
        shm.set("session_abc", {"user": "alice", "cart": [1, 2]})
        got = agent(broker_process, "sessions", """
def get_session(session_id):
    key = f"session_{session_id}"
    if not shm.exists(key):
        return "SessionNotFound"
    return shm.get(key)
print(json.dumps([get_session("abc"), get_session("missing")]))
""")
        assert got == [{"user": "alice", "cart": [1, 2]}, "SessionNotFound"]


def test_multi_provider_communication(broker_process: BrokerProcess) -> None:
    agent(broker_process, "shared", """
shm.set("shared_key", {"source": "provider1", "data": "..."})
print(json.dumps(True))
""")
    got = agent(broker_process, "shared", """
print(json.dumps(shm.get("shared_key")))
""")
    assert got == {"source": "provider1", "data": "..."}
