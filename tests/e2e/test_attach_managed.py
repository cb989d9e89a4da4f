"""attach/detach on a guest nvmprov manages (issue 16, point 4), on libvirt 9.0 + QEMU 7.2 under TCG.

One guest of its own, created with --no-power-cycle (the power cut is test_create's) and kept
running for the module; the tests run in order and build on each other: a live nvdimm and a
virtio-pmem attached and proved by the agent, QEMU's refusals to hot-unplug, `--config` and a
restart, `show`, `detach --purge`. libvirtd is never restarted here: libvirt 9.0 kills a guest that
holds a live virtio-pmem when it reconnects.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from .conftest import PREFIX, Created, _require_host, destroy_quietly, nvmprov, write_spec

pytestmark = pytest.mark.e2e

NAME = f"{PREFIX}managed-attach"   # not e2e-attach-*: test_attach's cleanup and prune take those
POOL = "nvmprov"
PLANTED = f"{NAME}-pmem-planted.raw"  # named like a region's volume, made by hand: never deleted
T0 = time.monotonic()


def virsh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["virsh", "-q", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def volumes() -> set[str]:
    return {line.split()[0] for line in virsh("vol-list", POOL).splitlines() if line.strip()}


def aliases(*, inactive: bool) -> list[str]:
    """The memory devices' aliases in the live (or persistent) XML, in order."""
    xml = virsh("dumpxml", NAME, *(["--inactive"] if inactive else []))
    return [part.split("'")[0] for part in xml.split("<alias name='ua-pmem-")[1:]]


def guest(command: str) -> str:
    proc = nvmprov("ssh", NAME, "--", command, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def attached(proc: subprocess.CompletedProcess[str], region: str) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (g,) = json.loads(proc.stdout)["guests"]
    return next(r for r in g["regions"] if r["name"] == region)


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Created]:
    """Started with one small nvdimm: QEMU then has nvdimm support on, so more can come live."""
    _require_host()
    tmp = tmp_path_factory.mktemp("managed-attach")
    destroy_quietly(NAME)
    virsh("vol-delete", "--pool", POOL, PLANTED, check=False)
    spec = {"name": NAME, "memory": "1GiB", "vcpus": 1,
            "pmem": [{"name": "base", "size": "16MiB", "filesystem": "none"}]}
    path = write_spec(tmp, NAME, spec)
    proc = nvmprov("create", str(path), "--no-power-cycle", "--json")
    try:
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"create printed no JSON report (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        assert proc.returncode == 0, proc.stderr[-6000:]
        yield Created(NAME, path, proc, report)
    finally:
        destroy_quietly(NAME)
        virsh("vol-delete", "--pool", POOL, PLANTED, check=False)
        print(f"test_attach_managed: module wall time {time.monotonic() - T0:.0f}s")


def test_live_nvdimm_attach_is_formatted_mounted_and_verified(managed: Created) -> None:
    t0 = time.monotonic()
    region = attached(nvmprov("attach", NAME, "--size", "64MiB", "--name", "nv", "--json", timeout_s=600), "nv")
    print(f"live nvdimm attach with the agent's proof: {time.monotonic() - t0:.1f}s")
    assert (region["model"], region["filesystem"], region["mountpoint"]) == ("nvdimm", "ext4", "/mnt/nv"), region
    assert region["dax"] is True and region["xip_ok"] is True and region["data_ok"] is True, region
    assert aliases(inactive=False) == ["base", "nv"] and aliases(inactive=True) == ["base", "nv"]  # live + config
    mounts = [ln.split() for ln in guest("cat /proc/mounts").splitlines()]
    (mount,) = [m for m in mounts if m[1] == "/mnt/nv"]
    assert mount[2] == "ext4" and "dax=always" in mount[3].split(","), mount
    assert mount[0] == region["guest_device"], (mount, region)


def test_virtio_pmem_attach_is_live_and_recorded_not_configured(managed: Created) -> None:
    t0 = time.monotonic()
    region = attached(nvmprov("attach", NAME, "--size", "64MiB", "--model", "virtio-pmem", "--name", "vp", "--json",
                              timeout_s=600), "vp")
    print(f"virtio-pmem live attach with the agent's proof: {time.monotonic() - t0:.1f}s")
    assert region["model"] == "virtio-pmem" and region["mountpoint"] == "/mnt/vp", region
    assert region["dax"] is True and region["data_ok"] is True, region
    assert aliases(inactive=False) == ["base", "nv", "vp"]
    assert aliases(inactive=True) == ["base", "nv"]   # libvirt 9.0 cannot start a domain with it in the config


