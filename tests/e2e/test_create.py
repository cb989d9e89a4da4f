"""`nvmprov create` end to end on a real guest under TCG, and the life cycle around it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .conftest import PREFIX, Created, destroy_quietly, example, nvmprov, write_spec

pytestmark = pytest.mark.e2e

POOL_DIR = Path("/var/lib/nvmprov/pool")

REGION_FIELDS = {
    "name", "model", "size_bytes", "usable_bytes", "backing_path", "guest_device", "namespace_mode",
    "filesystem", "mountpoint", "dax", "xip_ok", "data_ok", "persisted", "fs_uuid", "namespace_uuid",
}


def test_create_mixed_proves_every_region(mixed_guest: Created) -> None:
    assert mixed_guest.proc.returncode == 0, mixed_guest.proc.stderr[-6000:]
    report = mixed_guest.report
    assert report["schema_version"] == 1
    assert report["ok"] is True
    g = mixed_guest.guest
    assert g["name"] == mixed_guest.name and g["ok"] is True and g["error"] is None
    assert g["accel"] == "tcg"  # this machine's /dev/kvm has no vmx: auto must pick TCG
    assert g["ssh"]["host"] == "127.0.0.1"
    spec = example("mixed.yaml", mixed_guest.name)
    assert len(spec["pmem"]) == 3 and len(g["regions"]) == 3  # labelled xfs, label-less ext4, virtio-pmem
    assert [r["name"] for r in g["regions"]] == [r["name"] for r in spec["pmem"]]
    for region, wanted in zip(g["regions"], spec["pmem"], strict=True):
        assert set(region) >= REGION_FIELDS, region
        assert region["model"] == wanted.get("model", "nvdimm")
        assert region["filesystem"] == wanted.get("filesystem", "ext4")
        assert region["mountpoint"] == wanted.get("mount", f"/mnt/{wanted['name']}")
        assert region["dax"] is True, region
        assert region["xip_ok"] is True, region
        assert region["data_ok"] is True, region
        assert region["persisted"] is True, region
        # the evidence behind data_ok/persisted: the payload's checksum and where the host found its marker
        assert re.fullmatch(r"[0-9a-f]{64}", region["payload_sha256"]), region
        assert region["marker"].startswith(f"NVMPROV-MARKER:{mixed_guest.name}:{region['name']}:"), region
        assert isinstance(region["marker_offset"], int) and region["marker_offset"] >= 0, region
        assert 0 < region["usable_bytes"] <= region["size_bytes"], region
        assert region["guest_device"].startswith("/dev/pmem"), region
        assert re.fullmatch(r"[0-9a-f-]{36}", region["fs_uuid"]), region  # the name that survives a reboot
        if region["model"] == "nvdimm":
            assert region["namespace_mode"] == "fsdax"
        assert os.path.exists(region["backing_path"])
        st = os.stat(region["backing_path"])
        assert st.st_mode & 0o077 == 0, "backing volumes must not be readable by others"
        assert st.st_size >= region["size_bytes"]
    assert "power-cycle" in g["timings_s"]


def test_junit_report_has_no_failures(mixed_guest: Created) -> None:
    junit = mixed_guest.spec_path.parent / f"{mixed_guest.name}.junit.xml"
    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 5 * len(mixed_guest.guest["regions"])   # dax, xip_ok, data_ok, persisted, node_ok
    assert not root.findall(".//failure")


def test_guest_sees_dax_mounts_over_ssh(mixed_guest: Created) -> None:
    """Matched by identity (the filesystem UUID), never by /dev/pmemN order, which can change between boots."""
    proc = nvmprov("ssh", mixed_guest.name, "--", "cat", "/proc/mounts")
    assert proc.returncode == 0, proc.stderr
    sources = {}
    for region in mixed_guest.guest["regions"]:
        source, _target, _fstype, options = mount_line(proc.stdout, region["mountpoint"])
        assert "dax=always" in options.split(","), options  # not dax=never / dax=inode
        sources[region["name"]] = source
    uuids = blkid_uuids(mixed_guest.name, sorted(set(sources.values())))
    for region in mixed_guest.guest["regions"]:
        assert uuids[sources[region["name"]]] == region["fs_uuid"], (sources, uuids, region)
        # the report describes the boot the guest is in now (after the power cycle), not the first one
        assert sources[region["name"]] == region["guest_device"], (sources, region)


def mount_line(mounts: str, target: str) -> tuple[str, str, str, str]:
    fields = next(ln.split() for ln in mounts.splitlines() if ln.split()[1:2] == [target])
    return fields[0], fields[1], fields[2], fields[3]


def blkid_uuids(name: str, devices: list[str]) -> dict[str, str]:
    """Device -> filesystem UUID, paired by blkid's own DEVNAME line, not by the order of its output."""
    out = nvmprov("ssh", name, "--", "sudo", "blkid", "-s", "UUID", "-o", "export", *devices, check=True).stdout
    pairs = {}
    for block in out.strip().split("\n\n"):
        values = dict(ln.split("=", 1) for ln in block.splitlines() if "=" in ln)
        pairs[values["DEVNAME"]] = values.get("UUID", "")
    return pairs


