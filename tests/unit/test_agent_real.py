"""The agent's parsers and steps on outputs captured from real Debian 12 guests (QEMU 7.2, TCG).

Captured with the guest programs themselves (see fixtures/agent/README.md): two 512 MiB nvdimms
(slot 0 label-less, slot 1 labelled) and a 256 MiB virtio-pmem hot-plugged behind the
pcie-root-port in slot 0x10.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmprov.agent import describe, steps
from nvmprov.agent.facts import GuestFacts, locate, parse_guest_facts
from nvmprov.agent.verify import parse_probe
from nvmprov.errors import GuestError

from .test_agent_steps import region

FIXTURES = Path(__file__).parent / "fixtures" / "agent"
MiB = 1024 * 1024
KiB = 1024


def real(name: str) -> GuestFacts:
    return parse_guest_facts((FIXTURES / name).read_text())


PLAIN = region("plain", slot=0, mount="/mnt/plain")
LABELLED_128K = region("labelled", slot=1, label=128 * KiB, fs="xfs", mount="/mnt/labelled")
LABELLED_2M = region("labelled", slot=1, label=2 * MiB, fs="xfs", mount="/mnt/labelled")
VIRT = region("virt", model="virtio-pmem", pci=0x10, size=256 * MiB, mount="/mnt/virt")


def test_fresh_guest_facts() -> None:
    facts = real("real-facts-fresh.json")
    assert {"nfit", "nd_pmem"} <= facts.modules and facts.ndctl_error is None
    assert {n: d.handle for n, d in facts.dimms.items()} == {"nmem0": 1, "nmem1": 2}  # sysfs says "0x1"
    # ndctl lists region1 first; mapping goes by handle, not by order
    assert locate(facts, PLAIN).dev == "region0"
    labelled = locate(facts, LABELLED_128K)
    assert labelled.dev == "region1" and labelled.size_bytes == 512 * MiB - 128 * KiB
    ns = labelled.active_namespace
    assert ns is not None and (ns.mode, ns.blockdev, ns.uuid) == ("raw", "pmem1", None)
    assert facts.blockdevs["pmem1"].fs is None and not facts.blockdevs["pmem1"].dax
    assert facts.blockdevs["pmem0"].size_bytes == 512 * MiB


def test_fresh_guest_first_commands() -> None:
    facts = real("real-facts-fresh.json")
    first = [c.render() for c in steps.plan_commands(facts, PLAIN, reformat=False)]
    assert first == ["ndctl create-namespace -f -e namespace0.0 -m fsdax"]
    labelled = [c.render() for c in steps.plan_commands(facts, LABELLED_128K, reformat=False)]
    assert labelled == [
        "ndctl disable-region region1",
        "ndctl init-labels -f nmem1",
        "ndctl enable-region region1",
        "ndctl create-namespace -r region1 -m fsdax",
    ]


@pytest.mark.parametrize(
    ("fixture", "regions"),
    [
        ("real-facts-nvdimms-ready.json", (PLAIN, LABELLED_128K)),
        ("real-facts-all-ready.json", (PLAIN, LABELLED_2M, VIRT)),
    ],
)
def test_finished_guest_needs_nothing(fixture: str, regions: tuple) -> None:
    facts = real(fixture)
    for r in regions:
        assert steps.plan_commands(facts, r, reformat=False) == []
    assert steps.fstab_command(facts, regions) is None


def test_finished_guest_states() -> None:
    facts = real("real-facts-all-ready.json")
    plain, labelled, virt = (describe(facts, r) for r in (PLAIN, LABELLED_2M, VIRT))
    assert (plain.namespace_mode, plain.guest_device, plain.usable_bytes) == ("fsdax", "/dev/pmem0", 526385152)
    assert (labelled.filesystem, labelled.usable_bytes, labelled.mount_dax) == ("xfs", 511705088, True)
    # virtio-pmem: ndctl calls its label-less namespace "fsdax" with "map": "mem"
    assert (virt.guest_region, virt.namespace_mode, virt.guest_device) == ("region2", "fsdax", "/dev/pmem2")
    assert virt.usable_bytes == 256 * MiB and virt.mount_dax and virt.device_dax


def test_misaligned_virtio_pmem_explains_itself() -> None:
    facts = real("real-facts-virtio-misaligned.json")
    assert locate(facts, VIRT).dev == "region2"
    with pytest.raises(GuestError) as e:
        steps.plan_commands(facts, VIRT, reformat=False)
    message = str(e.value)
    assert "namespace2.0 disabled" in message
    assert "misaligned, unable to map" in message and "2 MiB" in message


@pytest.mark.parametrize(
    "name", ["real-probe-mnt-plain.json", "real-probe-mnt-labelled.json", "real-probe-mnt-virt.json"]
)
def test_real_dax_probe(name: str) -> None:
    probe = parse_probe((FIXTURES / name).read_text())
    assert probe.statx_dax and not probe.statx_dax_root
    assert (probe.pages_dax, probe.pages_root) == (0, 9)
    assert probe.xip_ok
