"""Parsers of guest command output: tables of output -> fact, plus the guest programs run locally."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from nvmprov.agent import facts as F
from nvmprov.agent.program import started
from nvmprov.errors import GuestError
from nvmprov.plan import RegionPlan

FIXTURES = Path(__file__).parent / "fixtures" / "agent"
MiB = 1024 * 1024


def guest_module(name: str) -> types.ModuleType:
    """A guest program module as the loader makes it in the guest (siblings imported by bare name)."""
    from nvmprov.agent.program import MODULES, source

    saved = {n: sys.modules[n] for n in MODULES if n in sys.modules}
    try:
        for n in MODULES[: MODULES.index(name) + 1]:
            m = sys.modules[n] = types.ModuleType(n)
            exec(compile(source(n), f"{n}.py", "exec"), m.__dict__)  # noqa: S102 - our own resource
        return m
    finally:
        for n in MODULES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


verify_regions = guest_module("verify_regions")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- ndctl list -----------------------------------------------------------------------------------


def test_ndctl_prints_nothing_when_there_is_nothing() -> None:
    assert F.parse_ndctl_list("") == F.NdctlList()
    assert F.parse_ndctl_list("\n  \n") == F.NdctlList()


def test_ndctl_lone_object_is_one_namespace() -> None:
    listed = F.parse_ndctl_list(fixture("ndctl-lone-namespace.json"))
    assert listed.namespaces == (
        F.NdNamespace(
            dev="namespace0.0",
            mode="fsdax",
            size_bytes=1054867456,
            blockdev="pmem0",
            uuid="6a7b2ca5-5cf6-4c53-8a43-a9e3b6c1a1f1",
            enabled=True,
            align=2097152,
        ),
    )
    assert listed.regions == () and listed.dimms == ()


def test_ndctl_array_of_one_equals_lone_object() -> None:
    lone = fixture("ndctl-lone-namespace.json")
    assert F.parse_ndctl_list(f"[{lone}]") == F.parse_ndctl_list(lone)


def test_ndctl_several_top_level_bus_objects() -> None:
    listed = F.parse_ndctl_list(fixture("ndctl-buses.json"))
    assert [(n.dev, n.mode, n.size_bytes, n.blockdev) for n in listed.all_namespaces()] == [
        ("namespace9.0", "raw", 33554432, "pmem9"),
        ("namespace0.0", "fsdax", 8589934592, "pmem0"),
    ]


def test_ndctl_dimms_and_regions_with_nested_namespaces() -> None:
    listed = F.parse_ndctl_list(fixture("ndctl-dimms-regions.json"))
    assert {d.dev: d.handle for d in listed.dimms} == {"nmem0": 1, "nmem1": 2}
    regions = {r.dev: r for r in listed.regions}
    assert regions["region1"].size_bytes == 536739840
    assert [n.dev for n in regions["region0"].namespaces] == ["namespace0.0", "namespace0.1"]
    seed = regions["region0"].namespaces[1]
    assert seed.size_bytes == 0 and not seed.enabled and not seed.active
    assert regions["region0"].namespaces[0].active


def test_ndctl_garbage_is_a_guest_error() -> None:
    with pytest.raises(GuestError, match="cannot parse `ndctl list`"):
        F.parse_ndctl_list("{not json")


# --- /proc/mounts, blkid, fincore, statx --------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "source", "fstype", "dax"),
    [
        ("/mnt/data", "/dev/pmem0", "ext4", True),
        ("/mnt/with space", "/dev/pmem1", "xfs", True),
        ("/mnt/inode", "/dev/pmem2", "ext4", False),  # dax=inode is per file, not the whole mount
        ("/mnt/plain", "/dev/pmem3", "ext4", False),
    ],
)
def test_proc_mounts(target: str, source: str, fstype: str, dax: bool) -> None:
    mounts = {m.target: m for m in F.parse_proc_mounts(fixture("proc-mounts.txt"))}
    assert (mounts[target].source, mounts[target].fstype, mounts[target].dax) == (source, fstype, dax)


def test_proc_mounts_old_plain_dax_option() -> None:
    (m,) = F.parse_proc_mounts("/dev/pmem0 /mnt/x ext4 rw,dax 0 0\n")
    assert m.dax


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blkid-ext4.txt", F.Blkid("ext4", "0b1e4d6e-3a55-4f1c-9d0e-2f6f5b9e3c11", "data", "filesystem")),
        ("blkid-xfs.txt", F.Blkid("xfs", "4c2f0f0a-8a4c-4a7e-9d55-0c3e2f7e1b22", "fast", "filesystem")),
    ],
)
def test_blkid_export(name: str, expected: F.Blkid) -> None:
    assert F.parse_blkid_export(fixture(name)) == expected


def test_blkid_nothing_found() -> None:
    assert F.parse_blkid_export("") is None
    assert F.parse_blkid_export("DEVNAME=/dev/pmem0\n") is None


BLKID_EXT4 = "DEVNAME=/dev/pmem0\nUUID=u-1\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n"
AMBIVALENT = (
    "/dev/pmem0: ambivalent result (probably more filesystems on the device, use wipefs(8) to see more details)"
)
NO_TYPE = "blkid exited 0 but printed no TYPE or PTTYPE"


@pytest.mark.parametrize(
    ("run", "fs_type", "failure"),
    [
        ({"rc": 0, "stdout": BLKID_EXT4, "stderr": ""}, "ext4", None),
        ({"rc": 2, "stdout": "", "stderr": ""}, None, None),  # the only "nothing there"
        ({"rc": 8, "stdout": "", "stderr": AMBIVALENT}, None, F.BlkidFailure(8, AMBIVALENT)),
        (
            {"rc": 127, "stdout": "", "stderr": "[Errno 2] No such file or directory: 'blkid'"},
            None,
            F.BlkidFailure(127, "[Errno 2] No such file or directory: 'blkid'"),
        ),
        ({"rc": 4, "stdout": "", "stderr": "usage"}, None, F.BlkidFailure(4, "usage")),
        ({"rc": 0, "stdout": "DEVNAME=/dev/pmem0\n", "stderr": ""}, None, F.BlkidFailure(0, NO_TYPE)),
        ({}, None, F.BlkidFailure(None, "no blkid result recorded")),
    ],
    ids=["rc0-ext4", "rc2-empty", "rc8-ambivalent", "rc127-missing", "rc4-usage", "rc0-no-type", "not-run"],
)
def test_blkid_verdict_only_exit_2_means_empty(
    run: dict[str, object], fs_type: str | None, failure: F.BlkidFailure | None
) -> None:
    fs, got_failure = F.blkid_verdict(run)
    assert (fs.type if fs else None, got_failure) == (fs_type, failure)
    raw = {"path": "/sys/x/region0/namespace0.0/block/pmem0", "size_sectors": "8", "ro": "0", "dax": "0", "blkid": run}
    dev = F.parse_guest_facts(json.dumps({"blockdevs": {"pmem0": raw}})).blockdevs["pmem0"]
    assert (dev.fs.type if dev.fs else None, dev.blkid_failure) == (fs_type, failure)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"fincore": [{"pages": 0, "file": "/mnt/d/true"}, {"pages": 9, "file": "/var/tmp/x/true"}]}',
            {"/mnt/d/true": 0, "/var/tmp/x/true": 9},
        ),
        ('{"fincore": [{"pages": "37", "file": "/bin/ls"}]}', {"/bin/ls": 37}),  # older util-linux: strings
        ("    0 /mnt/d/true\n   37 /bin/ls\n", {"/mnt/d/true": 0, "/bin/ls": 37}),
        ("", {}),
    ],
)
def test_fincore(text: str, expected: dict[str, int]) -> None:
    assert F.parse_fincore(text) == expected


def test_fincore_real_output_of_this_host(tmp_path: Path) -> None:
    copy = tmp_path / "true"
    copy.write_bytes(Path("/usr/bin/true").read_bytes())
    out = subprocess.run(["fincore", "--json", "-o", "PAGES,FILE", str(copy)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert F.parse_fincore(out.stdout)[str(copy)] > 0  # freshly written: in the page cache


def test_statx_parser_against_the_kernel(tmp_path: Path) -> None:
    """The guest's ctypes statx, run here on a real file, read back by the host parser."""
    target = tmp_path / "f"
    target.write_bytes(b"x" * 12345)
    target.chmod(0o640)
    raw = verify_regions.statx(str(target))
    st = F.parse_statx(bytes.fromhex(raw["raw"]))
    ref = os.stat(target)
    assert (st.ino, st.size, st.mode, st.nlink, st.uid, st.gid) == (
        ref.st_ino,
        12345,
        ref.st_mode,
        1,
        ref.st_uid,
        ref.st_gid,
    )
    assert st.blksize == ref.st_blksize
    assert not st.dax  # this host has no DAX filesystem


