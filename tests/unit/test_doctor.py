"""doctor verdicts and prune's choice of volumes (pure)."""

from __future__ import annotations

import pytest

from nvmprov import doctor


@pytest.mark.parametrize(("kvm", "ext", "status", "fragment"), [
    (True, True, "ok", "kvm"),
    (True, False, "warn", "TCG software emulation will be used"),
    (False, False, "warn", "no kvm"),
])
def test_accel(kvm: bool, ext: bool, status: str, fragment: str) -> None:
    c = doctor.accel_check(kvm, ext)
    assert c.status == status and fragment in c.detail


def test_nvdimm_support_from_device_help() -> None:
    have = 'name "nvdimm", desc "DIMM memory module"\nname "virtio-pmem-pci", bus PCI\n'
    assert doctor.nvdimm_check(have).status == "ok"
    missing = doctor.nvdimm_check('name "virtio-pmem-pci", bus PCI\n')
    assert missing.status == "fail" and missing.fix
    assert doctor.nvdimm_check(None).status == "warn"


def test_space() -> None:
    assert doctor.space_check("p", 10, 5, "x").status == "ok"
    c = doctor.space_check("p", 5, 10, "the regions of a.yaml")
    assert c.status == "fail" and "sparse" in (c.fix or "")


def test_leftovers_are_only_volumes_nvmprov_made_that_nothing_references() -> None:
    vols = ["demo-pmem-data.raw", "demo-root.qcow2", "demo-seed.iso", "other.qcow2", "web-pmem-x.raw",
            "x-pmem-y.raw", "nvmprov-debian12-0123456789ab.qcow2", "notes.txt"]
    owned = ["demo-pmem-data.raw", "demo-root.qcow2", "demo-seed.iso", "web-pmem-x.raw", "gone-pmem-z.raw"]
    referenced = {"demo-root.qcow2", "demo-seed.iso"}
    # x-pmem-y.raw looks like nvmprov's but is the user's own: never offered
    assert doctor.leftover_names(owned, vols, referenced) == ["demo-pmem-data.raw", "web-pmem-x.raw"]
    assert doctor.leftover_names(owned, vols, referenced, only="web-*") == ["web-pmem-x.raw"]
