"""Read-only look at the hypervisor: versions, acceleration that really works, where the pool lives."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from .plan import HostFacts

if TYPE_CHECKING:
    import libvirt

# libvirt + QEMU that can start a domain with virtio-pmem in its persistent config. Measured: 9.0 + 7.2
# fails ("virtio-pmem memory device info is not handled yet"); the fix came in later libvirt.
VIRTIO_PMEM_CONFIG_MIN_LIBVIRT = 9_005_000


def kvm_facts(capabilities_xml: str, arch: str = "x86_64") -> tuple[bool, bool]:
    """(libvirt offers kvm for arch, host CPU has vmx/svm), from `virsh capabilities` XML.

    /dev/kvm can exist without nested virtualisation (a paravirtual KVM): libvirt then offers
    the kvm domain type, but a normal guest hangs in firmware. The CPU flags tell the truth.
    """
    root = ET.fromstring(capabilities_xml)  # noqa: S314 - libvirt's own output
    features = {f.get("name") for f in root.findall("./host/cpu/feature")}
    has_ext = bool(features & {"vmx", "svm"})
    offers_kvm = False
    for guest in root.findall("./guest"):
        arch_el = guest.find("arch")
        if arch_el is None or arch_el.get("name") != arch:
            continue
        if any(d.get("type") == "kvm" for d in arch_el.findall("domain")):
            offers_kvm = True
    return offers_kvm, has_ext


def qemu_ids(capabilities_xml: str) -> tuple[int, int] | None:
    """(uid, gid) of QEMU's processes: the DAC security model's base label ('+64055:+64055')."""
    root = ET.fromstring(capabilities_xml)  # noqa: S314 - libvirt's own output
    for model in root.findall("./host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.findall("baselabel"):
            uid, _, gid = (label.text or "").partition(":")
            if uid.lstrip("+").isdigit() and gid.lstrip("+").isdigit():
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
    return None


def security_models(capabilities_xml: str) -> list[str]:
    """libvirt's security drivers for QEMU ('none', 'dac', 'apparmor', 'selinux')."""
    root = ET.fromstring(capabilities_xml)  # noqa: S314 - libvirt's own output
    return [m.findtext("model") or "" for m in root.findall("./host/secmodel")]


def facts(conn: libvirt.virConnect, pool_dir: str) -> HostFacts:
    caps = conn.getCapabilities()
    arch_el = ET.fromstring(caps).find("./host/cpu/arch")  # noqa: S314 - libvirt's own XML
    arch = arch_el.text if arch_el is not None and arch_el.text else "x86_64"
    offers_kvm, has_ext = kvm_facts(caps, arch)
    libvirt_version = conn.getLibVersion()
    return HostFacts(
        libvirt_version=libvirt_version,
        qemu_version=conn.getVersion(),
        arch=arch,
        kvm_domain_type=offers_kvm,
        cpu_virt_extensions=has_ext,
        pool_dir=pool_dir,
        virtio_pmem_in_config=libvirt_version >= VIRTIO_PMEM_CONFIG_MIN_LIBVIRT,
        qemu_ids=qemu_ids(caps),
    )