def test_fstab_mounts_each_region_by_uuid_with_nofail(mixed_guest: Created) -> None:
    fstab = nvmprov("ssh", mixed_guest.name, "--", "cat", "/etc/fstab", check=True).stdout
    mounts = nvmprov("ssh", mixed_guest.name, "--", "cat", "/proc/mounts", check=True).stdout
    regions = mixed_guest.guest["regions"]
    by_device = blkid_uuids(mixed_guest.name, [mount_line(mounts, r["mountpoint"])[0] for r in regions])
    for region in regions:
        assert region["fs_uuid"] in by_device.values(), (region, by_device)  # the filesystem mounted there
        entry = next(ln.split() for ln in fstab.splitlines() if ln.split()[:1] == [f"UUID={region['fs_uuid']}"])
        assert entry[1] == region["mountpoint"] and entry[2] == region["filesystem"], entry
        assert {"dax", "nofail"} <= set(entry[3].split(",")), entry


def test_list_shows_the_guest_with_ssh_coordinates(mixed_guest: Created) -> None:
    proc = nvmprov("list", "--format", "json", check=True)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    row = rows[mixed_guest.name]
    assert row["state"] == "running"
    assert row["ssh"]["port"] == mixed_guest.guest["ssh"]["port"]


def test_console_shows_the_boot(mixed_guest: Created) -> None:
    proc = nvmprov("console", mixed_guest.name, check=True)
    assert "Linux version" in proc.stdout


def test_rerun_same_spec_reverifies_without_power_cycle(mixed_guest: Created) -> None:
    before = domain_and_volumes(mixed_guest.name)
    proc = nvmprov("create", str(mixed_guest.spec_path), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    g = json.loads(proc.stdout)["guests"][0]
    assert g["ok"] is True
    assert "power-cycle" not in g["timings_s"]
    assert len(g["regions"]) == 3
    assert all(r["persisted"] is None for r in g["regions"])
    assert all(r["dax"] and r["data_ok"] for r in g["regions"])
    assert domain_and_volumes(mixed_guest.name) == before, "a re-run on a finished guest must change nothing"


def domain_and_volumes(name: str) -> tuple[str, list[str]]:
    """The persistent domain XML and the guest's volumes in the pool: names and modes, and the sizes of
    the backing volumes (the root overlay grows with whatever the guest writes to its own disk)."""
    xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", "--security-info", name],
                         capture_output=True, text=True, check=True).stdout
    volumes = sorted(
        f"{p.name} {p.stat().st_mode:o}" + (f" {p.stat().st_size}" if p.name.endswith(".raw") else "")
        for p in POOL_DIR.glob(f"{name}-*")
    )
    return xml, volumes


