"""doctor on this host: libvirt reachable, nvdimm in QEMU, the paravirtual /dev/kvm said as TCG."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import _require_host, nvmprov

pytestmark = pytest.mark.e2e


def test_doctor_on_this_host() -> None:
    _require_host()
    proc = nvmprov("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "libvirt 9." in proc.stdout and "nvdimm" in proc.stdout
    assert "no vmx/svm" in proc.stdout and "TCG" in proc.stdout        # this host's paravirtual KVM
    checks = {c["name"]: c for c in json.loads(nvmprov("doctor", "--json").stdout)["checks"]}
    assert checks["acceleration"]["status"] == "warn" and checks["built-in image"]["status"] == "ok"


def test_doctor_unreachable_libvirt_fails_with_the_fix() -> None:
    proc = nvmprov("doctor", "--connect", "qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    assert proc.returncode == 3
    assert "FAIL" in proc.stdout and "libvirtd" in proc.stdout


def test_doctor_pool_space_against_a_spec(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _require_host()
    spec = tmp_path / "huge.yaml"
    spec.write_text("version: 1\nname: e2e-doctor-huge\npmem:\n  - {name: big, size: 15TiB}\n")
    proc = nvmprov("doctor", "-f", str(spec))
    assert proc.returncode == 3 and "pool space" in proc.stdout and "sparse" in proc.stdout