def test_statx_dax_bit_and_short_buffer() -> None:
    raw = bytearray(256)
    raw[8:16] = (F.STATX_ATTR_DAX | 0x10).to_bytes(8, "little")
    assert F.parse_statx(bytes(raw)).dax
    raw[8:16] = (0x10).to_bytes(8, "little")
    assert not F.parse_statx(bytes(raw)).dax
    with pytest.raises(GuestError, match="too short"):
        F.parse_statx(b"\0" * 20)


def test_statx_missing_file_reports_error(tmp_path: Path) -> None:
    assert verify_regions.statx(str(tmp_path / "missing")) == {"error": os.strerror(2)}


# --- sysfs and the whole fact set ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nmem0,0,536739840,0", F.Mapping("nmem0", 0, 536739840, 0)),
        ("nmem3,4096,1073741824,1\n", F.Mapping("nmem3", 4096, 1073741824, 1)),
        ("", None),
        ("nmem0,x,1,0", None),
    ],
)
def test_mapping(text: str, expected: F.Mapping | None) -> None:
    assert F.parse_mapping(text) == expected


def _ask_here(*requests: tuple[str, dict[str, object]]) -> list[object]:
    """The real guest program, started on this host as over SSH (loader + bundle on stdin)."""
    from .test_agent_verify import LocalRunner

    with started(LocalRunner()) as guest:
        return [guest.ask(op, 60, **fields) for op, fields in requests]


