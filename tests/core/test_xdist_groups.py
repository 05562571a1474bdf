"""Every etcd-backed test file runs in the one "etcd" scheduling unit (tests/conftest.py
XDIST_GROUPS): a new group test file left out would run beside another on the second worker,
and two groups' 1 s leases competing for two cores is what makes them flaky."""

from __future__ import annotations

from tests.conftest import ROOT, XDIST_GROUPS


def test_every_file_that_starts_etcd_is_in_the_etcd_unit() -> None:
    users = sorted(
        f"tests/integration/{p.name}" for p in (ROOT / "tests" / "integration").glob("test_*.py")
        if "etcd_cluster" in p.read_text() or "test_group import" in p.read_text()
        or p.name.startswith("test_group"))
    missing = [f for f in users if XDIST_GROUPS.get(f) != "etcd"]
    assert users and not missing, missing
