"""docs/api.md's examples run, all of them, in the order written (issue 12, acceptance 7); and a
new user's path, README.md then docs/api.md on one broker, meets no StorageError (acceptance 2).

Every ```python block of docs/api.md is an example; signatures are written in ```text blocks.
The blocks run in one child process, sharing globals as a reader following along would, against
a real broker process; the docs' ``tcp://127.0.0.1:7400`` is replaced by that broker's address.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, BrokerProcess, child_env

pytestmark = pytest.mark.timeout(120)

RUNNER = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(name)s: %(message)s")
blocks = sys.stdin.read().split("\\n#---block---\\n")
env = {"__name__": "__main__"}
for i, block in enumerate(blocks):
    print(f"--- block {i}", flush=True)
    exec(compile(block, f"example-{i}", "exec"), env)
print("all examples ran", flush=True)
"""


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)


def run_blocks(blocks: list[str], broker: BrokerProcess) -> subprocess.CompletedProcess[str]:
    code = "\n#---block---\n".join(b.replace("tcp://127.0.0.1:7400", broker.address)
                                   for b in blocks)
    env = child_env()
    env["SHAREDMEM_BROKER"] = broker.address
    return subprocess.run([sys.executable, "-c", RUNNER], cwd=ROOT, env=env, input=code,
                          capture_output=True, text=True, timeout=100)


def test_every_api_md_example_runs_in_order(broker_process: BrokerProcess) -> None:
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 15, "the extraction found too few examples"
    r = run_blocks(blocks, broker_process)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert f"--- block {len(blocks) - 1}" in r.stdout and "all examples ran" in r.stdout


def test_readme_then_api_md_on_one_broker(broker_process: BrokerProcess) -> None:
    readme = (ROOT / "README.md").read_text()
    # README's shell step first: the CLI creates the default namespace (with max_keys 0) ...
    step = re.search(r"`sharedmem (set task_1 '(.*?)')`", readme)
    assert step is not None, "README's CLI example moved"
    cli = subprocess.run([sys.executable, "-m", "node", "--broker", broker_process.address,
                          "set", "task_1", step.group(2)], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    # ... then README's Python, then every docs/api.md example (default max_keys=10000 on
    # the same 'shared' namespace: once refused with StorageError).
    r = run_blocks(python_blocks(ROOT / "README.md") + python_blocks(ROOT / "docs" / "api.md"),
                   broker_process)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "StorageError" not in r.stderr
    mismatch = [line for line in r.stderr.splitlines()
                if "namespace 'shared' exists with max_keys=0" in line]
    assert len(mismatch) == 1, r.stderr
    assert "max_keys=10000" in mismatch[0] and "max_keys=None" in mismatch[0]