def test_rerun_changed_spec_exits_2_listing_fields(mixed_guest: Created) -> None:
    spec = example("mixed.yaml", mixed_guest.name)
    spec["memory"] = "1536MiB"
    path = write_spec(mixed_guest.spec_path.parent, f"{mixed_guest.name}-changed", spec)
    proc = nvmprov("create", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "memory" in proc.stderr


def test_stop_start_verify_keeps_data(mixed_guest: Created) -> None:
    # A file of the test's own on each region: verify rewrites its payload, so that cannot be the evidence.
    files = [r["mountpoint"].rstrip("/") + "/e2e-stop-start" for r in mixed_guest.guest["regions"]]
    script = "set -e; for f in \"$@\"; do head -c 4194304 /dev/urandom > \"$f\"; done; sync; sha256sum -- \"$@\""
    before = nvmprov("ssh", mixed_guest.name, "--", "sudo", "sh", "-c", shlex.quote(script), "sh", *files,
                     check=True).stdout
    assert len(before.splitlines()) == 3, before
    stop = nvmprov("stop", mixed_guest.name, "--timeout-s", "90", check=True)
    assert "cutting the power" not in stop.stderr, "the guest must shut down cleanly on ACPI: " + stop.stderr
    rows = {r["name"]: r for r in json.loads(nvmprov("list", "--format", "json", check=True).stdout)}
    assert rows[mixed_guest.name]["state"] == "shut off"
    nvmprov("start", mixed_guest.name, check=True)
    proc = nvmprov("verify", mixed_guest.name, "--json")  # waits for SSH and mounts the re-plugged virtio-pmem
    assert proc.returncode == 0, proc.stderr[-4000:]
    g = json.loads(proc.stdout)["guests"][0]
    assert all(r["dax"] and r["data_ok"] and r["xip_ok"] for r in g["regions"]), g
    after = nvmprov("ssh", mixed_guest.name, "--", "sudo", "sha256sum", "--", *files, check=True).stdout
    assert after == before


def test_negative_control_private_mapping_loses_data(e2e_tmp) -> None:
    """Without access='shared' QEMU maps the backing file privately: the proof must fail."""
    name = f"{PREFIX}private"
    destroy_quietly(name)
    spec = example("guest.yaml", name)
    spec["pmem"] = [{"name": "data", "size": "512MiB", "filesystem": "ext4"}]
    path = write_spec(e2e_tmp, name, spec)
    try:
        nvmprov("create", str(path), "--until", "define", check=True)
        xml = __import__("subprocess").run(
            ["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", name], capture_output=True, text=True, check=True
        ).stdout
        broken, count = re.subn(r"(<memory model='nvdimm') access='shared'", r"\1", xml)
        assert count == 1, "the rendered XML must carry access='shared' on the nvdimm"
        xml_path = e2e_tmp / f"{name}.xml"
        xml_path.write_text(broken)
        __import__("subprocess").run(["virsh", "-c", "qemu:///system", "define", str(xml_path)], check=True,
                                     capture_output=True)
        proc = nvmprov("verify", name, "--power-cycle", "--json")
        assert proc.returncode == 1, proc.stderr[-4000:]
        g = json.loads(proc.stdout)["guests"][0]
        assert g["ok"] is False
        region = g["regions"][0]
        assert region["data_ok"] is True  # written fine...
        assert region["persisted"] is False  # ...but never reached the backing file
    finally:
        destroy_quietly(name)
    proc = nvmprov("list", "--format", "json", check=True)
    assert name not in {r["name"] for r in json.loads(proc.stdout)}


def test_destroy_keeps_backing_unless_purge(e2e_tmp) -> None:
    name = f"{PREFIX}destroy"
    destroy_quietly(name)
    spec = example("guest.yaml", name)
    spec["pmem"] = [{"name": "keep", "size": "64MiB", "filesystem": "none"}]
    path = write_spec(e2e_tmp, name, spec)
    nvmprov("create", str(path), "--until", "define", check=True)
    backing = f"/var/lib/nvmprov/pool/{name}-pmem-keep.raw"
    assert os.path.exists(backing)
    nvmprov("destroy", name, check=True)
    assert os.path.exists(backing), "destroy without --purge must keep region data"
    assert not os.path.exists(f"/var/lib/nvmprov/pool/{name}-root.qcow2")
    # Re-creating reuses the kept volume (same size), then --purge removes it.
    nvmprov("create", str(path), "--until", "define", check=True)
    proc = nvmprov("destroy", name, "--purge")
    assert proc.returncode == 2 and "--yes" in proc.stderr  # no TTY: purge needs --yes
    assert os.path.exists(backing)
    nvmprov("destroy", name, "--purge", "--yes", check=True)
    assert not os.path.exists(backing)


def test_readme_demo_is_mounted_with_dax_verified_and_proven_persistent(e2e_tmp) -> None:
    """examples/guest.yaml as the README demo runs it (renamed): one 1 GiB label-less nvdimm, ext4."""
    name = f"{PREFIX}demo"
    destroy_quietly(name)
    path = write_spec(e2e_tmp, name, example("guest.yaml", name))
    try:
        proc = nvmprov("create", str(path), "--json")
        assert proc.returncode == 0, proc.stderr[-6000:]
        report = json.loads(proc.stdout)
        assert report["ok"] is True
        (region,) = report["guests"][0]["regions"]
        assert region["name"] == "data" and region["model"] == "nvdimm" and region["namespace_mode"] == "fsdax"
        assert region["size_bytes"] == 1024**3
        assert region["usable_bytes"] == 1054867456  # measured: the rest of 1 GiB holds the fsdax page map
        assert region["filesystem"] == "ext4" and region["mountpoint"] == "/mnt/data"
        assert (region["dax"], region["xip_ok"], region["data_ok"], region["persisted"]) == (True, True, True, True)
        assert isinstance(region["marker_offset"], int)
        # the marker really is at that offset of the host backing file
        with open(region["backing_path"], "rb") as fh:
            fh.seek(region["marker_offset"])
            assert fh.read(len(region["marker"])) == region["marker"].encode()
    finally:
        destroy_quietly(name)
    assert not list(POOL_DIR.glob(f"{name}-*"))
