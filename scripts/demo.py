"""The agents of scripts/demo: a planner and workers sharing a task queue in one namespace.

    python scripts/demo.py planner --broker tcp://127.0.0.1:PORT [--tasks N]
    python scripts/demo.py worker NAME --broker tcp://127.0.0.1:PORT

The planner puts ``task_1..task_N`` = {"state": "todo"} and watches ``task_*`` until every task
is done. Each worker watches ``*``; for every task it sees in state todo it tries to claim it with
compare-and-set, ``set(key, {"state": "doing", ...}, if_version=<the version it saw>)``. The
broker lets exactly one claim win; the loser gets VersionConflict and moves on. The winner
"works", then finishes with another compare-and-set to {"state": "done", ...}. When all tasks
are done the planner prints a summary and sets ``shutdown``, which ends the workers.

Every line printed starts with the agent's name in brackets; tests/integration/test_cli.py
parses the "claimed" and "done" lines.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node import SharedMemory, SharedMemoryConfig, VersionConflict  # noqa: E402

NAMESPACE = "demo"
DEADLINE = 30.0  # seconds; an agent that is not finished by then fails (exit 1)


def say(name: str, text: str) -> None:
    # One write per line (print() makes two when unbuffered), so agents' lines never interleave.
    sys.stdout.write(f"[{name}] {text}\n")
    sys.stdout.flush()


def connect(broker: str) -> SharedMemory:
    return SharedMemory(SharedMemoryConfig(namespace=NAMESPACE, broker=broker, max_keys=1000,
                                           ttl=0))


def planner(broker: str, tasks: int) -> int:
    name = "planner"
    keys = [f"task_{i}" for i in range(1, tasks + 1)]
    with connect(broker) as shm, shm.watch("task_*", initial=False) as watcher:
        for key in keys:
            shm.set(key, {"state": "todo"})
            say(name, f"put {key} = todo")
            time.sleep(0.02)  # trickle the tasks in so the workers race for them as they come
        states: dict[str, dict] = {}
        deadline = time.monotonic() + DEADLINE
        while any(states.get(k, {}).get("state") != "done" for k in keys):
            ch = watcher.get(timeout=max(0.0, deadline - time.monotonic()))
            if ch is None:
                say(name, "gave up waiting: " + ", ".join(
                    f"{k}={states.get(k, {}).get('state')}" for k in keys))
                return 1
            if ch.op == "set" and isinstance(ch.value, dict):
                states[ch.key] = ch.value
                if ch.value.get("state") == "done":
                    say(name, f"saw {ch.key} done by {ch.value.get('owner')}")
        by_owner: dict[str, list[str]] = {}
        for k in keys:
            by_owner.setdefault(states[k]["owner"], []).append(k)
        say(name, f"summary: all {tasks} tasks done; " + "; ".join(
            f"{owner} did {len(ks)} ({', '.join(ks)})" for owner, ks in sorted(by_owner.items())))
        shm.set("shutdown", True)
        say(name, "set shutdown")
    return 0


def worker(broker: str, name: str) -> int:
    rng = random.Random(name)
    done = conflicts = 0
    with connect(broker) as shm, shm.watch("*") as watcher:
        say(name, "watching for tasks")
        deadline = time.monotonic() + DEADLINE
        while True:
            ch = watcher.get(timeout=max(0.0, deadline - time.monotonic()))
            if ch is None:
                say(name, "gave up: no shutdown in time")
                return 1
            if ch.key == "shutdown" and ch.op == "set":
                break
            if not (ch.key.startswith("task_") and ch.op == "set"
                    and isinstance(ch.value, dict) and ch.value.get("state") == "todo"):
                continue
            try:
                version = shm.set(ch.key, {"state": "doing", "owner": name},
                                  if_version=ch.version)
            except VersionConflict as exc:
                conflicts += 1
                say(name, f"lost {ch.key} (VersionConflict: now at version "
                          f"{exc.current_version}); moving on")
                continue
            say(name, f"claimed {ch.key} at version {ch.version} -> {version}")
            time.sleep(rng.uniform(0.02, 0.1))  # the "work"
            result = sum(int(c) for c in ch.key.split("_")[1])
            shm.set(ch.key, {"state": "done", "owner": name, "result": result},
                    if_version=version)
            done += 1
            say(name, f"done {ch.key} (result {result})")
    say(name, f"shutting down: finished {done} tasks, lost {conflicts} claims")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["planner", "worker"])
    p.add_argument("name", nargs="?", help="the worker's name")
    p.add_argument("--broker", required=True)
    p.add_argument("--tasks", type=int, default=8)
    args = p.parse_args(argv)
    if args.role == "planner":
        return planner(args.broker, args.tasks)
    return worker(args.broker, args.name or "worker")


if __name__ == "__main__":
    sys.exit(main())
