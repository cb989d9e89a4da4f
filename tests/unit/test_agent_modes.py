"""Namespace modes in the agent (issue 17): guest output -> facts -> commands, as tables, and
apply()/recheck() against the simulated guest kernel of test_agent_steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmprov.agent import apply, recheck, steps
from nvmprov.agent.converge import describe, gather, tail_offset
from nvmprov.agent.facts import parse_guest_facts
from nvmprov.errors import GuestError
from nvmprov.sizes import RESERVED_TAIL_BYTES

from .test_agent_steps import FakeGuest, FakeNs, MiB, plan_of, region

FIXTURES = Path(__file__).parent / "fixtures" / "agent"


# --- a real guest's facts (captured, see fixtures/agent/README.md) ------------------------------------------

REAL = parse_guest_facts((FIXTURES / "real-facts-modes.json").read_text())
DEVDAX = region("a", size=128 * MiB, slot=0, fs="none", mount=None, mode="devdax")
SECTOR = region("b", size=128 * MiB, slot=1, mode="sector", mount="/mnt/b")
RAW = region("c", size=128 * MiB, slot=2, label=2 * MiB, fs="none", mount=None, mode="raw")
VIRT = region("v", model="virtio-pmem", size=128 * MiB, slot=None, pci=0x10, mount="/mnt/v")


def test_real_facts_show_devdax_as_a_character_device_and_no_persistence_domain() -> None:
    assert set(REAL.daxdevs) == {"dax1.0"}
    dax = REAL.daxdevs["dax1.0"]
    assert (dax.region, dax.size_bytes, dax.align_bytes) == ("region1", 130023424, 2 * MiB)
    assert {r.persistence_domain for r in REAL.regions.values()} == {None}
    ns = REAL.regions["region1"].active_namespace
    assert ns is not None and (ns.mode, ns.align, ns.blockdev) == ("devdax", 2 * MiB, None)


@pytest.mark.parametrize(("plan_region", "device", "mode", "usable", "tail"), [
    (DEVDAX, "/dev/dax1.0", "devdax", 130023424 - RESERVED_TAIL_BYTES, 130023424 - RESERVED_TAIL_BYTES),
    (SECTOR, "/dev/pmem3s", "sector", 133005312, None),
    (RAW, "/dev/pmem2", "raw", 132120576 - RESERVED_TAIL_BYTES, 132120576 - RESERVED_TAIL_BYTES),
    (VIRT, "/dev/pmem0", "fsdax", 128 * MiB, None),
])
def test_real_facts_describe_each_mode(plan_region: object, device: str, mode: str, usable: int,
                                       tail: int | None) -> None:
    st = describe(REAL, plan_region)  # type: ignore[arg-type]
    assert (st.guest_device, st.namespace_mode, st.usable_bytes, st.tail_offset) == (device, mode, usable, tail)


@pytest.mark.parametrize("plan_region", [DEVDAX, SECTOR, RAW, VIRT])
def test_real_facts_of_finished_regions_need_no_command(plan_region: object) -> None:
    # the sector region is mounted without dax in the capture, and that is what it asks for
    assert steps.plan_commands(REAL, plan_region, reformat=False) == []  # type: ignore[arg-type]
    assert [m.options for m in REAL.mounts if m.target == "/mnt/b"] == [("rw", "relatime")]


# --- facts -> commands, one phase at a time -----------------------------------------------------------------


def _fresh(modules: tuple[str, ...] = ("dax_pmem", "device_dax", "nd_btt")) -> FakeGuest:
    g = FakeGuest()
    g.modules |= set(modules)
    g.add_nvdimm(0, 512 * MiB)
    return g


def first_phase(guest: FakeGuest, r: object, reformat: bool = False) -> list[str]:
    return [c.render() for c in steps.plan_commands(gather(guest), r, reformat=reformat)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("plan_region", "modules", "expected"), [
    (region(fs="none", mount=None, mode="devdax"), (), ["modprobe -a dax_pmem device_dax"]),
    (region(mode="sector"), (), ["modprobe -a nd_btt"]),
    (region(fs="none", mount=None, mode="devdax"), ("dax_pmem", "device_dax"),
     ["ndctl create-namespace -f -e namespace0.0 -m devdax -a 2097152"]),
    (region(fs="none", mount=None, mode="devdax", align=4096), ("dax_pmem", "device_dax"),
     ["ndctl create-namespace -f -e namespace0.0 -m devdax -a 4096"]),
    (region(mode="sector"), ("nd_btt",), ["ndctl create-namespace -f -e namespace0.0 -m sector"]),
    (region(fs="none", mount=None, mode="raw"), (), []),                # the raw namespace is what it asks for
    (region(mode="raw"), (), [                                           # a filesystem on it, mounted without dax
        f"mkfs.ext4 -q -F -b 4096 -U {steps.fs_uuid(region(mode='raw'))} -L data /dev/pmem0",
        "mkdir -p /mnt/data", "mount -t ext4 /dev/pmem0 /mnt/data"]),
    (region(), (), ["ndctl create-namespace -f -e namespace0.0 -m fsdax"]),   # fsdax: as before issue 17
])
def test_first_phase_per_mode(plan_region: object, modules: tuple[str, ...], expected: list[str]) -> None:
    assert first_phase(_fresh(modules), plan_region) == expected


def _made(mode: str, align: int | None = None, fs: tuple[str, str, str] | None = None) -> FakeGuest:
    g = _fresh()
    ns = g.regions["region0"].namespaces[0]
    ns.mode, ns.align, ns.uuid = mode, align, "00000000-0000-4000-8000-000000000099"
    if mode == "devdax":
        ns.blockdev = None
    if fs:
        g.fs[ns.blockdev or ""] = fs
    return g


@pytest.mark.parametrize(("guest", "plan_region", "error"), [
    (lambda: _made("devdax", 4096), region(fs="none", mount=None, mode="devdax"),
     "is already a devdax (align 4096) namespace, not devdax (align 2097152); pass --reformat"),
    (lambda: _made("devdax", 2 * MiB), region(mode="sector"),
     "is already a devdax (align 2097152) namespace, not sector; pass --reformat"),
    (lambda: _made("fsdax", fs=("ext4", "u", "l")), region(fs="none", mount=None, mode="devdax"),
     "holding a ext4 filesystem (/dev/pmem0); making it devdax would destroy it"),
    (lambda: _made("sector"), region(),
     "is already a sector namespace, not fsdax"),
])
def test_a_namespace_of_another_mode_is_never_converted_without_reformat(guest: object, plan_region: object,
                                                                         error: str) -> None:
    with pytest.raises(GuestError, match=error.replace("(", r"\(").replace(")", r"\)")):
        first_phase(guest(), plan_region)  # type: ignore[operator]
    assert first_phase(guest(), plan_region, reformat=True)[0].startswith("ndctl create-namespace -f -e namespace0.0")  # type: ignore[operator]


# --- apply: converge, then nothing; recheck after a power cut ---------------------------------------------


def _guest_of_three() -> tuple[FakeGuest, object]:
    g = FakeGuest()
    for slot in range(3):
        g.add_nvdimm(slot, 128 * MiB)
    p = plan_of(
        region("dd", slot=0, size=128 * MiB, fs="none", mount=None, mode="devdax"),
        region("sec", slot=1, size=128 * MiB, mode="sector", mount="/mnt/sec"),
        region("raw", slot=2, size=128 * MiB, fs="none", mount=None, mode="raw"),
    )
    return g, p


def test_apply_makes_each_mode_and_a_second_run_changes_nothing() -> None:
    g, p = _guest_of_three()
    states = apply(g, p)  # type: ignore[arg-type]
    by_name = {s.name: s for s in states}
    assert by_name["dd"].guest_device == "/dev/dax0.0" and by_name["dd"].namespace_mode == "devdax"
    assert by_name["dd"].tail_offset == by_name["dd"].usable_bytes
    assert by_name["sec"].guest_device == "/dev/pmem1s" and by_name["sec"].mountpoint == "/mnt/sec"
    assert not by_name["sec"].mount_dax
    assert by_name["raw"].namespace_mode == "raw" and by_name["raw"].usable_bytes == 126 * MiB
    assert "nofail 0 0" in g.fstab and "dax" not in g.fstab.split("/mnt/sec")[1].splitlines()[0]
    made = list(g.commands)
    assert "modprobe -a dax_pmem device_dax nd_btt" in g.modprobes
    assert not any("pmem2" in c or "namespace2.0" in c for c in made)  # raw: nothing was run on it
    g.commands.clear()
    apply(g, p)  # type: ignore[arg-type]
    assert g.commands == []


def test_after_a_power_cut_each_mode_comes_back_with_modules_and_mounts_only() -> None:
    g, p = _guest_of_three()
    apply(g, p)  # type: ignore[arg-type]
    g.power_cycle()
    g.commands.clear()
    check = recheck(g, p)  # type: ignore[arg-type]
    assert check.lost == {}
    assert check.states["dd"].guest_device == "/dev/dax0.0"
    assert all(not c.startswith(("ndctl", "mkfs")) for c in g.commands), g.commands


def test_a_devdax_namespace_that_came_back_fsdax_is_lost_not_remade() -> None:
    g, p = _guest_of_three()
    apply(g, p)  # type: ignore[arg-type]
    g.power_cycle()
    ns = g.regions["region0"].namespaces[0]
    ns.mode, ns.align, ns.blockdev = "fsdax", None, "pmem0"
    check = recheck(g, p)  # type: ignore[arg-type]
    assert "not persisted" in check.lost["dd"] and "already a fsdax namespace, not devdax" in check.lost["dd"]


def test_tail_offset_is_page_aligned_and_leaves_the_last_2mib() -> None:
    assert tail_offset(130023424, 2 * MiB) == 130023424 - 2 * MiB
    assert tail_offset(133005312, None) == 133005312 - 2 * MiB  # 4 KiB multiple already
    assert tail_offset(2 * MiB + 4096, 2 * MiB) is None  # nothing would be left before it


def test_fake_ns_keeps_align() -> None:  # guards the simulator the tables above rest on
    assert FakeNs("namespace0.0", "devdax", 1, None, align=4096).align == 4096


# --- verify: MAP_SYNC and the reserved tail, through the real guest program on this host ------------------


def _device(tmp_path: Path, size: int = 8 * MiB) -> Path:
    dev = tmp_path / "dev"
    dev.write_bytes(b"U" * size)  # "user data" everywhere
    return dev


def _state(name: str, device: str, usable: int, mode: str = "raw", **kw: object) -> object:
    from dataclasses import replace

    from .test_agent_verify import state

    return replace(state(name, None, fs=None, mode=mode), guest_device=device, usable_bytes=usable, tail_offset=usable,
                   **kw)


@pytest.mark.parametrize("devdax", [False, True])
def test_tail_is_written_only_when_asked_and_nothing_else_is_touched(tmp_path: Path, devdax: bool) -> None:
    from nvmprov.agent import verify

    from .test_agent_verify import LocalRunner

    dev = _device(tmp_path)
    usable = 8 * MiB - RESERVED_TAIL_BYTES
    r = region("raw", fs="none", mount=None, mode="raw")
    st = _state("raw", str(dev), usable)
    if devdax:  # a regular file maps like the character device: the devdax code path (mmap, no msync)
        r = region("raw", fs="none", mount=None, mode="devdax")
        st = _state("raw", str(dev), usable, mode="devdax", device_dax=True)
    (made,) = verify(LocalRunner(), plan_of(r), [st], write_tails=True)  # type: ignore[list-item]
    data = dev.read_bytes()
    assert data[:usable] == b"U" * usable  # user data untouched
    assert data[usable:].startswith(made.marker.encode() + b"\n") and made.marker.startswith("NVMPROV-MARKER:g:raw:")
    assert (made.data_ok, made.payload_offset, made.payload_path) == (True, usable, str(dev))
    # devdax is DAX by definition, and MAP_SYNC is measured on it (refused on this host's file)
    assert (made.dax, made.map_sync) == ((True, False) if devdax else (None, None))
    # a later verify only reads: same tail, same evidence
    (again,) = verify(LocalRunner(), plan_of(r), [st])  # type: ignore[list-item]
    assert dev.read_bytes() == data
    assert (again.data_ok, again.payload_sha256, again.marker) == (True, made.payload_sha256, made.marker)


def test_a_tail_nvmprov_did_not_write_fails_data_and_is_left_alone(tmp_path: Path) -> None:
    from nvmprov.agent import verify

    from .test_agent_verify import LocalRunner

    dev = _device(tmp_path)
    usable = 8 * MiB - RESERVED_TAIL_BYTES
    r = region("raw", fs="none", mount=None, mode="raw")
    (report,) = verify(LocalRunner(), plan_of(r), [_state("raw", str(dev), usable)])  # type: ignore[list-item]
    assert (report.data_ok, report.payload_sha256, report.marker) == (False, None, None)
    assert dev.read_bytes() == b"U" * 8 * MiB


def test_map_sync_is_measured_on_a_file_of_the_filesystem(tmp_path: Path) -> None:
    """This host's filesystem is not DAX: the kernel refuses MAP_SYNC (the virtio-pmem case)."""
    from nvmprov.agent.verify import Job, run_jobs

    from .test_agent_verify import LocalRunner

    (result,) = run_jobs(LocalRunner(), [Job(region(mount=str(tmp_path)), map_sync_path=str(tmp_path))])
    assert result.map_sync is False and result.probe is None and result.payload is None
    assert list(tmp_path.iterdir()) == []  # its probe file is gone


