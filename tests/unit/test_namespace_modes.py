"""Namespace modes (issue 17), the pure half: spec rules, plan numbers, the canonical spec.

Every bad combination is refused at validate with FILE:LINE:COL and the fix; the usable sizes are
the ones measured on a guest here (Debian 12 kernel 6.1, ndctl 76, QEMU 7.2).
"""

from __future__ import annotations

import pytest

from nvmprov import domain, plan, sizes, spec
from nvmprov.errors import SpecError

from .test_domain import CTX

MiB, GiB = 1024**2, 1024**3
TCG_HOST = plan.HostFacts(kvm_domain_type=True, cpu_virt_extensions=False)
B = "name: demo\npmem:\n  - name: data\n    size: 512MiB\n"   # a valid guest to extend (region keys at col 5)


def region_of(text: str) -> spec.RegionSpec:
    return spec.loads(B + text, "g.yaml").guests[0].pmem[0]


def plan_of(text: str) -> plan.RegionPlan:
    return plan.build(spec.loads(B + text, "g.yaml").guests[0], TCG_HOST).regions[0]


BAD = [
    pytest.param("    mode: devdax\n    filesystem: ext4\n",
                 "g.yaml:6:17: pmem[0].filesystem: devdax is a character device (/dev/daxN.M) and takes no "
                 "filesystem, not ext4; remove filesystem, or use mode: fsdax for a DAX filesystem",
                 id="devdax_with_filesystem"),
    pytest.param("    mode: devdax\n    mount: /mnt/x\n",
                 "g.yaml:6:12: pmem[0].mount: a region without a filesystem cannot be mounted; remove mount or use "
                 "mode: fsdax",
                 id="devdax_with_mount"),
    pytest.param("    readonly: true\n    filesystem: none\n    mode: fsdax\n",
                 "g.yaml:7:11: pmem[0].mode: a readonly region cannot be made fsdax (creating the namespace writes "
                 "its info block); use mode: raw (or remove mode), or readonly: false",
                 id="readonly_fsdax"),
    pytest.param("    readonly: true\n    mode: devdax\n",
                 "g.yaml:6:11: pmem[0].mode: a readonly region cannot be made devdax (creating the namespace writes "
                 "its info block); use mode: raw (or remove mode), or readonly: false",
                 id="readonly_devdax"),
    pytest.param("    readonly: true\n    filesystem: none\n    mode: sector\n",
                 "g.yaml:7:11: pmem[0].mode: a readonly region cannot be made sector (creating the namespace writes "
                 "its info block); use mode: raw (or remove mode), or readonly: false",
                 id="readonly_sector"),
    pytest.param("    mode: devdax\n    align: 1GiB\n",
                 "g.yaml:6:12: pmem[0].align: 1GiB needs 1GiB pages (pdpe1gb), which the guest CPU nvmprov "
                 "uses under TCG (Nehalem) does not offer, and a region of more than 1GiB; use align: 2MiB or 4KiB",
                 id="align_1g"),
    pytest.param("    mode: devdax\n    align: 64KiB\n",
                 "g.yaml:6:12: pmem[0].align: 64KiB is not one a devdax namespace takes; use 2MiB (the "
                 "default) or 4KiB",
                 id="align_odd"),
    pytest.param("    mode: sector\n    align: 2MiB\n",
                 "g.yaml:6:12: pmem[0].align: is for mode: devdax only (nvmprov makes sector with the "
                 "kernel's alignment); remove align, or set mode: devdax",
                 id="align_on_sector"),
    pytest.param("    align: 4KiB\n",
                 "g.yaml:5:12: pmem[0].align: is for mode: devdax only (nvmprov makes fsdax with the "
                 "kernel's alignment); remove align, or set mode: devdax",
                 id="align_on_fsdax"),
    pytest.param("    model: virtio-pmem\n    mode: fsdax\n",
                 "g.yaml:6:11: pmem[0].mode: is for nvdimm only: virtio-pmem has no namespaces to choose from "
                 "(the guest sees one pmem device: DAX, but no MAP_SYNC); remove it or use model: nvdimm",
                 id="mode_on_virtio"),
    pytest.param("    model: virtio-pmem\n    align: 2MiB\n",
                 "g.yaml:6:12: pmem[0].align: is for nvdimm only: virtio-pmem has no namespaces to choose "
                 "from (the guest sees one pmem device: DAX, but no MAP_SYNC); remove it or use model: nvdimm",
                 id="align_on_virtio"),
    pytest.param("    mode: dax\n",
                 "g.yaml:5:11: pmem[0].mode: 'dax' is not allowed; use 'fsdax', 'devdax', 'sector' or 'raw'",
                 id="unknown_mode"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_combinations_are_refused_at_validate(text: str, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        spec.loads(B + text, "g.yaml")
    assert str(info.value) == expected


@pytest.mark.parametrize(("text", "mode", "align", "filesystem", "mount"), [
    ("", "fsdax", None, "ext4", "/mnt/data"),
    ("    mode: fsdax\n", "fsdax", None, "ext4", "/mnt/data"),
    ("    mode: devdax\n", "devdax", 2 * MiB, "none", None),          # devdax: no filesystem by default
    ("    mode: devdax\n    align: 4KiB\n", "devdax", 4096, "none", None),
    ("    mode: devdax\n    filesystem: none\n", "devdax", 2 * MiB, "none", None),
    ("    mode: sector\n", "sector", None, "ext4", "/mnt/data"),
    ("    mode: sector\n    filesystem: xfs\n", "sector", None, "xfs", "/mnt/data"),
    ("    mode: raw\n    filesystem: none\n", "raw", None, "none", None),
    ("    readonly: true\n    filesystem: none\n", "raw", None, "none", None),   # readonly stays raw
    ("    readonly: true\n    filesystem: none\n    mode: raw\n", "raw", None, "none", None),
])
def test_modes_that_validate_and_their_defaults(text: str, mode: str, align: int | None, filesystem: str,
                                                mount: str | None) -> None:
    r = region_of(text)
    assert (r.namespace_mode, r.devdax_align_bytes, r.filesystem, r.mount) == (mode, align, filesystem, mount)
    p = plan_of(text)
    assert (p.effective_mode, p.align_bytes, p.filesystem) == (mode, align, filesystem)


def test_virtio_pmem_has_no_mode() -> None:
    p = plan_of("    model: virtio-pmem\n")
    assert (p.mode, p.effective_mode, p.dax_mount, p.reserved_tail) == (None, None, True, False)


def test_canonical_spec_and_digest_unchanged_for_specs_written_before_modes() -> None:
    """mode and align at their default are left out, so a guest made before issue 17 is not 'changed'."""
    plain = spec.loads(B, "g.yaml").guests[0]
    explicit = spec.loads(B + "    mode: fsdax\n", "g.yaml").guests[0]
    assert "mode" not in plain.canonical()["pmem"][0] and "align" not in plain.canonical()["pmem"][0]
    assert plain.digest() == explicit.digest()
    dd = spec.loads(B + "    mode: devdax\n    align: 2MiB\n", "g.yaml").guests[0]
    assert dd.canonical()["pmem"][0]["mode"] == "devdax" and "align" not in dd.canonical()["pmem"][0]
    four_k = spec.loads(B + "    mode: devdax\n    align: 4KiB\n", "g.yaml").guests[0]
    assert plain.diff(four_k) == ["pmem[0].align", "pmem[0].filesystem", "pmem[0].mode", "pmem[0].mount"]
    # the recorded spec of such a guest loads as it was
    recorded, warnings = spec.load_recorded(plain.canonical())
    assert recorded.digest() == plain.digest() and warnings == []


# --- sizes, as measured -------------------------------------------------------------------------------


def test_measured_usable_bytes_per_mode() -> None:
    # measured: a label-less 128MiB region as devdax (align 2MiB) -> /dev/dax of 130023424 bytes,
    # as sector -> /dev/pmemNs of 133005312 bytes (ndctl's 4096-byte sectors), as raw -> all of it
    assert sizes.expected_usable_bytes("nvdimm", 128 * MiB, None, mode="devdax") == 130023424
    assert sizes.expected_usable_bytes("nvdimm", 128 * MiB, None, mode="sector") == 133005312
    assert sizes.btt_usable_bytes(128 * MiB) == 133005312
    assert sizes.expected_usable_bytes("nvdimm", 128 * MiB, None, mode="raw") == 128 * MiB
    # the reserved tail comes off what is usable
    assert sizes.expected_usable_bytes("nvdimm", 128 * MiB, None, mode="devdax", tail=True) == 130023424 - 2 * MiB
    assert sizes.expected_usable_bytes("nvdimm", 64 * MiB, None, mode="raw", tail=True) == 62 * MiB


@pytest.mark.parametrize(("model", "mode", "filesystem", "readonly", "tail"), [
    ("nvdimm", "devdax", "none", False, True),
    ("nvdimm", "raw", "none", False, True),
    ("nvdimm", "sector", "none", False, True),
    ("nvdimm", "raw", "ext4", False, False),     # a filesystem holds a payload file instead
    ("nvdimm", "sector", "ext4", False, False),
    ("nvdimm", "fsdax", "none", False, False),   # handed over unwritten, as before
    ("nvdimm", "raw", "none", True, False),      # read-only: never written
    ("virtio-pmem", None, "none", False, False),
])
def test_which_regions_reserve_a_tail(model: str, mode: str | None, filesystem: str, readonly: bool,
                                      tail: bool) -> None:
    assert sizes.reserves_tail(model, mode, filesystem, readonly) is tail


def test_plan_of_a_devdax_region_notes_the_reserved_tail() -> None:
    p = plan_of("    mode: devdax\n")
    assert p.reserved_tail and p.expected_usable_bytes == sizes.fsdax_usable_bytes(512 * MiB) - 2 * MiB
    assert any("reserved" in n and "do not write there" in n for n in p.notes)
    assert not p.dax_mount


def test_xfs_minimum_counts_the_btt_overhead() -> None:
    # 300MiB of BTT leaves less than mkfs.xfs's 300MiB; the hint names a size that is enough
    with pytest.raises(SpecError) as info:
        spec.loads("name: demo\npmem:\n  - name: data\n    size: 300MiB\n    mode: sector\n    filesystem: xfs\n",
                   "g.yaml")
    fix = str(info.value).split("use size >= ")[1].split(" ")[0]
    assert spec.loads(f"name: demo\npmem:\n  - name: data\n    size: {fix}\n    mode: sector\n    filesystem: xfs\n",
                      "g.yaml")


def test_metadata_keeps_mode_align_and_tail_and_reads_old_metadata_as_fsdax() -> None:
    g = spec.loads("name: demo\npmem:\n  - {name: a, size: 128MiB, mode: devdax, align: 4KiB}\n"
                   "  - {name: b, size: 128MiB}\n  - {name: c, size: 64MiB, readonly: true, filesystem: none}\n",
                   "g.yaml").guests[0]
    p = plan.build(g, TCG_HOST)
    md = domain.Metadata.from_plan(p, ssh_port=1)
    xml = domain.metadata_xml(md)
    assert 'mode="devdax"' in xml and 'align_bytes="4096"' in xml and 'reserved_tail="true"' in xml
    assert xml.count("mode=") == 1  # defaults (fsdax, raw when readonly) are left out, as before issue 17
    back = domain.parse_metadata(domain.render(p, CTX, metadata=md))
    assert back is not None and back.regions == p.regions
