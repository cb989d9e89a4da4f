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
from nvmprov.errors import SpecError

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
