"""Labelled regions split into namespaces (issue 19, part 2), the pure half: the spec's rules with
FILE:LINE:COL and the fix, the fit rule as measured, the plan's units, the digest of older specs.

Measured on a guest here (kernel 6.1, ndctl 76, QEMU 7.2): a 512MiB nvdimm with a 128KiB label is a
510MiB region with align 16MiB and available_size 496MiB; `create-namespace -s 200M` fails "align
setting is 0x1000000 size 0xc800000 is misaligned"; fsdax 192MiB -> 197132288 bytes, devdax 304MiB
-> 312475648, sector 160MiB -> 166526976, raw 144MiB -> 150994944.
"""

from __future__ import annotations

import pytest

from nvmprov import domain, plan, sizes, spec
from nvmprov.agent import apply, recheck, steps
from nvmprov.agent.converge import RegionState
from nvmprov.agent.facts import parse_ndctl_list
from nvmprov.agent.verify import _prepare
from nvmprov.errors import GuestError, SpecError
from nvmprov.report import RegionReport

from .test_agent_steps import FakeGuest, FakeNs
from .test_domain import CTX

MiB = 1024**2
TCG_HOST = plan.HostFacts(kvm_domain_type=True, cpu_virt_extensions=False)
B = "name: demo\npmem:\n  - name: pm\n    size: 512MiB\n    label: 128KiB\n"  # region keys at col 5
SPLIT = B + ("    namespaces:\n"
             "      - {name: fs, size: 192MiB}\n"
             "      - {name: db, size: 304MiB, mode: devdax}\n")


def guest_of(text: str) -> spec.GuestSpec:
    return spec.loads(text, "g.yaml").guests[0]


def units_of(text: str) -> tuple[plan.RegionPlan, ...]:
    return plan.build(guest_of(text), TCG_HOST).units


@pytest.mark.parametrize(("namespace_bytes", "mode", "measured"), [
    (192 * MiB, "fsdax", 197132288), (304 * MiB, "devdax", 312475648), (160 * MiB, "sector", 166526976),
    (144 * MiB, "raw", 150994944)])
def test_usable_bytes_of_a_namespace_are_the_measured_ones(namespace_bytes: int, mode: str, measured: int) -> None:
    assert sizes.namespace_usable_bytes(namespace_bytes, mode) == measured


def test_available_bytes_of_a_labelled_region_are_the_measured_ones() -> None:
    assert sizes.labelled_available_bytes(512 * MiB, 2 * MiB) == 496 * MiB


def test_a_split_region_becomes_one_unit_per_namespace() -> None:
    fs, db = units_of(SPLIT)
    assert (fs.name, fs.namespace_of, fs.namespace_name, fs.namespace_bytes) == ("pm.fs", "pm", "fs", 192 * MiB)
    assert (fs.mode, fs.filesystem, fs.mount, fs.expected_usable_bytes) == ("fsdax", "ext4", "/mnt/pm-fs", 197132288)
    assert (db.mode, db.filesystem, db.mount, db.align_bytes) == ("devdax", "none", None, 2 * MiB)
    # devdax without a filesystem keeps nvmprov's proof in the reserved tail of its device
    assert db.reserved_tail and db.expected_usable_bytes == 312475648 - sizes.RESERVED_TAIL_BYTES
    # one device: the units share the region's slot, backing volume, label and node
    assert {(u.dimm_slot, u.volume, u.label_bytes, u.backing_bytes) for u in (fs, db)} == {
        (0, "demo-pmem-pm.raw", 2 * MiB, 512 * MiB)}


def test_a_region_without_namespaces_is_its_own_unit() -> None:
    p = plan.build(guest_of(B), TCG_HOST)
    assert p.units == p.regions


def test_plan_region_finds_regions_and_units() -> None:
    p = plan.build(guest_of(SPLIT), TCG_HOST)
    assert p.region("pm").namespaces and p.region("pm.db").namespace_name == "db"


