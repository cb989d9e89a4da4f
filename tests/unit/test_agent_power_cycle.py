"""The persistence re-check after a power cut must not mutate: modules and mounts only.

apply() would quietly re-create a lost namespace or filesystem (and rewrite fstab) and so hide the
very data loss the proof is there to find. These run the re-check against the fake guest kernel of
test_agent_steps after FakeGuest.power_cycle(), and proof.power_cycle_proof with libvirt stubbed.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest

from nvmprov import agent, proof
from nvmprov.agent import RegionReport, after_power_cycle
from nvmprov.agent.facts import parse_guest_facts
from nvmprov.plan import Plan
from nvmprov.progress import Progress
from nvmprov.report import GuestReport, SshInfo

from .test_agent_steps import LABEL, FakeGuest, FakeNs, MiB, plan_of, region

THREE = plan_of(
    region("fast", slot=0, size=1024 * MiB, mount="/mnt/fast"),
    region("labelled", slot=1, label=LABEL, fs="xfs", mount="/mnt/labelled"),
    region("v", model="virtio-pmem", pci=0x0C, size=256 * MiB, mount="/mnt/v"),
)
MUTATING = ("ndctl", "mkfs", "umount", "cat ")


def provisioned(plan: Plan = THREE) -> tuple[FakeGuest, list[RegionReport]]:
    """A guest after apply + verify: every region mounted, a payload written on each."""
    g = FakeGuest()
    g.add_nvdimm(0, 1024 * MiB)
    g.add_nvdimm(1, 512 * MiB, label=LABEL)
    g.add_virtio(0x0C, 256 * MiB)
    states = {s.name: s for s in agent.apply(g, plan)}
    reports = []
    for r in plan.regions:
        path, data = f"{r.mount}/.nvmprov-payload", f"NVMPROV-MARKER:g:{r.name}:0123456789".encode() + b"x" * 64
        g.files[path] = data
        reports.append(report_of(r.name, states[r.name].guest_device, path, data))
    return g, reports


def report_of(name: str, device: str | None, path: str, data: bytes) -> RegionReport:
    return RegionReport(
        name=name, model="nvdimm", size_bytes=0, usable_bytes=None, backing_path=None, guest_device=device,
        namespace_mode="fsdax", filesystem="ext4", mountpoint=None, dax=True, xip_ok=True, data_ok=True,
        payload_path=path, payload_sha256=hashlib.sha256(data).hexdigest(), marker=data[:40].decode(),
    )


def after_cut(g: FakeGuest) -> tuple[list[str], str]:
    """Cut the power; what the guest runs from here on is what the re-check sent."""
    g.power_cycle()
    g.commands.clear()
    g.execs = g.gathers = g.pythons = 0
    return g.commands, g.fstab


def test_everything_survived_only_modules_and_the_virtio_pmem_mount_run() -> None:
    g, reports = provisioned()
    commands, fstab = after_cut(g)
    after_power_cycle(g, THREE, reports)
    assert [(r.name, r.persisted, r.persisted_reason) for r in reports] == [
        ("fast", True, None), ("labelled", True, None), ("v", True, None),
    ]
    assert g.modprobes[-1] == "modprobe -a virtio_pmem"  # the hot-plugged device's driver, by the collector
    assert [c.split()[0] for c in commands] == ["mkdir", "mount"]  # virtio-pmem's mount; sha256 reads only
    assert g.fstab == fstab
    # one guest program start for it all (was 3 execs): read; mount + read; sha256 of all three payloads
    assert (g.execs, g.pythons, g.gathers) == (1, 1, 2)


def test_namespace_gone_after_the_cycle_is_not_persisted_and_nothing_is_recreated() -> None:
    g, reports = provisioned()
    commands, fstab = after_cut(g)
    # What a private mapping does: the fsdax info block and the filesystem never reached the file.
    r0 = g.regions["region0"]
    r0.namespaces = [FakeNs("namespace0.0", "raw", r0.size, "pmem0")]
    g.fs.pop("pmem0")
    g.mounts = [m for m in g.mounts if m[0] != "/dev/pmem0"]
    after_power_cycle(g, THREE, reports)
    fast, labelled, v = reports
    assert fast.persisted is False
    assert fast.persisted_reason == (
        "region fast: not persisted: after the power cycle the guest shows region0 with a raw namespace, not "
        "fsdax; bringing it back would take `ndctl create-namespace -f -e namespace0.0 -m fsdax`, which would "
        "hide the loss, so nothing was run"
    )
    assert (labelled.persisted, v.persisted) == (True, True)  # the other regions are still checked
    assert not any(c.startswith(MUTATING) for c in commands), commands  # no ndctl, no mkfs, no fstab
    assert r0.namespaces[0].mode == "raw" and "pmem0" not in g.fs
    assert g.fstab == fstab


def test_filesystem_gone_after_the_cycle_is_not_persisted_and_no_mkfs_runs() -> None:
    g, reports = provisioned()
    commands, _ = after_cut(g)
    g.fs.pop("pmem1")  # region1: the labelled DIMM, xfs; the namespace survived
    g.mounts = [m for m in g.mounts if m[0] != "/dev/pmem1"]
    after_power_cycle(g, THREE, reports)
    labelled = reports[1]
    assert labelled.persisted is False and labelled.persisted_reason is not None
    assert "no xfs filesystem on /dev/pmem1" in labelled.persisted_reason
    assert "`mkfs.xfs -q -f -m reflink=0,uuid=" in labelled.persisted_reason
    assert not any(c.startswith(MUTATING) for c in commands), commands


def test_blkid_failing_after_the_cycle_is_not_persisted_and_no_mkfs_runs() -> None:
    g, reports = provisioned()
    commands, _ = after_cut(g)
    g.mounts = [m for m in g.mounts if m[0] != "/dev/pmem0"]
    g.blkid_runs["pmem0"] = {"rc": 8, "stdout": "", "stderr": "ambivalent result"}
    after_power_cycle(g, THREE, reports)
    assert reports[0].persisted is False
    assert (reports[0].persisted_reason or "").startswith(
        "region fast: not persisted: after the power cycle, cannot tell whether /dev/pmem0 holds data"
    )
    assert not any(c.startswith(MUTATING) for c in commands), commands


def test_region_missing_or_unmountable_after_the_cycle_says_why() -> None:
    g, reports = provisioned()
    commands, _ = after_cut(g)
    del g.regions["region2"]  # the virtio-pmem device did not come back (hot-plug failed)
    g.mounts = [m for m in g.mounts if m[0] != "/dev/pmem0"]
    original = g._mutate

    def corrupt(command: str, stdin: bytes | None) -> tuple[int, str]:
        if command.startswith("mount") and "/dev/pmem0" in command:
            return 32, "mount: /mnt/fast: wrong fs type, bad option, bad superblock on /dev/pmem0"
        return original(command, stdin)

    g._mutate = corrupt  # type: ignore[method-assign]
    after_power_cycle(g, THREE, reports)
    fast, labelled, v = reports
    assert fast.persisted is False
    assert fast.persisted_reason == (
        "region fast: not persisted: after the power cycle, guest command failed (exit 32): mount -t ext4 -o dax "
        "/dev/pmem0 "
        "/mnt/fast: mount: /mnt/fast: wrong fs type, bad option, bad superblock on /dev/pmem0"
    )
    assert v.persisted is False and (v.persisted_reason or "").startswith(
        "region v: not persisted: after the power cycle, no guest region at virtio-pmem PCI slot 0000:00:0c.0"
    )
    assert labelled.persisted is True
    assert not any(c.startswith(MUTATING) for c in commands), commands


@pytest.mark.parametrize("damage", ["changed", "gone"])
def test_payload_changed_or_gone(damage: str) -> None:
    g, reports = provisioned()
    after_cut(g)
    path = reports[2].payload_path or ""
    if damage == "gone":
        del g.files[path]
    else:
        g.files[path] = b"NVMPROV-MARKER:g:v:0123456789" + b"y" * 64
    after_power_cycle(g, THREE, reports)
    v = reports[2]
    assert v.persisted is False
    expected = "is gone after the power cycle" if damage == "gone" else "reads back with sha256"
    assert f"region v: not persisted: {path} " in (v.persisted_reason or "") and expected in (v.persisted_reason or "")
    assert (reports[0].persisted, reports[1].persisted) == (True, True)


# --- proof.power_cycle_proof with libvirt stubbed ---------------------------------------------------------


class Session(FakeGuest):
    def close(self) -> None:
        self.closed = True


def test_power_cycle_proof_never_runs_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    g, reports = provisioned()
    session = Session()
    session.__dict__.update(g.__dict__)  # the same guest, as an SSH session with close()
    calls: list[str] = []
    marker_searches: list[str] = []

    def find_marker(volume: object, marker: bytes) -> int | None:
        marker_searches.append(marker.decode())
        return 155189248

    def cut_and_boot(dom: object) -> None:
        calls.append("power_off")
        session.power_cycle()
        r0 = session.regions["region0"]  # the namespace did not survive
        r0.namespaces = [FakeNs("namespace0.0", "raw", r0.size, "pmem0")]
        session.fs.pop("pmem0")
        session.mounts = [m for m in session.mounts if m[0] != "/dev/pmem0"]
        session.commands.clear()

    def forbidden(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the power-cycle proof must not converge the guest")

    monkeypatch.setattr(proof.virt, "power_off", cut_and_boot)
    monkeypatch.setattr(proof.virt, "start", lambda dom: calls.append("start"))
    monkeypatch.setattr(proof, "hotplug_virtio_pmem", lambda *a: calls.append("hotplug"))
    gates: list[object] = []
    monkeypatch.setattr(proof, "open_session", lambda *a, **kw: (gates.append(kw.get("seed_line")), session)[1])
    monkeypatch.setattr(proof.agent, "apply", forbidden)
    monkeypatch.setattr(proof.storage, "pool_of", lambda conn, name: "pool")
    monkeypatch.setattr(proof.storage, "volume", lambda pool, name: name)
    monkeypatch.setattr(proof.storage, "find_marker", find_marker)
    reports = [replace(r, backing_path=f"/pool/g-{r.name}.raw") for r in reports]
    report = GuestReport(name="g", ssh=SshInfo("127.0.0.1", 2222, "nvmprov", "/k", "/kh"))
    builtin = replace(THREE, base_volume="nvmprov-base.qcow2")  # the built-in image's overlay
    run = proof.GuestRun(None, builtin, None, Progress(), report, dom=object())  # type: ignore[arg-type]

    proof.power_cycle_proof(run, reports)

    assert calls == ["power_off", "start", "hotplug"]
    # a fresh boot: no SSH attempt before the built-in image's console says its seed is applied
    assert gates == [True]
    assert not any(c.startswith(MUTATING) for c in session.commands), session.commands
    fast, labelled, v = reports
    assert fast.persisted is False and "not persisted" in (fast.persisted_reason or "")
    assert fast.marker_offset is None and fast.marker not in marker_searches  # no host search for a lost region
    assert (labelled.persisted, labelled.marker_offset, v.persisted) == (True, 155189248, True)
    assert getattr(session, "closed", False)


# --- enumeration changes between boots ------------------------------------------------------------------


def renumber(g: FakeGuest, names: dict[str, str]) -> None:
    """The guest enumerates its pmem block devices in another order on this boot (as a kernel may)."""
    for r in g.regions.values():
        for ns in r.namespaces:
            if ns.blockdev in names:
                ns.blockdev = names[ns.blockdev]
    g.fs = {names.get(dev, dev): fs for dev, fs in g.fs.items()}


def test_report_names_the_devices_of_the_boot_after_the_power_cycle() -> None:
    """First boot: fast=/dev/pmem0, labelled=/dev/pmem1; after the cut they come back swapped. The report
    must say what the guest has now, and keep the names that do not change (filesystem and namespace UUID)."""
    g, reports = provisioned()
    for r in reports:
        r.observe(agent.describe(parse_guest_facts(g.facts_json()), THREE.region(r.name)))
    first = {r.name: (r.guest_device, r.fs_uuid, r.namespace_uuid) for r in reports}
    assert (first["fast"][0], first["labelled"][0]) == ("/dev/pmem0", "/dev/pmem1")
    after_cut_renumbered(g, {"pmem0": "pmem1", "pmem1": "pmem0"})
    after_power_cycle(g, THREE, reports)
    fast, labelled, v = reports
    assert (fast.persisted, labelled.persisted, v.persisted) == (True, True, True)
    assert (fast.guest_device, labelled.guest_device, v.guest_device) == ("/dev/pmem1", "/dev/pmem0", "/dev/pmem2")
    for r in reports:  # the stable names are the same as on the first boot
        assert (r.fs_uuid, r.namespace_uuid) == first[r.name][1:], r.name
        assert r.fs_uuid is not None, r.name
    assert labelled.namespace_uuid is not None and fast.namespace_uuid is not None  # fsdax: in the info block
    mounts = {target: source for source, target, *_ in g.mounts}
    assert {r.mountpoint: r.guest_device for r in reports} == mounts


def test_report_of_a_region_gone_after_the_cycle_names_no_device() -> None:
    g, reports = provisioned()
    after_cut(g)
    del g.regions["region2"]  # virtio-pmem did not come back; its old /dev/pmem2 names nothing now
    after_power_cycle(g, THREE, reports)
    v = reports[2]
    assert (v.persisted, v.guest_device, v.mountpoint, v.fs_uuid) == (False, None, None, None)


def after_cut_renumbered(g: FakeGuest, names: dict[str, str]) -> None:
    renumber(g, names)
    after_cut(g)