def test_sector_and_raw_filesystems_get_a_payload_and_map_sync_but_no_dax_probe(tmp_path: Path) -> None:
    from dataclasses import replace

    from nvmprov.agent import verify

    from .test_agent_verify import LocalRunner, state

    r = region("sec", mode="sector", mount=str(tmp_path))
    st = replace(state("sec", str(tmp_path), mode="sector"), guest_device="/dev/pmem0s")
    (report,) = verify(LocalRunner(), plan_of(r), [st])
    assert (report.dax, report.xip_ok, report.data_ok, report.map_sync) == (None, None, True, False)
    assert report.payload_path == f"{tmp_path}/.nvmprov-payload"


def test_a_labelled_region_gets_its_labels_then_the_mode() -> None:
    from .test_agent_steps import LABEL, _labelled_blank, _labelled_initialised

    r = region(fs="none", mount=None, mode="devdax", label=LABEL)
    blank = _labelled_blank()
    blank.modules |= {"dax_pmem", "device_dax"}
    assert first_phase(blank, r) == [
        "ndctl disable-region region0", "ndctl init-labels -f nmem0", "ndctl enable-region region0",
        "ndctl create-namespace -r region0 -m devdax -a 2097152",
    ]
    ready = _labelled_initialised()
    ready.modules |= {"nd_btt"}
    assert first_phase(ready, region(mode="sector", label=LABEL)) == ["ndctl create-namespace -r region0 -m sector"]
    # raw keeps the label-less raw namespace a blank labelled region shows: nothing to run
    assert first_phase(_labelled_blank(), region(fs="none", mount=None, mode="raw", label=LABEL)) == []
