"""CXL persistent memory on a real guest (issue 20): one guest with a CXL region and an nvdimm side by
side (examples/cxl.yaml), created with the power-cycle proof. The guest makes the CXL region at each
boot (`cxl create-region`, from the recorded parameters); after the power cut that is the only thing
run on it, and the namespace and the filesystem with their data come back. This module asserts that
measured outcome: it fails if the outcome changes (a lost namespace, a different command run)."""

from __future__ import annotations

import json
import os
import pwd
import re
from collections.abc import Iterator

import libvirt
import pytest

from nvmprov import host, virt

from .conftest import PREFIX, Created, _require_host, destroy_quietly, example, nvmprov, write_spec

pytestmark = pytest.mark.e2e

NAME = f"{PREFIX}cxl"
POOL_DIR = "/var/lib/nvmprov/pool"
CREATE_REGION = "cxl create-region -d decoder0.0 -t pmem -m mem0 -w 1 -g 256"


@pytest.fixture(scope="module")
def cxl_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Created]:
    _require_host()
    tmp = tmp_path_factory.mktemp("cxl")
    destroy_quietly(NAME)
    path = write_spec(tmp, NAME, example("cxl.yaml", NAME))
    proc = nvmprov("create", str(path), "--json")
    try:
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"create printed no JSON report (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        yield Created(NAME, path, proc, report)
    finally:
        destroy_quietly(NAME)


def _regions(created: Created) -> dict[str, dict]:
    return {r["name"]: r for r in created.guest["regions"]}


def test_create_proves_dax_and_data_on_the_cxl_region(cxl_guest: Created) -> None:
    g = cxl_guest.guest
    assert cxl_guest.proc.returncode == 0, f"{g['error']}\n{cxl_guest.proc.stderr[-6000:]}"
    assert g["ok"] is True and g["error"] is None and g["accel"] == "tcg"
    cxl = _regions(cxl_guest)["cxl"]
    assert (cxl["model"], cxl["namespace_mode"], cxl["filesystem"], cxl["mountpoint"]) == (
        "cxl", "fsdax", "ext4", "/mnt/cxl"), cxl
    assert cxl["dax"] is True and cxl["xip_ok"] is True and cxl["data_ok"] is True, cxl
    assert cxl["guest_device"].startswith("/dev/pmem") and cxl["namespace_uuid"], cxl
    assert cxl["marker_offset"] is not None, cxl    # the guest's writes reached the host backing file


def test_the_power_cycle_re_makes_only_the_region_and_the_data_persists(cxl_guest: Created) -> None:
    """The measured outcome (kernel 6.1, QEMU 7.2, a device serial): after the cut the guest shows no
    region; `cxl create-region` with the recorded parameters brings back the namespace,
    the filesystem and the data. Both regions persisted; no namespace or filesystem was made."""
    regions = _regions(cxl_guest)
    for name in ("cxl", "dimm"):
        assert regions[name]["persisted"] is True, regions[name]
        assert regions[name]["persisted_reason"] is None, regions[name]
    err = cxl_guest.proc.stderr
    after_cut = err[err.index("cutting the guest's power"):]
    ran = [ln.split("] ", 1)[1] for ln in after_cut.splitlines() if ln.split("] ", 1)[-1].startswith(("cxl:", "dimm:"))]
    # The region again, then at most its mount (systemd's nofail fstab job may have mounted it already,
    # or have given up on the device before the region existed: both were seen); never a namespace,
    # a label or a filesystem step.
    assert ran[:1] == [f"cxl: {CREATE_REGION}"], after_cut[-4000:]
    allowed = re.compile(r"(cxl|dimm): (mkdir -p /mnt/\1|mount -t ext4 -o dax /dev/pmem[0-9]+ /mnt/\1)")
    assert all(allowed.fullmatch(c) for c in ran[1:]), ran


def test_map_sync_and_the_namespace_on_cxl(cxl_guest: Created) -> None:
    cxl = _regions(cxl_guest)["cxl"]
    assert cxl["map_sync"] is True, cxl                          # measured: fsdax on CXL grants MAP_SYNC
    assert cxl["persistence_domain"] == "memory_controller", cxl  # what kernel 6.1 shows for CXL pmem


def test_both_volumes_are_pool_volumes_owned_by_qemus_user_and_in_use(cxl_guest: Created) -> None:
    paths = [f"{POOL_DIR}/{NAME}-pmem-cxl.raw", f"{POOL_DIR}/{NAME}-pmem-cxl.lsa"]
    conn = libvirt.open("qemu:///system")
    try:
        uid, gid = host.qemu_ids(conn.getCapabilities()) or (-1, -1)   # libvirt's DAC label: what QEMU runs as
        assert uid == pwd.getpwnam("libvirt-qemu").pw_uid
        for path in paths:
            st = os.stat(path)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o600), path
        assert virt.path_users(conn, paths) == {p: [NAME] for p in paths}   # prune and purge see the guest
    finally:
        conn.close()


def test_attach_refuses_cxl_with_the_reason(cxl_guest: Created) -> None:
    proc = nvmprov("attach", NAME, "--size", "256MiB", "--model", "cxl", timeout_s=120)
    assert proc.returncode == 2 and "no CXL hotplug on this stack" in proc.stderr, proc.stderr


def test_show_maps_the_cxl_window_and_the_region(cxl_guest: Created) -> None:
    proc = nvmprov("show", NAME, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    window = next((ln for ln in lines if ln.startswith("  CXL window")), "")
    assert "512 MiB" in window and "(decoder0.0; regions: cxl)" in window and "0x" in window, proc.stdout
    row = next((ln for ln in lines if ln.split()[:2] == ["cxl", "cxl"]), "")
    assert "/dev/pmem" in row and "qemu args" in row and f"{NAME}-pmem-cxl.raw" in row, proc.stdout
    assert window.split()[4] in row, proc.stdout       # the region's guest range is the window's


def test_doctor_checks_cxl(cxl_guest: Created) -> None:
    proc = nvmprov("doctor", "--json", timeout_s=300)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["qemu cxl devices"]["status"] == "ok", checks
    assert checks["cxl confinement"]["status"] == "ok", checks   # no AppArmor here (the spike)
    assert checks["guest kernel cxl"]["status"] == "ok" and "6.1" in checks["guest kernel cxl"]["detail"], checks
