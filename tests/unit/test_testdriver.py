"""Every example's XML defines and starts on libvirt's in-process test:///default driver."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import libvirt
import pytest

from nvmprov import domain, plan, spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FACTS = plan.HostFacts(kvm_domain_type=True, builtin_volumes=("base.qcow2", "vmlinuz", "initrd.img"))
GUESTS = [g for p in sorted(EXAMPLES.glob("*.yaml")) for g in spec.load(p).guests]


@pytest.fixture
def conn() -> libvirt.virConnect:
    c = libvirt.open("test:///default")
    yield c
    c.close()


def _xml(g: spec.GuestSpec, include_virtio_pmem: bool) -> str:
    ctx = domain.RenderContext(uuid=str(uuid.uuid4()), ssh_port=2222, pool_dir="/var/lib/nvmprov/pool",
                               console_log=f"/tmp/{g.name}.log", include_virtio_pmem=include_virtio_pmem)
    return domain.render(plan.build(g, FACTS), ctx)


@pytest.mark.parametrize("include_virtio_pmem", [False, True], ids=["defined", "with-virtio-pmem"])
@pytest.mark.parametrize("g", GUESTS, ids=[g.name for g in GUESTS])
def test_defines_and_starts(conn: libvirt.virConnect, g: spec.GuestSpec, include_virtio_pmem: bool) -> None:
    dom = conn.defineXML(_xml(g, include_virtio_pmem))
    try:
        dom.create()
        assert dom.isActive() == 1
        live = dom.XMLDesc(0)
        md = domain.parse_metadata(live)
        assert md is not None and md.spec_digest == g.digest()     # the metadata survives libvirt
        n_mem = live.count("<memory model=")
        devices = [r for r in g.pmem if r.model != "cxl"]  # a CXL region is on QEMU's command line only
        expected = len(devices) if include_virtio_pmem else sum(r.model == "nvdimm" for r in g.pmem)
        assert n_mem == expected
        dom.destroy()
    finally:
        dom.undefine()
    assert g.name not in conn.listDefinedDomains()


def test_the_driver_rejects_what_it_should(conn: libvirt.virConnect) -> None:
    # proves the check above has teeth: without the NUMA cell, or with maxMemory below RAM plus
    # regions, libvirt refuses the definition (much else it lets through: see test_domain.py)
    xml = _xml(GUESTS[0], False)
    no_numa = re.sub(r"<numa>.*?</numa>", "", xml, flags=re.S)
    small_max = re.sub(r'(<maxMemory slots="\d+" unit="KiB">)\d+', r"\g<1>1048576", xml)
    assert no_numa != xml and small_max != xml
    for bad in (no_numa, small_max):
        with pytest.raises(libvirt.libvirtError):
            conn.defineXML(bad)


def test_set_metadata_round_trips_through_libvirt(conn: libvirt.virConnect) -> None:
    """What the workflow records as volumes are made comes back identical from libvirt."""
    g = GUESTS[0]
    dom = conn.defineXML(_xml(g, False))
    try:
        md = domain.parse_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert md is not None
        md = md.with_volume(f"{g.name}-root.qcow2", "overlay")
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domain.metadata_xml(md), domain.METADATA_PREFIX,
                        domain.METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        assert domain.parse_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == md
    finally:
        dom.undefine()
