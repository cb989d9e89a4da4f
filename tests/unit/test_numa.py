"""NUMA placement (issue 19, part 1): numa_nodes and numa_node through spec, plan and domain XML."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import pytest

from nvmprov import domain, plan, spec
from nvmprov.errors import SpecError

MiB, GiB = 1024**2, 1024**3
FACTS = plan.HostFacts()
CTX = domain.RenderContext(uuid=str(uuid.UUID(int=19)), ssh_port=2222, pool_dir="/pool")


def guest(text: str) -> spec.GuestSpec:
    return spec.loads("name: demo\n" + text, "g.yaml").guests[0]


def refusal(text: str) -> str:
    with pytest.raises(SpecError) as info:
        spec.loads("name: demo\n" + text, "g.yaml")
    return str(info.value)


def cells(p: plan.Plan) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(c.id, c.memory_bytes, c.cpus) for c in p.numa]


# ---------------------------------------------------------------------------------------------
# the rule


@pytest.mark.parametrize(
    ("memory", "vcpus", "nodes", "expected"),
    [
        (GiB, 1, 1, [(0, GiB, (0,))]),
        (GiB, 1, 2, [(0, 512 * MiB, (0,)), (1, 512 * MiB, ())]),          # node 1: memory only
        (GiB, 2, 2, [(0, 512 * MiB, (0,)), (1, 512 * MiB, (1,))]),
        (GiB, 3, 2, [(0, 512 * MiB, (0, 1)), (1, 512 * MiB, (2,))]),      # the first nodes get the extra
        (1536 * MiB, 2, 3, [(0, 512 * MiB, (0,)), (1, 512 * MiB, (1,)), (2, 512 * MiB, ())]),
        (GiB, 5, 4, [(0, 256 * MiB, (0, 1)), (1, 256 * MiB, (2,)), (2, 256 * MiB, (3,)), (3, 256 * MiB, (4,))]),
    ],
)
def test_layout_rule(memory: int, vcpus: int, nodes: int, expected: list[tuple[int, int, tuple[int, ...]]]) -> None:
    assert [(c.id, c.memory_bytes, c.cpus) for c in plan.numa_layout(memory, vcpus, nodes)] == expected
    assert sum(len(c.cpus) for c in plan.numa_layout(memory, vcpus, nodes)) == vcpus


def test_defaults_are_one_node_and_node_zero() -> None:
    g = guest("pmem: [{name: data, size: 256MiB}]\n")
    assert g.numa_nodes == 1 and g.pmem[0].numa_node == 0
    p = plan.build(g, FACTS)
    assert cells(p) == [(0, GiB, (0,))] and p.numa_cells == 1 and p.region("data").numa_node == 0


def test_the_keys_at_their_defaults_leave_the_digest_as_it_was() -> None:
    # guests made before issue 19 keep their recorded digest (and so are not "changed")
    plain = guest("pmem: [{name: data, size: 256MiB}]\n")
    spelled = guest("numa_nodes: 1\npmem: [{name: data, size: 256MiB, numa_node: 0}]\n")
    assert plain.digest() == spelled.digest()
    assert "numa_nodes" not in plain.canonical() and "numa_node" not in plain.canonical()["pmem"][0]
    moved = guest("numa_nodes: 2\npmem: [{name: data, size: 256MiB, numa_node: 1}]\n")
    assert moved.canonical()["numa_nodes"] == 2 and moved.canonical()["pmem"][0]["numa_node"] == 1
    assert moved.digest() != plain.digest()
    assert spec.GuestSpec.model_validate(moved.canonical()) == moved   # the recorded spec round-trips


def test_plan_carries_the_cells_and_each_regions_node() -> None:
    p = plan.build(guest("numa_nodes: 2\npmem: [{name: a, size: 256MiB}, {name: b, size: 256MiB, numa_node: 1}]\n"),
                   FACTS)
    assert cells(p) == [(0, 512 * MiB, (0,)), (1, 512 * MiB, ())] and p.numa_cells == 2
    assert (p.region("a").numa_node, p.region("b").numa_node) == (0, 1)
    assert p.memory_bytes == GiB   # the cells add up to the RAM


# ---------------------------------------------------------------------------------------------
# what validate refuses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("numa_nodes: 3\npmem: [{name: d, size: 256MiB}]\n",
         "g.yaml:2:13: numa_nodes: 3 nodes cannot share memory 1GiB: each node takes an equal share in whole 2MiB "
         "blocks and at least 128MiB; use memory: 1026MiB or fewer numa_nodes"),
        ("memory: 256MiB\nnuma_nodes: 4\npmem: [{name: d, size: 256MiB}]\n",
         "g.yaml:3:13: numa_nodes: 4 nodes cannot share memory 256MiB: each node takes an equal share in whole "
         "2MiB blocks and at least 128MiB; use memory: 512MiB or fewer numa_nodes"),
        ("numa_nodes: 0\npmem: [{name: d, size: 256MiB}]\n",
         "g.yaml:2:13: numa_nodes: 0 is too small; use at least 1"),
        ("numa_nodes: 9\npmem: [{name: d, size: 256MiB}]\n",
         "g.yaml:2:13: numa_nodes: 9 is too large; use at most 8"),
        ("pmem: [{name: d, size: 256MiB, numa_node: 1}]\n",
         "g.yaml:2:43: pmem[0].numa_node: 1 does not exist: the guest has numa_nodes: 1 (nodes 0..0); "
         "use numa_node: 0 or numa_nodes: 2"),
        ("numa_nodes: 2\npmem: [{name: d, size: 256MiB, model: virtio-pmem, numa_node: 1}]\n",
         "g.yaml:3:63: pmem[0].numa_node: only an nvdimm takes a NUMA node: libvirt 9.0 refuses a NUMA node on "
         "virtio-pmem ('virtio-pmem does not support NUMA nodes'; QEMU 7.2's virtio-pmem-pci has none); remove "
         "numa_node or use model: nvdimm"),
    ],
    ids=["uneven", "too-small-shares", "zero", "too-many", "no-such-node", "virtio-pmem"],
)
def test_validate_refuses_what_the_rule_cannot_place(text: str, expected: str) -> None:
    assert refusal(text) == expected


def test_the_suggested_memory_is_accepted() -> None:
    assert guest("memory: 1026MiB\nnuma_nodes: 3\npmem: [{name: d, size: 256MiB}]\n").numa_nodes == 3
    assert guest("memory: 512MiB\nnuma_nodes: 4\npmem: [{name: d, size: 256MiB}]\n").numa_nodes == 4


def test_fleet_defaults_set_numa_nodes() -> None:
    sf = spec.loads("defaults: {numa_nodes: 2}\nguests:\n  - {name: a, pmem: [{name: d, size: 256MiB, numa_node: 1}]}\n"
                    "  - {name: b, numa_nodes: 1, pmem: [{name: d, size: 256MiB}]}\n", "f.yaml")
    assert [(g.name, g.numa_nodes, g.pmem[0].numa_node) for g in sf.guests] == [("a", 2, 1), ("b", 1, 0)]
    with pytest.raises(SpecError) as info:
        spec.loads("defaults: {numa_nodes: 2}\nguests:\n  - {name: a, pmem: [{name: d, size: 256MiB}]}\n"
                   "  - {name: b, numa_nodes: 1, pmem: [{name: d, size: 256MiB, numa_node: 1}]}\n", "f.yaml")
    assert str(info.value).startswith("f.yaml:4:72: guests[1].pmem[0].numa_node: 1 does not exist")


# ---------------------------------------------------------------------------------------------
# the XML


def test_cells_and_target_nodes_in_the_xml() -> None:
    p = plan.build(guest("vcpus: 3\nnuma_nodes: 2\npmem: [{name: a, size: 256MiB}, "
                         "{name: b, size: 256MiB, numa_node: 1}]\n"), FACTS)
    root = ET.fromstring(domain.render(p, CTX))  # noqa: S314
    got = [c.attrib for c in root.iterfind("cpu/numa/cell")]
    assert got == [{"id": "0", "cpus": "0-1", "memory": str(512 * 1024), "unit": "KiB"},
                   {"id": "1", "cpus": "2-2", "memory": str(512 * 1024), "unit": "KiB"}]
    nodes = {m.find("alias").get("name"): m.findtext("target/node") for m in root.iterfind("devices/memory")}
    assert nodes == {"ua-pmem-a": "0", "ua-pmem-b": "1"}


def test_a_memory_only_node_is_a_cell_without_cpus() -> None:
    p = plan.build(guest("numa_nodes: 2\npmem: [{name: b, size: 256MiB, numa_node: 1}]\n"), FACTS)
    root = ET.fromstring(domain.render(p, CTX))  # noqa: S314
    assert [c.get("cpus") for c in root.iterfind("cpu/numa/cell")] == ["0-0", None]
    assert 'node' not in domain.region_device_xml(plan.build(guest(
        "pmem: [{name: v, size: 256MiB, model: virtio-pmem}]\n"), FACTS).region("v"), "/pool")


def test_the_node_round_trips_through_the_metadata() -> None:
    p = plan.build(guest("numa_nodes: 2\npmem: [{name: a, size: 256MiB}, {name: b, size: 256MiB, numa_node: 1}]\n"),
                   FACTS)
    xml = domain.render(p, CTX)
    md = domain.parse_metadata(xml)
    assert md is not None and [r.numa_node for r in md.regions] == [0, 1]
    assert md.regions == p.regions
    # node 0 is not written: the metadata of every earlier guest stays as it was
    assert xml.count('numa_node="1"') == 1 and 'numa_node="0"' not in xml
