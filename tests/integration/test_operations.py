"""Operator basics (issue 12 item 8): the broker refuses a Hello of another protocol version
with a clear error, and the project carries a license."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq

from broker.protocol import PROTOCOL_VERSION, Error, Hello, HelloReply, reply_codec, request_codec
from tests.conftest import ROOT, BrokerProcess

pytestmark = pytest.mark.timeout(60)


def hello(address: str, protocol: int) -> object:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(address)
        s.send(request_codec().encode(Hello(os.urandom(12), protocol)))
        assert s.poll(10_000), "no reply to Hello"
        return reply_codec().decode(s.recv())
    finally:
        s.close(linger=0)


def test_hello_of_another_protocol_version_is_refused(broker_process: BrokerProcess) -> None:
    reply = hello(broker_process.address, PROTOCOL_VERSION + 1)
    assert isinstance(reply, Error) and reply.kind == "ProtocolError", reply
    assert f"protocol version {PROTOCOL_VERSION}" in reply.message
    assert f"sent {PROTOCOL_VERSION + 1}" in reply.message
    assert isinstance(hello(broker_process.address, PROTOCOL_VERSION), HelloReply)
    assert broker_process.alive


def test_license_and_metadata() -> None:
    import tomllib

    assert "MIT License" in (ROOT / "LICENSE").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # PEP 639: an SPDX expression (setuptools drops the {text=...} table in 2027), and no
    # License classifier beside it (setuptools refuses to build with both).
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]


def test_the_sample_systemd_unit_verifies(tmp_path: Path) -> None:
    import re
    import shutil
    import subprocess

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    text = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```ini\n(.*?)```", text, re.S)
    unit = next(b for b in blocks if "sharedmem-broker.service" in b)
    assert "ExecStart=/opt/sharedmem/.venv/bin/sharedmem-broker" in unit
    # The unit names the install path of the docs; verify it against this checkout's binary.
    binary = ROOT / ".venv" / "bin" / "sharedmem-broker"
    assert binary.exists(), binary
    path = tmp_path / "sharedmem-broker.service"
    path.write_text(unit.replace("/opt/sharedmem/.venv/bin/sharedmem-broker", str(binary)))
    r = subprocess.run([tool, "verify", "--man=no", str(path)], capture_output=True, text=True,
                       timeout=60)
    # Lines about units of the host system (not ours) are noise of the container; ours: none.
    ours = [line for line in (r.stdout + r.stderr).splitlines() if path.name in line]
    assert r.returncode == 0 or not ours, r.stdout + r.stderr
    assert not ours, ours
