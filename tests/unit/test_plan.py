"""plan.build: every derived number, checked against what was measured on this machine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nvmprov import plan, sizes, spec
from nvmprov.errors import HostError

MiB, GiB = 1024**2, 1024**3
TCG_HOST = plan.HostFacts(kvm_domain_type=True, cpu_virt_extensions=False)   # paravirtual /dev/kvm, as here
KVM_HOST = plan.HostFacts(kvm_domain_type=True, cpu_virt_extensions=True)


def guest(text: str = "") -> spec.GuestSpec:
    return spec.loads("name: demo\n" + (text or "pmem: [{name: data, size: 1GiB}]\n")).guests[0]


def test_measured_usable_sizes() -> None:
    # 512 MiB nvdimm with a 128 KiB label: fsdax namespace of 511705088 bytes (measured here)
    assert sizes.expected_usable_bytes("nvdimm", 512 * MiB, 128 * 1024) == 511705088
    # label-less 1 GiB: 1054867456 bytes (measured here)
    assert sizes.expected_usable_bytes("nvdimm", GiB, None) == 1054867456
    assert sizes.expected_usable_bytes("virtio-pmem", 512 * MiB, None) == 512 * MiB
    assert sizes.expected_usable_bytes("nvdimm", 512 * MiB, None, readonly=True) == 512 * MiB


def test_region_sizes_round_up_to_2mib_and_say_so() -> None:
    p = plan.build(guest("pmem: [{name: odd, size: 100001KiB}]\n"), TCG_HOST)
    r = p.region("odd")
    assert r.size_bytes == 100001 * 1024
    assert r.backing_bytes == 98 * MiB and r.backing_bytes % (2 * MiB) == 0
    assert r.notes[0] == "size 100001KiB rounded up to 98MiB (memory devices come in whole 2MiB blocks)"
    assert plan.build(guest(), TCG_HOST).region("data").notes == ()


def test_labelled_region_note_gives_the_usable_estimate() -> None:
    p = plan.build(guest("pmem: [{name: l, size: 512MiB, label: 128KiB}]\n"), TCG_HOST)
    assert p.region("l").expected_usable_bytes == 511705088
    assert any("about 511705088 bytes usable" in n for n in p.region("l").notes)


def test_label_rounded_to_2mib_so_later_regions_stay_aligned() -> None:
    # QEMU places the next memory device right after size - label: a 128 KiB label put a
    # hot-plugged virtio-pmem at 0x13ffe0000 and the guest refused it (measured here).
    p = plan.build(guest("pmem: [{name: l, size: 512MiB, label: 128KiB}, {name: v, size: 256MiB, "
                         "model: virtio-pmem}]\n"), TCG_HOST)
    lab = p.region("l")
    assert lab.label_bytes == 2 * 1024 * 1024
    assert (lab.backing_bytes - lab.label_bytes) % (2 * 1024 * 1024) == 0
    assert any("label 128KiB rounded up to 2MiB" in n for n in lab.notes)
    exact = plan.build(guest("pmem: [{name: l, size: 512MiB, label: 4MiB}]\n"), TCG_HOST).region("l")
    assert exact.label_bytes == 4 * 1024 * 1024 and not any("rounded" in n for n in exact.notes)


def test_accel_auto_picks_tcg_here_with_a_notice() -> None:
    p = plan.build(guest(), TCG_HOST)
    assert (p.accel, p.cpu_model) == ("tcg", "Nehalem")
    assert p.accel_notice is not None and "vmx/svm" in p.accel_notice
    no_kvm = plan.build(guest(), plan.HostFacts(kvm_domain_type=False, cpu_virt_extensions=True))
    assert no_kvm.accel_notice is not None and "no kvm domain type" in no_kvm.accel_notice


def test_accel_auto_picks_kvm_when_usable() -> None:
    p = plan.build(guest(), KVM_HOST)
    assert (p.accel, p.cpu_model, p.accel_notice) == ("kvm", "host-passthrough", None)


def test_accel_kvm_where_it_cannot_work_fails_with_the_reason() -> None:
    with pytest.raises(HostError, match=r"accel: kvm cannot work here: the host CPU has no vmx/svm"):
        plan.build(guest("accel: kvm\npmem: [{name: d, size: 64MiB}]\n"), TCG_HOST)


def test_accel_tcg_is_honoured_even_with_kvm() -> None:
    p = plan.build(guest("accel: tcg\npmem: [{name: d, size: 64MiB}]\n"), KVM_HOST)
    assert (p.accel, p.accel_notice) == ("tcg", None)


def test_slots_and_max_memory() -> None:
    g = guest("memory: 1GiB\nhotplug: {slots: 3, headroom: 1GiB}\n"
              "pmem: [{name: a, size: 512MiB}, {name: b, size: 100MiB, model: virtio-pmem}]\n")
    p = plan.build(g, TCG_HOST)
    assert p.memory_slots == 2 + 3
    assert p.max_memory_bytes == GiB + 512 * MiB + 100 * MiB + GiB
    assert p.max_memory_bytes % (2 * MiB) == 0
    assert (p.numa_cells, p.machine) == (1, "q35")


def test_headroom_rounds_up_to_whole_blocks() -> None:
    p = plan.build(guest("hotplug: {headroom: 1MiB}\npmem: [{name: a, size: 64MiB}]\n"), TCG_HOST)
    assert p.max_memory_bytes == GiB + 64 * MiB + 2 * MiB


def test_slots_and_addresses_in_spec_order() -> None:
    g = guest("pmem:\n  - {name: a, size: 64MiB}\n  - {name: v1, size: 64MiB, model: virtio-pmem}\n"
              "  - {name: b, size: 64MiB}\n  - {name: v2, size: 64MiB, model: virtio-pmem}\n")
    p = plan.build(g, TCG_HOST)
    assert [(r.name, r.dimm_slot) for r in p.nvdimm_regions] == [("a", 0), ("b", 1)]
    assert [(r.name, r.pci_bus, r.pci_slot) for r in p.virtio_pmem_regions] == [("v1", 1, 0x10), ("v2", 2, 0x11)]
    assert all(r.pci_slot is None for r in p.nvdimm_regions)
    assert all(r.dimm_slot is None for r in p.virtio_pmem_regions)
    assert p.spare_root_ports == 4


def test_spare_ports_stay_inside_the_reserved_pci_range() -> None:
    regions = "".join(f"  - {{name: v{i}, size: 16MiB, model: virtio-pmem}}\n" for i in range(12))
    p = plan.build(guest("hotplug: {slots: 9}\npmem:\n" + regions), TCG_HOST)
    last = 0x10 + len(p.virtio_pmem_regions) + p.spare_root_ports - 1
    assert p.spare_root_ports == 2 and last == plan.LAST_PORT_PCI_SLOT < plan.NIC_PCI_SLOT


def test_names_of_volumes_aliases_and_mac() -> None:
    p = plan.build(guest(), TCG_HOST)
    assert (p.overlay_volume, p.seed_volume) == ("demo-root.qcow2", "demo-seed.iso")
    r = p.region("data")
    assert (r.volume, r.alias) == ("demo-pmem-data.raw", "ua-pmem-data")
    assert p.mac == plan.mac_for("demo") and p.mac.startswith("52:54:00:") and len(p.mac) == 17
    assert plan.mac_for("demo") != plan.mac_for("demo2")


def test_builtin_boots_direct_with_volumes_from_facts() -> None:
    facts = replace(TCG_HOST, builtin_volumes=("base.qcow2", "vmlinuz", "initrd.img"))
    p = plan.build(guest(), facts)
    assert (p.boot, p.base_volume) == ("direct", "base.qcow2")
    assert (p.kernel_volume, p.initrd_volume) == ("vmlinuz", "initrd.img")
    assert p.kernel_cmdline is not None and p.kernel_cmdline.startswith("root=/dev/vda console=ttyS0")


def test_user_image_boots_bios_without_kernel() -> None:
    p = plan.build(guest("image: /img/debian.qcow2\npmem: [{name: d, size: 64MiB}]\n"), TCG_HOST)
    assert (p.boot, p.base_volume, p.kernel_volume, p.kernel_cmdline) == ("bios", None, None, None)
    efi = plan.build(guest("image: /img/x.qcow2\nfirmware: efi\npmem: [{name: d, size: 64MiB}]\n"), TCG_HOST)
    assert efi.boot == "efi"


def test_plan_carries_the_spec() -> None:
    g = guest("vcpus: 2\nssh: {user: ci}\nnetwork: {outbound: true}\ntimeouts: {boot_s: 60, ssh_s: 30}\n"
              "pmem: [{name: d, size: 64MiB, allocation: sparse}]\n")
    p = plan.build(g, TCG_HOST)
    assert (p.vcpus, p.ssh_user, p.network_outbound, p.boot_timeout_s, p.ssh_timeout_s) == (2, "ci", True, 60, 30)
    assert p.spec_digest == g.digest() and p.region("d").allocation == "sparse"


def test_non_x86_host_is_refused() -> None:
    with pytest.raises(HostError, match="x86_64"):
        plan.build(guest(), replace(TCG_HOST, arch="aarch64"))
