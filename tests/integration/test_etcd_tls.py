"""etcd over TLS with client certificates (``--etcd-cacert/--etcd-cert/--etcd-key``).

Whoever can write a group's keys in etcd can name its primary, so off a trusted network etcd
is run with ``--client-cert-auth`` and reached over https. These tests make a throwaway CA,
server and client certificates with the ``openssl`` command, start a real one-member etcd
that demands client certificates, and check both sides: a coordinator and a group broker
with the right files work (the KV calls and the watch stream, which has its own HTTP
session), and one without a client certificate or trusting another CA is refused with an
error that names the endpoint. The flag checks at the top need no etcd.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.coordination import (
    CoordinationUnavailable,
    EtcdCoordinator,
    EtcdTLS,
    WatchEvent,
)
from broker.protocol import Set, Stats, StatsReply, WriteOk
from tests.conftest import ROOT, child_env, wait_until
from tests.etcd_cluster import free_ports, require_etcd
from tests.processes import BrokerProcess, free_port_run
from tests.raw_client import raw_call


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing etcd uses


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=d)


def _make_leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                  "extendedKeyUsage=serverAuth,clientAuth\n")
    _make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                 d / "client.key", d / "other-ca.pem")


@pytest.fixture(scope="module")
def tls_etcd(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One etcd member that serves clients over https only and demands a client certificate
    signed by ``certs.ca``. Yields its https endpoint; stopped by PID afterwards."""
    binary = require_etcd()
    client, peer = free_ports(2)
    d = tmp_path_factory.mktemp("etcd-tls")
    url = f"https://127.0.0.1:{client}"
    with open(d / "etcd.log", "w") as log:
        proc = subprocess.Popen(
            [binary, "--name", "tls0", "--data-dir", str(d / "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"tls0=http://127.0.0.1:{peer}",
             "--cert-file", str(certs.server_cert), "--key-file", str(certs.server_key),
             "--trusted-ca-file", str(certs.ca), "--client-cert-auth",
             "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        probe = EtcdCoordinator(url, deadline=0.5, tls=good_tls(certs))
        try:
            def answers() -> bool:
                assert proc.poll() is None, (d / "etcd.log").read_text()[-2000:]
                try:
                    probe.get("/probe")
                    return True
                except CoordinationUnavailable:
                    return False

            wait_until(answers, 30, 0.1, "the TLS etcd member to answer")
        finally:
            probe.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def good_tls(certs: Certs) -> EtcdTLS:
    return EtcdTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key))


# --------------------------------------------------------------------------- flags, no etcd


def test_tls_flags_are_checked_before_anything_connects(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--etcd-cert and --etcd-key go together"):
        EtcdTLS(cert=str(certs.client_cert))
    with pytest.raises(ValueError, match=r"--etcd-cacert .*nope\.pem: cannot read it"):
        EtcdTLS(cacert=str(tmp_path / "nope.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="--etcd-key .*not a PEM file"):
        EtcdTLS(cert=str(certs.client_cert), key=str(tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="need https:// etcd endpoints, got http://h:2379"):
        EtcdCoordinator("https://g:2379,http://h:2379", tls=EtcdTLS(cacert=str(certs.ca)))


def test_the_broker_command_line_refuses_tls_flags_that_cannot_work(certs: Certs,
                                                                    tmp_path: Path) -> None:
    def broker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker", *args], cwd=ROOT,
                              env=child_env(), capture_output=True, text=True, timeout=30)

    r = broker("--bind", "tcp://127.0.0.1:0", "--etcd-cacert", str(certs.ca))
    assert r.returncode == 2 and "--etcd-cacert need --group" in r.stderr, r.stderr
    port = free_port_run(3)
    r = broker("--bind", f"tcp://127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"),
               "--group", "g", "--etcd", "http://127.0.0.1:2379", "--etcd-cacert", str(certs.ca))
    assert r.returncode == 2 and "need https:// etcd endpoints" in r.stderr, r.stderr


# --------------------------------------------------------------------------- a real TLS etcd


def test_a_coordinator_with_the_right_files_reads_writes_and_watches(tls_etcd: str,
                                                                     certs: Certs) -> None:
    etcd = EtcdCoordinator(tls_etcd, tls=good_tls(certs))
    try:
        seen: list[WatchEvent] = []
        handle = etcd.watch("/tls/k", seen.append)  # its own HTTP session: same certificates
        try:
            etcd.put("/tls/k", b"v1")
            assert etcd.get("/tls/k").first is not None
            assert etcd.get("/tls/k").first.value == b"v1"  # type: ignore[union-attr]
            wait_until(lambda: [e.value for e in seen] == [b"v1"], 10, 0.02,
                       "the watch over TLS to deliver the put")
        finally:
            handle.cancel()
    finally:
        etcd.close()


@pytest.mark.parametrize("what", ["no client certificate", "another CA"])
def test_etcd_refuses_a_client_without_the_right_certificates(tls_etcd: str, certs: Certs,
                                                              what: str) -> None:
    tls = (EtcdTLS(cacert=str(certs.ca)) if what == "no client certificate"
           else EtcdTLS(str(certs.other_ca), str(certs.client_cert), str(certs.client_key)))
    etcd = EtcdCoordinator(tls_etcd, deadline=1.0, tls=tls)
    try:
        with pytest.raises(CoordinationUnavailable) as info:
            etcd.put("/tls/intruder", b"x")
    finally:
        etcd.close()
    message = str(info.value)
    assert tls_etcd in message, message
    if what == "another CA":
        assert "certificate verify failed" in message.lower(), message
    check = EtcdCoordinator(tls_etcd, tls=good_tls(certs))
    try:
        assert check.get("/tls/intruder").first is None  # nothing was written
    finally:
        check.close()


def test_a_group_broker_leads_through_a_tls_etcd(tls_etcd: str, certs: Certs,
                                                 tmp_path: Path) -> None:
    """One member with --min-sync 0: it must reach etcd over TLS to take the leader key and
    write the config, and only then does it acknowledge a write."""
    port = free_port_run(3)
    member = BrokerProcess(port, (
        "--data-dir", str(tmp_path / "m0"), "--group", "tlsg", "--member", "m0",
        "--etcd", tls_etcd, "--etcd-cacert", str(certs.ca), "--etcd-cert",
        str(certs.client_cert), "--etcd-key", str(certs.client_key),
        "--lease-ttl", "1", "--min-sync", "0")).start()
    try:
        def primary() -> bool:
            r = raw_call(member.address, Stats(), 1.0)
            return isinstance(r, StatsReply) and r.counters.get("group_primary") == 1

        wait_until(primary, 30, 0.05, "the member to become primary through the TLS etcd")
        reply = raw_call(member.address, Set(b"tls-client", 1, "ns", 0, "k", b"1"), 5.0)
        assert isinstance(reply, WriteOk) and reply.term >= 1, reply
    finally:
        member.stop()
    etcd = EtcdCoordinator(tls_etcd, tls=good_tls(certs))
    try:
        leader_config = etcd.get("/sharedmem/tlsg/config").first
        assert leader_config is not None and b"m0" in leader_config.value
    finally:
        etcd.close()
