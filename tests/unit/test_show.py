"""show: the memory map from libvirt XML and from the guest's own /proc/iomem + nd sysfs (pure)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nvmprov import domain, plan, show, spec
from nvmprov.agent.facts import GuestFacts, guest_facts
from nvmprov.sizes import GiB, MiB

FACTS = plan.HostFacts(builtin_volumes=("base.qcow2", "vmlinuz", "initrd.img"))
CTX = domain.RenderContext(uuid="6f1d9c62-7d2a-4a4b-9a3e-0000000000aa", ssh_port=2222, pool_dir="/p")
GUEST = spec.loads("""\
name: g
pmem:
  - {name: nv, size: 256MiB}
  - {name: vp, size: 128MiB, model: virtio-pmem}
""").guests[0]
PLAN = plan.build(GUEST, FACTS)
MD = domain.Metadata.from_plan(PLAN, ssh_port=2222)

NFIT = "/sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus0"
VIRTIO = "/sys/devices/pci0000:00/0000:00:10.0/0000:01:00.0/virtio3/ndbus1"


def facts(ram: list[str], *regions: tuple[str, str, int, str, str | None, str | None]) -> GuestFacts:
    """The agent's facts as read in a guest here (as root: the nd region resource is root-only), trimmed:
    each region (dev, resource, size, sysfs dir, nmem or None, target_node or None) with pmemN under it."""
    raw: dict[str, Any] = {"system_ram": ram, "regions": {}, "nmems": {}, "blockdevs": {}}
    for dev, start, size, where, nmem, node in regions:
        n = dev.removeprefix("region")
        raw["regions"][dev] = {"path": f"{where}/{dev}", "resource": start, "size": str(size), "target_node": node,
                               "mappings": [f"{nmem},0,{size},0"] if nmem else []}
        if nmem:
            raw["nmems"][nmem] = {"handle": hex(int(nmem.removeprefix("nmem")) + 1)}
        raw["blockdevs"][f"pmem{n}"] = {"path": f"{where}/{dev}/namespace{n}.0/block/pmem{n}", "size_sectors": "1"}
    return guest_facts(raw)


PROBE = facts(
    ["00001000-0009fbff", "00100000-3ffdbfff"],
    ("region0", "0x140000000", 268435456, NFIT, "nmem0", None),
    ("region1", "0x108000000", 134217728, VIRTIO, None, None),
)


def test_probe_of_the_agents_facts() -> None:
    p = show.probe_of(PROBE)
    assert p.ram == ((0x1000, 0x9FBFF), (0x100000, 0x3FFDBFFF))
    nv, vp = p.regions
    assert (nv.start, nv.size_bytes, nv.nfit_handle, nv.blockdevs) == (0x140000000, 256 * MiB, 1, ("pmem0",))
    assert vp.nfit_handle is None and vp.pci_slot() == 0x10


def test_map_from_libvirt_then_guest() -> None:
    config = domain.render(PLAN, CTX, metadata=MD)
    live = domain.render(PLAN, replace(CTX, include_virtio_pmem=True), metadata=MD)
    mm = show.build_map(live, config, running=True, md=MD)
    by = {v.name: v for v in mm.regions}
    assert by["nv"].where == "live+config" and by["vp"].where == "live"
    assert by["nv"].usable_bytes == PLAN.region("nv").expected_usable_bytes
    assert mm.ram_bytes == 1 * GiB and mm.slots == 6 and mm.free_slots == 4
    assert mm.headroom_bytes == 8 * GiB and mm.free_root_ports == 4
    show.merge_probe(mm, show.probe_of(PROBE), MD)
    assert (by["nv"].guest_start, by["nv"].guest_end) == (0x140000000, 0x140000000 + 256 * MiB - 1)
    assert by["vp"].guest_device == "/dev/pmem1" and by["vp"].guest_region == "region1"
    text = show.render_text(mm)
    assert "0x00140000000-0x0014fffffff" in text and "4 of 6 memory slots free" in text
    assert "addresses from: guest" in text


def test_stopped_guest_lists_virtio_pmem_as_recorded() -> None:
    config = domain.render(PLAN, CTX, metadata=MD)
    mm = show.build_map(config, config, running=False, md=MD)
    assert {v.name: v.where for v in mm.regions} == {"nv": "config", "vp": "recorded"}


NUMA = spec.loads("""\
name: n
vcpus: 1
numa_nodes: 2
pmem:
  - {name: near, size: 256MiB}
  - {name: far, size: 256MiB, numa_node: 1}
  - {name: vp, size: 128MiB, model: virtio-pmem}
""").guests[0]
NUMA_PLAN = plan.build(NUMA, FACTS)
NUMA_MD = domain.Metadata.from_plan(NUMA_PLAN, ssh_port=2222)
NUMA_PROBE = facts(
    ["00001000-0009fbff"],
    ("region0", "0x140000000", 268435456, NFIT, "nmem0", "0"),
    ("region1", "0x150000000", 268435456, NFIT, "nmem1", "1"),
    ("region2", "0x108000000", 134217728, VIRTIO, None, "-1"),
)


def test_topology_nodes_their_ram_cpus_and_regions() -> None:
    config = domain.render(NUMA_PLAN, CTX, metadata=NUMA_MD)
    live = domain.render(NUMA_PLAN, replace(CTX, include_virtio_pmem=True), metadata=NUMA_MD)
    mm = show.build_map(live, config, running=True, md=NUMA_MD)
    assert [(n.id, n.memory_bytes, n.cpus, n.regions) for n in mm.nodes] == [
        (0, 512 * MiB, "0-0", ["near"]), (1, 512 * MiB, None, ["far"])]
    assert {v.name: v.numa_node for v in mm.regions} == {"near": 0, "far": 1, "vp": None}
    show.merge_probe(mm, show.probe_of(NUMA_PROBE), NUMA_MD)
    assert {v.name: v.target_node for v in mm.regions} == {"near": 0, "far": 1, "vp": -1}
    lines = show.render_text(mm).splitlines()
    assert "  NUMA node 0     512 MiB  vCPUs 0-0               regions: near (guest: node 0)" in lines
    assert "  NUMA node 1     512 MiB  no vCPUs (memory only)  regions: far (guest: node 1)" in lines
    assert "  no NUMA node (virtio-pmem has none in libvirt): vp (guest: node -1)" in lines
    assert mm.to_dict()["nodes"][1] == {"id": 1, "memory_bytes": 512 * MiB, "cpus": None, "regions": ["far"]}


def test_a_region_without_its_physical_start_is_left_out() -> None:
    """resource is root-only: without it the region cannot be placed on the map."""
    unreadable = facts([], ("region0", None, 268435456, NFIT, "nmem0", None))  # type: ignore[arg-type]
    assert show.probe_of(unreadable).regions == ()


def test_a_probe_without_target_node_still_parses() -> None:
    assert [r.target_node for r in show.probe_of(PROBE).regions] == [None, None]


def test_an_nvdimm_without_a_node_element_is_on_node_0() -> None:
    config = domain.render(NUMA_PLAN, CTX, metadata=NUMA_MD).replace("<node>0</node>", "")
    mm = show.build_map(config, config, running=False, md=None)
    assert [(n.id, n.regions) for n in mm.nodes] == [(0, ["near"]), (1, ["far"])]