def test_the_guest_program_reads_facts_here(tmp_path: Path) -> None:
    """The real fact reader on this host (no NVDIMMs): the host's own mounts, no steps."""
    (raw,) = _ask_here(("facts", {}))
    assert isinstance(raw, dict)
    facts = F.guest_facts(raw)
    assert any(m.target == "/" for m in facts.mounts)
    assert facts.regions == {}
    assert set(raw) == {
        "modules", "ndctl", "regions", "nmems", "blockdevs", "daxdevs", "mounts", "fstab", "kernel_log",
        "system_ram", "waited", "cxl_memdevs", "cxl_windows",
    }
    assert (facts.steps, facts.modprobe) == ((), None)
    assert "udev_s" in raw["waited"]  # the first read of a phase settles


def test_only_the_first_read_of_a_phase_waits_for_udev_and_mounts() -> None:
    first, second = _ask_here(("facts", {}), ("facts", {}))
    assert "mount_jobs_s" in first["waited"] and set(second["waited"]) == {"probe_s"}  # type: ignore[index]


def _run_here(request: dict[str, object]) -> F.GuestFacts:
    ran, facts = _ask_here(("run", request), ("facts", {}))
    return F.guest_facts({**facts, **ran})  # type: ignore[dict-item]


def test_the_guest_program_runs_the_rounds_steps_in_order_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    log = tmp_path / "log"
    steps = [
        {"command": f"cat >> {log}", "stdin_b64": base64.b64encode(b"one\n").decode(), "timeout_s": 10},
        {"command": f"echo two >> {log}; echo oops >&2; exit 3", "stdin_b64": None, "timeout_s": 10},
        {"command": f"echo three >> {log}", "stdin_b64": None, "timeout_s": 10},
    ]
    present = sorted(os.listdir("/sys/module"))[0]  # loaded (or built in) here: nothing to modprobe
    facts = _run_here({"modules": [present], "steps": steps})
    assert log.read_text() == "one\ntwo\n"  # the third never ran
    assert facts.steps == (
        F.StepResult(steps[0]["command"], 0, ""),  # type: ignore[arg-type]
        F.StepResult(steps[1]["command"], 3, "oops\n"),  # type: ignore[arg-type]
    )
    assert facts.modprobe is None
    assert any(m.target == "/" for m in facts.mounts)  # the facts are read all the same


