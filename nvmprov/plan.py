"""Spec + HostFacts -> Plan: every derived number of one guest, computed without side effects.

The dataclasses below are the contract between the pure core and the side-effect modules
(storage, virt, agent). `build()` fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Model = Literal["nvdimm", "virtio-pmem"]
Filesystem = Literal["ext4", "xfs", "none"]
Accel = Literal["kvm", "tcg"]
Boot = Literal["direct", "bios", "efi"]


@dataclass(frozen=True)
class HostFacts:
    """What the hypervisor offers. Read by host.facts(conn); tests build it by hand."""

    libvirt_version: int = 9_000_000          # libvirt's integer form: major*1e6 + minor*1e3 + micro
    qemu_version: int = 7_002_000
    arch: str = "x86_64"
    kvm_domain_type: bool = False              # libvirt offers <domain type='kvm'>
    cpu_virt_extensions: bool = False          # host CPU has vmx or svm
    pool_dir: str = "/var/lib/nvmprov/pool"    # where the pool's volumes live (path of the dir pool)
    virtio_pmem_in_config: bool = False        # can a domain *start* with virtio-pmem in its config?

    @property
    def kvm_usable(self) -> bool:
        return self.kvm_domain_type and self.cpu_virt_extensions


@dataclass(frozen=True)
class RegionPlan:
    name: str
    model: Model
    size_bytes: int               # what the user asked for
    backing_bytes: int            # size of the backing volume (>= size_bytes, rounded as QEMU needs)
    label_bytes: int | None       # nvdimm label area, None for label-less / virtio-pmem
    readonly: bool
    host_pmem: bool
    allocation: Literal["full", "sparse"]
    filesystem: Filesystem
    mount: str | None
    volume: str                   # backing volume name in the pool, e.g. "demo-pmem-data.raw"
    alias: str                    # libvirt user alias, "ua-pmem-data"
    dimm_slot: int | None         # nvdimm: <address type='dimm' slot=N/>; NFIT handle in guest = slot + 1
    pci_slot: int | None          # virtio-pmem: slot on pcie.0 (bus 0), the guest finds it at 0000:00:SS.0
    expected_usable_bytes: int    # best estimate of what the guest can use (fsdax namespace / pmem dev)
    notes: tuple[str, ...] = ()   # e.g. "size rounded up from ... to ..."


@dataclass(frozen=True)
class Plan:
    name: str
    spec_digest: str              # sha256 hex of the canonical guest spec
    connect: str
    pool: str
    machine: str                  # "q35"
    accel: Accel
    accel_notice: str | None      # one-line notice when auto chose tcg
    cpu_model: str                # "host-passthrough" for kvm, a TCG-safe named model for tcg
    vcpus: int
    memory_bytes: int
    max_memory_bytes: int         # RAM + all regions + hotplug headroom
    memory_slots: int             # regions + hotplug slots
    numa_cells: int
    boot: Boot
    image: str                    # "builtin" or absolute path of a user image
    disk_bytes: int
    overlay_volume: str           # "demo-root.qcow2"
    seed_volume: str              # "demo-seed.iso"
    kernel_volume: str | None     # direct boot only: volume names of the built-in image's kernel/initrd
    initrd_volume: str | None
    base_volume: str | None       # the base image volume the overlay sits on (builtin image)
    kernel_cmdline: str | None
    mac: str                      # deterministic per name, locally administered 52:54:00:...
    network_mode: Literal["user", "network"]
    network_outbound: bool
    network_name: str | None
    ssh_user: str
    boot_timeout_s: int
    ssh_timeout_s: int
    regions: tuple[RegionPlan, ...] = field(default_factory=tuple)

    @property
    def nvdimm_regions(self) -> tuple[RegionPlan, ...]:
        return tuple(r for r in self.regions if r.model == "nvdimm")

    @property
    def virtio_pmem_regions(self) -> tuple[RegionPlan, ...]:
        return tuple(r for r in self.regions if r.model == "virtio-pmem")

    def region(self, name: str) -> RegionPlan:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)