def test_the_xml_has_one_nvdimm_for_the_split_region() -> None:
    xml = domain.render(plan.build(guest_of(SPLIT), TCG_HOST), CTX)
    assert xml.count("<memory model=\"nvdimm\"") == 1
    md = domain.parse_metadata(xml)
    assert md is not None and [r.name for r in md.regions] == ["pm"]  # its namespaces come from the spec


def test_older_specs_keep_their_digest() -> None:
    assert "namespaces" not in guest_of(B).canonical()["pmem"][0]


def test_the_recorded_spec_of_a_split_guest_loads_again_with_its_digest() -> None:
    g = guest_of(SPLIT)
    again, warnings = spec.load_recorded(g.canonical())
    assert warnings == [] and again.digest() == g.digest() and again.pmem[0].namespaces == g.pmem[0].namespaces


def test_namespaces_change_the_digest() -> None:
    assert guest_of(SPLIT).digest() != guest_of(B).digest()


BAD = [
    pytest.param("    namespaces:\n      - {name: fs, size: 200MiB}\n",
                 "g.yaml:7:26: pmem[0].namespaces[0].size: 200MiB is not a multiple of 16MiB, the alignment of a "
                 "labelled region's namespaces (ndctl refuses it as misaligned); use 208MiB or 192MiB",
                 id="misaligned"),
    pytest.param("    namespaces:\n      - {name: fs, size: 192MiB}\n      - {name: db, size: 320MiB, mode: devdax}\n",
                 "g.yaml:7:7: pmem[0].namespaces: the namespaces take 512MiB but the 512MiB region offers 496MiB "
                 "after its 2MiB label and the 16MiB alignment; use size: 514MiB or make the last namespace 304MiB",
                 id="too_big"),
    pytest.param("    namespaces:\n      - {name: fs, size: 192MiB}\n      - {name: fs, size: 192MiB}\n",
                 "g.yaml:8:16: pmem[0].namespaces[1].name: namespace name 'fs' is used twice (also namespaces[0]); "
                 "give each namespace its own name", id="same_name"),
    pytest.param("    mode: devdax\n    namespaces:\n      - {name: fs, size: 192MiB}\n",
                 "g.yaml:6:11: pmem[0].mode: belongs to each namespace of a split region; move it into its namespace "
                 "(namespaces: [{name: ..., size: ..., mode: ...}])", id="region_mode"),
    pytest.param("    mount: /mnt/x\n    namespaces:\n      - {name: fs, size: 192MiB}\n",
                 "g.yaml:6:12: pmem[0].mount: belongs to each namespace of a split region; move it into its "
                 "namespace (namespaces: [{name: ..., size: ..., mount: ...}])", id="region_mount"),
    pytest.param("    namespaces:\n      - {name: db, size: 192MiB, mode: devdax, filesystem: ext4}\n",
                 "g.yaml:7:60: pmem[0].namespaces[0].filesystem: devdax is a character device (/dev/daxN.M) and takes "
                 "no filesystem, not ext4; remove filesystem, or use mode: fsdax for a DAX filesystem",
                 id="devdax_fs"),
    pytest.param("    namespaces:\n      - {name: fs, size: 192MiB, align: 4KiB}\n",
                 "g.yaml:7:41: pmem[0].namespaces[0].align: is for mode: devdax only (nvmprov makes fsdax with the "
                 "kernel's alignment); remove align, or set mode: devdax", id="align_fsdax"),
    pytest.param("    namespaces:\n      - {name: fs, size: 192MiB, filesystem: xfs}\n",
                 "g.yaml:7:46: pmem[0].namespaces[0].filesystem: xfs needs at least 300MiB but a 192MiB fsdax "
                 "namespace leaves 197132288 bytes usable; use size >= 320MiB or filesystem: ext4", id="xfs_small"),
    pytest.param("    namespaces:\n      - {name: fs, size: 192MiB, filesystem: none, mount: /mnt/x}\n",
                 "g.yaml:7:59: pmem[0].namespaces[0].mount: a namespace without a filesystem cannot be mounted; "
                 "remove mount or set filesystem: ext4", id="mount_without_fs"),
    pytest.param("    namespaces: []\n",
                 "g.yaml:6:17: pmem[0].namespaces: give 1 to 8 namespaces, not 0", id="empty"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_validate_refuses_with_the_fix(text: str, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        spec.loads(B + text, "g.yaml")
    assert str(info.value) == expected


@pytest.mark.parametrize(("region", "expected"), [
    ("  - name: pm\n    size: 512MiB\n    namespaces:\n      - {name: fs, size: 192MiB}\n",
     "add label: 128KiB"),
    ("  - name: pm\n    size: 512MiB\n    model: virtio-pmem\n    namespaces:\n      - {name: fs, size: 192MiB}\n",
     "use model: nvdimm with label: 128KiB"),
    ("  - name: pm\n    size: 512MiB\n    label: 128KiB\n    readonly: true\n    namespaces:\n"
     "      - {name: fs, size: 192MiB}\n", "remove readonly"),
])
def test_only_a_labelled_writable_nvdimm_splits(region: str, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        spec.loads("name: demo\npmem:\n" + region, "g.yaml")
    assert "only a labelled, writable nvdimm can be split into namespaces" in str(info.value)
    assert str(info.value).endswith(expected)


def test_the_fixes_are_accepted() -> None:
    guest_of(B + "    namespaces:\n      - {name: fs, size: 208MiB}\n")
    guest_of(B.replace("512MiB", "514MiB") + "    namespaces:\n      - {name: fs, size: 192MiB}\n"
             "      - {name: db, size: 320MiB, mode: devdax}\n")
    guest_of(B + "    namespaces:\n      - {name: fs, size: 320MiB, filesystem: xfs}\n")


def test_namespace_mounts_are_unique_in_the_guest() -> None:
    text = SPLIT + "  - name: other\n    size: 64MiB\n    mount: /mnt/pm-fs\n"
    with pytest.raises(SpecError, match=r"pmem\[1\]\.mount: '/mnt/pm-fs' is used twice \(also "
                                        r"pmem\[0\]\.namespaces\[0\]\)"):
        spec.loads(text, "g.yaml")


def test_a_namespace_mount_in_the_login_home_is_refused() -> None:
    text = B + "    namespaces:\n      - {name: fs, size: 192MiB, mount: /home/nvmprov/pm}\n"
    with pytest.raises(SpecError, match=r"namespaces\[0\]\.mount: '/home/nvmprov/pm' is the login user's home"):
        spec.loads(text, "g.yaml")


def test_fleet_defaults_and_a_split_region() -> None:
    text = ("defaults:\n  memory: 1GiB\nguests:\n  - name: a\n    pmem:\n      - name: pm\n        size: 512MiB\n"
            "        label: 128KiB\n        namespaces:\n          - {name: fs, size: 192MiB}\n")
    (g,) = spec.loads(text, "f.yaml").guests
    assert [u.name for u in plan.build(g, TCG_HOST).units] == ["pm.fs"]


# --------------------------------------------------------------------------------------------
# the agent on a simulated guest kernel (tests/unit/test_agent_steps.FakeGuest)


def _split_guest(text: str = SPLIT) -> tuple[FakeGuest, plan.Plan]:
    p = plan.build(guest_of(text), TCG_HOST)
    g = FakeGuest()
    (r,) = p.regions
    g.add_nvdimm(0, r.backing_bytes, label=r.label_bytes)  # a blank labelled region, as a new guest shows it
    return g, p


def test_apply_makes_each_namespace_once_and_a_second_run_changes_nothing() -> None:
    g, p = _split_guest()
    states = {s.name: s for s in apply(g, p)}  # type: ignore[arg-type]
    namespace_commands = [c for c in g.commands if c.startswith("ndctl")]
    assert namespace_commands == [
        "ndctl disable-region region0", "ndctl init-labels -f nmem0", "ndctl enable-region region0",
        "ndctl create-namespace -r region0 -s 201326592 -n fs -m fsdax",
        "ndctl create-namespace -r region0 -s 318767104 -n db -m devdax -a 2097152",
    ]
    fs, db = states["pm.fs"], states["pm.db"]
    assert (fs.namespace, fs.guest_device, fs.mountpoint, fs.mount_dax) == ("namespace0.0", "/dev/pmem0", "/mnt/pm-fs",
                                                                            True)
    assert fs.usable_bytes == 197132288 and fs.fs_uuid == steps.fs_uuid(p.region("pm.fs"))
    assert (db.namespace, db.guest_device, db.namespace_mode, db.mountpoint) == ("namespace0.1", "/dev/dax0.1",
                                                                               "devdax", None)
    assert db.tail_offset == db.usable_bytes == 312475648 - sizes.RESERVED_TAIL_BYTES
    assert "# nvmprov: region pm.fs" in g.fstab
    g.commands.clear()
    again = apply(g, p)  # type: ignore[arg-type]
    assert g.commands == [] and [s.namespace for s in again] == ["namespace0.0", "namespace0.1"]


def test_each_filesystem_of_a_split_region_gets_its_own_uuid() -> None:
    text = B + "    namespaces:\n      - {name: a, size: 240MiB}\n      - {name: b, size: 256MiB}\n"
    g, p = _split_guest(text)
    states = apply(g, p)  # type: ignore[arg-type]
    uuids = [s.fs_uuid for s in states]
    assert None not in uuids and len(set(uuids)) == 2
    assert [s.guest_device for s in states] == ["/dev/pmem0", "/dev/pmem0.1"]
    assert uuids[0] != steps.fs_uuid(p.regions[0])  # not the region's own (volume-derived) UUID either


def test_after_a_power_cut_both_namespaces_come_back_with_mounts_only() -> None:
    g, p = _split_guest()
    apply(g, p)  # type: ignore[arg-type]
    g.power_cycle(boot_modules=frozenset({"libnvdimm", "nfit", "nd_pmem", "dax_pmem", "device_dax"}))
    g.commands.clear()
    check = recheck(g, p)  # type: ignore[arg-type]
    assert check.lost == {} and set(check.states) == {"pm.fs", "pm.db"}
    assert check.states["pm.db"].guest_device == "/dev/dax0.1"
    assert not any(c.startswith(("ndctl", "mkfs")) for c in g.commands), g.commands


def test_a_namespace_missing_after_the_power_cut_is_lost_not_remade() -> None:
    g, p = _split_guest()
    apply(g, p)  # type: ignore[arg-type]
    g.power_cycle(boot_modules=frozenset({"libnvdimm", "nfit", "nd_pmem", "dax_pmem", "device_dax"}))
    region = g.regions["region0"]
    region.namespaces = [ns for ns in region.namespaces if ns.name != "db"]
    g.commands.clear()
    check = recheck(g, p)  # type: ignore[arg-type]
    assert list(check.lost) == ["pm.db"] and "not persisted" in check.lost["pm.db"]
    assert "ndctl create-namespace -r region0 -s 318767104 -n db" in check.lost["pm.db"]
    assert "pm.fs" in check.states and not any(c.startswith("ndctl") for c in g.commands)


def test_a_namespace_of_another_mode_is_not_reconfigured_without_reformat() -> None:
    g, p = _split_guest()
    apply(g, p)  # type: ignore[arg-type]
    db = next(ns for ns in g.regions["region0"].namespaces if ns.name == "db")
    db.mode, db.chardev, db.blockdev = "fsdax", None, "pmem0.1"
    with pytest.raises(GuestError, match=r"region pm\.db: namespace0\.1 \('db' in region0\) is already a fsdax "
                                         r"namespace, not devdax \(align 2097152\); pass --reformat"):
        apply(g, p)  # type: ignore[arg-type]


def test_an_unnamed_namespace_nvmprov_did_not_make_is_refused() -> None:
    g, p = _split_guest()
    r = g.regions["region0"]
    r.labels_initialised = True
    r.namespaces = [FakeNs("namespace0.0", "fsdax", 100 * MiB, "pmem0", "00000000-0000-4000-8000-00000000beef")]
    with pytest.raises(GuestError, match=r"region0 holds namespace0\.0 \(fsdax, no name\), which nvmprov did not "
                                         r"make for this split and will not destroy"):
        apply(g, p)  # type: ignore[arg-type]
    assert not any(c.startswith("ndctl") for c in g.commands)


def test_the_report_names_the_region_and_the_namespace() -> None:
    g, p = _split_guest()
    states = apply(g, p)  # type: ignore[arg-type]
    reports = {r.name: r for r in verify_reports(p, states)}
    fs, db = reports["pm.fs"], reports["pm.db"]
    assert (fs.region, fs.namespace, fs.size_bytes) == ("pm", "fs", 192 * MiB)
    assert (db.region, db.namespace, db.size_bytes, db.namespace_mode) == ("pm", "db", 304 * MiB, "devdax")


def verify_reports(p: plan.Plan, states: list[RegionState]) -> list[RegionReport]:
    """The reports as verify() starts them, before the guest's probes (pure)."""
    by_name = {s.name: s for s in states}
    return [_prepare(p.name, u, by_name[u.name])[0] for u in p.units]


# `ndctl list --regions --namespaces --dimms --idle` on the measured guest: a split region (abridged)
REAL_SPLIT_NDCTL = """{"dimms":[{"dev":"nmem0","id":"8680-56341200","handle":1,"phys_id":0}],
"regions":[{"dev":"region0","size":534773760,"align":16777216,"available_size":0,"max_available_extent":0,
"type":"pmem","iset_id":10248187106440278,"mappings":[{"dimm":"nmem0","offset":0,"length":534773760,"position":0}],
"persistence_domain":"unknown","namespaces":[
{"dev":"namespace0.2","mode":"raw","size":0,"uuid":"00000000-0000-0000-0000-000000000000","sector_size":512,
 "state":"disabled"},
{"dev":"namespace0.1","mode":"devdax","map":"dev","size":312475648,"uuid":"a5e26598-de1a-4af3-b098-cdf9aa30642d",
 "chardev":"dax0.1","align":2097152,"name":"dd"},
{"dev":"namespace0.0","mode":"fsdax","map":"dev","size":197132288,"uuid":"1e72d114-f67b-4ad7-bf6e-4e6cc7d615d9",
 "sector_size":512,"align":2097152,"blockdev":"pmem0","name":"fs"}]}]}"""
# ... and `ndctl create-namespace` / `ndctl list -N` nest a devdax namespace's device under daxregion
REAL_DEVDAX_NAMESPACE = """{"dev":"namespace0.1","mode":"devdax","map":"dev","size":312475648,
"uuid":"a5e26598-de1a-4af3-b098-cdf9aa30642d","daxregion":{"id":0,"size":312475648,"align":2097152,
"devices":[{"chardev":"dax0.1","size":312475648,"target_node":0,"align":2097152,"mode":"devdax"}]},
"align":2097152,"name":"dd"}"""


def test_real_ndctl_output_names_each_namespace_and_its_device() -> None:
    (region,) = parse_ndctl_list(REAL_SPLIT_NDCTL).regions
    by_name = {ns.name: ns for ns in region.namespaces if ns.active}
    assert (by_name["fs"].dev, by_name["fs"].blockdev, by_name["fs"].chardev) == ("namespace0.0", "pmem0", None)
    assert (by_name["dd"].dev, by_name["dd"].blockdev, by_name["dd"].chardev) == ("namespace0.1", None, "dax0.1")
    (nested,) = parse_ndctl_list(REAL_DEVDAX_NAMESPACE).namespaces
    assert (nested.name, nested.chardev) == ("dd", "dax0.1")