def test_a_step_timeout_is_exit_124() -> None:
    facts = _run_here({"steps": [{"command": "sleep 5", "stdin_b64": None, "timeout_s": 0.2}]})
    assert facts.steps == (F.StepResult("sleep 5", 124, "timed out after 0.2 s"),)


def test_a_request_far_beyond_a_command_line_travels_on_stdin(tmp_path: Path) -> None:
    """Was refused above 100 KB (the request went on argv; Linux caps one argument at 128 KiB)."""
    body = b"x" * 1_000_000
    out = tmp_path / "big"
    facts = _run_here({"steps": [{"command": f"cat > {out}", "stdin_b64": base64.b64encode(body).decode(),
                                  "timeout_s": 30}]})
    assert facts.steps == (F.StepResult(f"cat > {out}", 0, ""),) and out.read_bytes() == body


def test_a_failing_request_is_an_error_and_the_program_answers_the_next() -> None:
    from .test_agent_verify import LocalRunner

    with started(LocalRunner()) as guest:
        with pytest.raises(GuestError, match="failed on 'sha256'.*KeyError"):
            guest.ask("sha256", 10)  # no paths
        with pytest.raises(GuestError, match="unknown op 'nope'"):
            guest.ask("nope", 10)
        assert guest.ask("sha256", 10, paths=["/nonexistent"]) == {"sums": {"/nonexistent": None}}


def test_a_guest_without_python3_is_named() -> None:
    class NoPython:
        def start(self, cmd: str, *args: object, sudo: bool = False, stdin: bytes = b"") -> object:
            from .test_agent_verify import LocalProcess

            return LocalProcess("echo 'sh: 1: python3: not found' >&2; exit 127", stdin)

    with pytest.raises(GuestError, match=r"answered .facts.: sh: 1: python3: not found \(has the guest python3"):
        F.guest_facts(started(NoPython()).__enter__().ask("facts", 10))  # type: ignore[arg-type]


def test_old_collector_output_without_steps_parses() -> None:
    facts = F.parse_guest_facts(fixture("real-facts-fresh.json"))
    assert (facts.steps, facts.modprobe) == ((), None)


def test_guest_facts_garbage() -> None:
    with pytest.raises(GuestError, match="are no JSON"):
        F.parse_guest_facts("Traceback (most recent call last):")


def _region_plan(**kw: object) -> RegionPlan:
    base: dict[str, object] = dict(
        name="data",
        model="nvdimm",
        size_bytes=512 * MiB,
        backing_bytes=512 * MiB,
        label_bytes=None,
        readonly=False,
        host_pmem=False,
        allocation="full",
        filesystem="ext4",
        mount="/mnt/data",
        volume="g-pmem-data.raw",
        alias="ua-pmem-data",
        dimm_slot=0,
        pci_slot=None,
        expected_usable_bytes=500 * MiB,
    )
    base.update(kw)
    return RegionPlan(**base)  # type: ignore[arg-type]


def _facts(regions: dict[str, F.Region], dimms: dict[str, int | None]) -> F.GuestFacts:
    return F.GuestFacts(
        modules=frozenset(),
        ndctl_error=None,
        regions=regions,
        dimms={n: F.NdDimm(n, h) for n, h in dimms.items()},
        blockdevs={},
        mounts=(),
        fstab="",
    )


def _nfit_region(dev: str, nmem: str, size: int) -> F.Region:
    return F.Region(
        dev,
        f"/sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus0/{dev}",
        size,
        False,
        (F.Mapping(nmem, 0, size, 0),),
        (),
    )


def test_locate_by_nfit_handle_not_by_order() -> None:
    # region0 sits on the DIMM in slot 1 (handle 2), region1 on slot 0 (handle 1).
    facts = _facts(
        {
            "region0": _nfit_region("region0", "nmem1", 512 * MiB),
            "region1": _nfit_region("region1", "nmem0", 512 * MiB),
        },
        {"nmem0": 1, "nmem1": 2},
    )
    assert F.locate(facts, _region_plan(dimm_slot=0)).dev == "region1"
    assert F.locate(facts, _region_plan(dimm_slot=1)).dev == "region0"