def test_hot_unplug_refusals_are_shown_and_change_nothing(managed: Created) -> None:
    before = (virsh("dumpxml", NAME), virsh("dumpxml", NAME, "--inactive"), volumes())
    for flags in ((), ("--live",)):
        proc = nvmprov("detach", NAME, "nv", *flags)
        assert proc.returncode == 2, proc.stderr
        assert f"cannot detach nv from {NAME}; nothing was changed" in proc.stderr
        assert "QEMU cannot hot-unplug an nvdimm (\"nvdimm device hot unplug is not supported yet\")" in proc.stderr
        assert f"`nvmprov detach {NAME} nv --config` drops nv from the config" in proc.stderr
    proc = nvmprov("detach", NAME, "vp")      # not refused before asking: QEMU itself says no
    assert proc.returncode == 3, proc.stderr
    assert "QEMU refuses to hot-unplug virtio-pmem" in proc.stderr
    assert "virtio based memory devices cannot be unplugged" in proc.stderr
    assert f"`nvmprov detach {NAME} vp --config` drops it from nvmprov's record" in proc.stderr
    assert (virsh("dumpxml", NAME), virsh("dumpxml", NAME, "--inactive"), volumes()) == before


def test_config_attach_and_show(managed: Created) -> None:
    proc = nvmprov("attach", NAME, "--size", "32MiB", "--name", "cfg", "--config", "--json", timeout_s=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (g,) = json.loads(proc.stdout)["guests"]
    assert g["ok"] is True and g["regions"] == [], g     # no agent on a region the guest does not have yet
    assert f"cfg is in {NAME}'s config only: it appears after `nvmprov stop {NAME}`" in g["notes"][0], g
    assert aliases(inactive=True) == ["base", "nv", "cfg"] and "cfg" not in aliases(inactive=False)
    shown = json.loads(nvmprov("show", NAME, "--json", check=True, timeout_s=120).stdout)
    assert [(r["name"], r["model"], r["where"]) for r in shown["regions"]] == [
        ("base", "nvdimm", "live+config"), ("nv", "nvdimm", "live+config"), ("vp", "virtio-pmem", "live"),
        ("cfg", "nvdimm", "config")]
    text = nvmprov("show", NAME, check=True, timeout_s=120).stdout
    assert all(name in text for name in ("base", "nv", "vp", "cfg")), text


def test_detach_config_then_restart_brings_cfg_and_drops_vp(managed: Created) -> None:
    proc = nvmprov("detach", NAME, "vp", "--config")
    assert proc.returncode == 0, proc.stderr
    assert "vp detached (metadata)" in proc.stdout and "the next start does not plug it" in proc.stdout
    assert "kept the backing volume" in proc.stdout
    took_s = {}
    for step in (("stop", "--force"), ("start",), ("verify", "--json")):  # --force: no wait for ACPI
        t0 = time.monotonic()
        proc = nvmprov(step[0], NAME, *step[1:], check=True, timeout_s=900)
        took_s[step[0]] = round(time.monotonic() - t0, 1)
    print(f"restart: {took_s}")
    report = json.loads(proc.stdout)
    assert aliases(inactive=False) == ["base", "nv", "cfg"]
    (g,) = report["guests"]
    by_name = {r["name"]: r for r in g["regions"]}
    assert sorted(by_name) == ["base", "cfg", "nv"], by_name
    cfg = by_name["cfg"]
    assert cfg["mountpoint"] == "/mnt/cfg" and cfg["dax"] is True and cfg["data_ok"] is True, cfg
    assert by_name["nv"]["data_ok"] is True, by_name["nv"]   # the live attach's data survived the restart


def test_detach_purge_deletes_only_what_nvmprov_made(managed: Created) -> None:
    virsh("vol-create-as", POOL, PLANTED, "16M", "--format", "raw")
    proc = nvmprov("attach", NAME, "--size", "16MiB", "--name", "gone", "--config", "--filesystem", "none",
                   timeout_s=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    before = volumes()
    proc = nvmprov("detach", NAME, "gone", "--purge", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"deleted volume {NAME}-pmem-gone.raw" in proc.stdout, proc.stdout
    assert before - volumes() == {f"{NAME}-pmem-gone.raw"}
    # in use by the running guest: kept, whatever --purge says
    proc = nvmprov("detach", NAME, "cfg", "--config", "--purge", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"kept {NAME}-pmem-cfg.raw: still used by {NAME}" in proc.stdout, proc.stdout
    assert volumes() == before - {f"{NAME}-pmem-gone.raw"} and PLANTED in volumes()
    t0 = time.monotonic()
    shown = json.loads(nvmprov("show", NAME, "--json", check=True, timeout_s=120).stdout)
    print(f"show after the detaches: {time.monotonic() - t0:.1f}s, notes {shown['notes']}")
    assert [(r["name"], r["where"]) for r in shown["regions"]] == [
        ("base", "live+config"), ("nv", "live+config"), ("cfg", "live")]