def test_locate_checks_the_size_minus_label() -> None:
    facts = _facts({"region0": _nfit_region("region0", "nmem0", 512 * MiB - 128 * 1024)}, {"nmem0": 1})
    assert F.locate(facts, _region_plan(label_bytes=128 * 1024)).dev == "region0"
    with pytest.raises(GuestError, match="measures 536739840 bytes, expected 536870912"):
        F.locate(facts, _region_plan())


def test_locate_missing_region_names_what_is_there() -> None:
    facts = _facts({"region0": _nfit_region("region0", "nmem0", 512 * MiB)}, {"nmem0": 1})
    with pytest.raises(GuestError, match=r"no guest region at NFIT handle 0x4 \(dimm slot 3\).*region0"):
        F.locate(facts, _region_plan(dimm_slot=3))


def test_locate_virtio_pmem_by_pci_slot_of_its_root_port() -> None:
    behind_port = F.Region(
        "region1", "/sys/devices/pci0000:00/0000:00:10.0/0000:01:00.0/virtio5/ndbus1/region1", 256 * MiB, False, (), ()
    )
    other = F.Region(
        "region2", "/sys/devices/pci0000:00/0000:00:11.0/0000:02:00.0/virtio6/ndbus2/region2", 256 * MiB, False, (), ()
    )
    direct = F.Region(
        "region3", "/sys/devices/pci0000:00/0000:00:0c.0/virtio4/ndbus3/region3", 256 * MiB, False, (), ()
    )
    facts = _facts(
        {
            "region1": behind_port,
            "region2": other,
            "region3": direct,
            "region0": _nfit_region("region0", "nmem0", 512 * MiB),
        },
        {"nmem0": 1},
    )
    plan = _region_plan(
        model="virtio-pmem", dimm_slot=None, pci_slot=0x10, size_bytes=256 * MiB, backing_bytes=256 * MiB
    )
    assert behind_port.pci_path == ("0000:00:10.0", "0000:01:00.0")
    assert F.locate(facts, plan).dev == "region1"
    assert F.locate(facts, replace(plan, pci_slot=0x0C)).dev == "region3"
    assert facts.regions["region0"].pci_path == ()
    with pytest.raises(GuestError, match="no guest region at virtio-pmem PCI slot 0000:00:12.0"):
        F.locate(facts, replace(plan, pci_slot=0x12))


def test_blockdev_region_from_sysfs_path() -> None:
    dev = F.BlockDevice(
        "pmem0",
        "/sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus0/region0/pfn0.1/block/pmem0",
        0,
        False,
        True,
        None,
    )
    assert dev.region == "region0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1\n", 1), ("0", 0), ("-1\n", -1), (None, None), ("", None), ("node1", None)],
)
def test_sysfs_node(text: str | None, expected: int | None) -> None:
    assert F.parse_node(text) == expected


def test_region_nodes_come_from_sysfs() -> None:
    raw = json.loads(fixture("real-facts-nvdimms-ready.json"))
    first = sorted(raw["regions"])[0]
    raw["regions"][first].update(target_node="1\n", numa_node="0\n")
    facts = F.parse_guest_facts(json.dumps(raw))
    assert (facts.regions[first].target_node, facts.regions[first].numa_node) == (1, 0)
    # captures from collectors before issue 19 have neither: not known
    old = F.parse_guest_facts(fixture("real-facts-nvdimms-ready.json"))
    assert (old.regions[first].target_node, old.regions[first].numa_node) == (None, None)


def test_settle_waits_for_running_mounts_and_present_devices_only(tmp_path: Path) -> None:
    # A nofail fstab mount whose device is gone (detached region, CXL region not made yet) sits
    # "waiting" for its 90 s device timeout: the fact reader waited its whole 30 s on it (show 33 s).
    read_facts = guest_module("read_facts")
    present = tmp_path / "pmem0"
    present.touch()
    listing = ("7 mnt-a.mount start running\n"
               "8 mnt-b.mount start waiting\n"
               "9 mnt-c.mount start waiting\n"
               "10 dev-pmem9.device start running\n")
    sources = {"mnt-b.mount": str(present), "mnt-c.mount": "/dev/no-such-pmem"}
    assert read_facts.pending_mounts(listing, sources.get) == ["mnt-a.mount running", "mnt-b.mount waiting"]
    assert read_facts.pending_mounts("", sources.get) == []
