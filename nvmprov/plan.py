"""Spec + HostFacts -> Plan: every derived number of one guest, computed without side effects.

The dataclasses below are the contract between the pure core and the side-effect modules
(storage, virt, agent). `build()` fills them in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from .errors import HostError
from .naming import backing_volume
from .sizes import (
    DIMM_ALIGN_BYTES,
    RESERVED_TAIL_BYTES,
    backing_bytes_for,
    expected_usable_bytes,
    format_size,
    labelled_available_bytes,
    namespace_usable_bytes,
    reserves_tail,
    round_up,
)

if TYPE_CHECKING:  # spec imports this module's neighbours; only the type is needed here
    from .spec import GuestSpec, NamespaceSpec, RegionSpec

Model = Literal["nvdimm", "virtio-pmem", "cxl"]
Mode = Literal["fsdax", "devdax", "sector", "raw"]
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
    # (base, kernel, initrd) volume names of the built-in image; the caller fills them from
    # nvmprov.image.builtin_volume_names(). None: DEFAULT_BUILTIN_VOLUMES.
    builtin_volumes: tuple[str, str, str] | None = None
    # (uid, gid) QEMU runs as (libvirt's DAC base label); files named only on QEMU's command line
    # (CXL's) must be owned by it. None: not known (no DAC driver, or a test).
    qemu_ids: tuple[int, int] | None = None

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
    # virtio-pmem: slot on pcie.0 of the region's own pcie-root-port (pcie.0 itself refuses hotplug:
    # "Bus 'pcie.0' does not support hotplugging"); the device sits behind it at slot 0. The guest
    # finds it as the child of 0000:00:SS.0.
    pci_slot: int | None
    expected_usable_bytes: int    # best estimate of what the guest can use (fsdax namespace / pmem dev)
    notes: tuple[str, ...] = ()   # e.g. "size rounded up from ... to ..."
    pci_bus: int | None = None    # virtio-pmem: libvirt index of that root port (the <address bus=...>)
    # nvdimm: the namespace mode nvmprov makes (fsdax; raw when readonly); None for virtio-pmem,
    # which has no namespaces to choose from (the guest sees one raw pmem device, DAX capable).
    mode: Mode | None = None
    align_bytes: int | None = None  # devdax: the device's page size (ndctl --align)
    # nvmprov proves the region without a filesystem: payload and marker in a reserved tail
    # (sizes.RESERVED_TAIL_BYTES) of the device, written at create, only re-read after.
    reserved_tail: bool = False
    adopted: bool = False         # the spec named the volume (`volume:`): made elsewhere, never deleted unasked
    numa_node: int = 0            # guest NUMA node (nvdimm <target><node>); virtio-pmem: always 0
    # cxl: the label storage area's volume (the type-3 device's `lsa`) and the device serial (`sn`).
    # Without a serial the kernel's interleave-set cookie is 0 and a re-created region is refused
    # ("invalid interleave-set-cookie"); with one it comes back with its namespace (docs/performance.md).
    lsa_volume: str | None = None
    cxl_serial: int | None = None
    # A labelled nvdimm split into namespaces (issue 19): the device is this region, the agent works on
    # each namespace as a unit of its own (Plan.units). () : one namespace, made from the keys above.
    namespaces: tuple[NamespacePlan, ...] = ()
    # Set on a unit only (namespace_unit): the spec region it is a namespace of, its name and its size.
    namespace_of: str | None = None
    namespace_name: str | None = None
    namespace_bytes: int | None = None

    @property
    def effective_mode(self) -> Mode | None:
        """The namespace mode (a plan made without one: fsdax, raw when readonly); None for virtio-pmem."""
        if self.model == "virtio-pmem":
            return None
        return self.mode or ("raw" if self.readonly else "fsdax")

    @property
    def dax_mount(self) -> bool:
        """Is its filesystem mounted with -o dax? fsdax and virtio-pmem: yes; sector and raw: not DAX."""
        return self.model == "virtio-pmem" or self.effective_mode == "fsdax"


@dataclass(frozen=True)
class CxlRegion:
    """How the guest makes a CXL region (`cxl create-region`), again at every boot: no firmware
    programs the HDM decoders here, so the region is gone after each start (docs/performance.md)."""

    root_decoder: str             # the fixed memory window's decoder in the guest
    memdev_serial: int            # the type-3 device whose capacity it takes, by its serial (not mem0)
    ways: int
    granularity: int

    def command(self, memdev: str) -> tuple[str, tuple[str, ...]]:
        """The `cxl create-region` template and its arguments for MEMDEV (the guest's name of the device)."""
        return ("cxl create-region -d %s -t pmem -m %s -w %s -g %s",
                (self.root_decoder, memdev, str(self.ways), str(self.granularity)))


@dataclass(frozen=True)
class NamespacePlan:
    """One namespace of a split region: made with `ndctl create-namespace -r REGION -s SIZE -n NAME`."""

    name: str
    size_bytes: int               # the namespace (a multiple of the region's 16 MiB alignment)
    mode: Mode
    align_bytes: int | None       # devdax: the device's page size
    filesystem: Filesystem
    mount: str | None
    expected_usable_bytes: int
    reserved_tail: bool = False


UNIT_SEPARATOR = "."  # a unit of a split region is named REGION.NAMESPACE (region names have no dot)


def namespace_unit(region: RegionPlan, ns: NamespacePlan) -> RegionPlan:
    """The namespace NS of REGION as the agent, the report and the proof see it: the region's device
    (slot, sizes, label, volume, node) with the namespace's mode, filesystem and mount."""
    return replace(
        region,
        name=f"{region.name}{UNIT_SEPARATOR}{ns.name}",
        mode=ns.mode,
        align_bytes=ns.align_bytes,
        filesystem=ns.filesystem,
        mount=ns.mount,
        expected_usable_bytes=ns.expected_usable_bytes,
        reserved_tail=ns.reserved_tail,
        notes=(),
        namespaces=(),
        namespace_of=region.name,
        namespace_name=ns.name,
        namespace_bytes=ns.size_bytes,
    )


@dataclass(frozen=True)
class NumaCell:
    """One guest NUMA node: its share of the RAM and its vCPUs (none: a memory-only node)."""

    id: int
    memory_bytes: int
    cpus: tuple[int, ...]         # vCPU numbers, contiguous; () for a node with memory and no CPUs

    @property
    def cpuset(self) -> str | None:
        """libvirt's cpus='0-1' form (one vCPU: '0-0'); None for a memory-only node (a cell without cpus)."""
        return f"{self.cpus[0]}-{self.cpus[-1]}" if self.cpus else None


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
    numa_cells: int               # len(cells)
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
    # Empty pcie-root-ports after the virtio-pmem ones, so virtio-pmem can be hot-plugged later.
    spare_root_ports: int = 0
    # The guest NUMA nodes (numa_layout); () in plans built by hand: one cell with everything.
    cells: tuple[NumaCell, ...] = ()

    @property
    def numa(self) -> tuple[NumaCell, ...]:
        return self.cells or (NumaCell(0, self.memory_bytes, tuple(range(self.vcpus))),)

    @property
    def nvdimm_regions(self) -> tuple[RegionPlan, ...]:
        return tuple(r for r in self.regions if r.model == "nvdimm")

    @property
    def virtio_pmem_regions(self) -> tuple[RegionPlan, ...]:
        return tuple(r for r in self.regions if r.model == "virtio-pmem")

    @property
    def cxl_regions(self) -> tuple[RegionPlan, ...]:
        return tuple(r for r in self.regions if r.model == "cxl")

    @property
    def memory_device_regions(self) -> tuple[RegionPlan, ...]:
        """The regions libvirt sees as <memory> devices (a CXL region is QEMU command line only)."""
        return tuple(r for r in self.regions if r.model != "cxl")

    @property
    def cxl_window_bytes(self) -> int:
        """The fixed memory window (cxl-fmw.0.size): room for every CXL region, in 256 MiB units."""
        return round_up(sum(r.backing_bytes for r in self.cxl_regions), CXL_GRANULE_BYTES)

    @property
    def units(self) -> tuple[RegionPlan, ...]:
        """What the agent makes, verifies and reports on: each region, or each namespace of a split one."""
        return tuple(u for r in self.regions for u in (tuple(namespace_unit(r, ns) for ns in r.namespaces) or (r,)))

    def region(self, name: str) -> RegionPlan:
        """A region, or a unit of a split one (REGION.NAMESPACE), by name."""
        for r in (*self.regions, *self.units):
            if r.name == name:
                return r
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# build

MACHINE = "q35"
# Nehalem, not QEMU's default qemu64: it is the oldest named model with x86-64-v2 (SSE4.2, POPCNT),
# which RHEL 9-family cloud images require, and every feature of it is implemented by TCG
# (usable='yes' in `virsh domcapabilities --virttype qemu` here).
TCG_CPU_MODEL = "Nehalem"
KVM_CPU_MODEL = "host-passthrough"
DIRECT_KERNEL_CMDLINE = "root=/dev/vda console=ttyS0"
DEFAULT_BUILTIN_VOLUMES = ("nvmprov-debian12.qcow2", "nvmprov-debian12-vmlinuz", "nvmprov-debian12-initrd.img")
FIRST_PORT_PCI_SLOT = 0x10           # pcie.0 slots 0x10..0x1d: libvirt fills from 0x01, NIC at 0x1e,
LAST_PORT_PCI_SLOT = 0x1D            # ICH9 at 0x1f
NIC_PCI_SLOT = 0x1E
CXL_GRANULE_BYTES = 256 * 1024 * 1024   # CXL capacity and window units (spec.CXL_GRANULE_BYTES)
CXL_LSA_BYTES = 1024 * 1024             # the label storage area measured to work (QEMU wants one)
CXL_ROOT_DECODER = "decoder0.0"         # the guest's name of window 0 (cxl-fmw.0), measured
CXL_INTERLEAVE_GRANULARITY = 256        # the window's granularity in the guest, measured


def build(spec: GuestSpec, facts: HostFacts) -> Plan:
    """Every derived number of one guest. Raises HostError when the host cannot run it."""
    if facts.arch != "x86_64":
        raise HostError(f"nvmprov plans x86_64 guests with q35 and ACPI NVDIMMs; this host is {facts.arch}")
    accel, notice = choose_accel(spec.accel, facts, cxl=any(r.model == "cxl" for r in spec.pmem))
    regions = tuple(_regions(spec))
    boot = _boot(spec)
    base, kernel, initrd = facts.builtin_volumes or DEFAULT_BUILTIN_VOLUMES
    builtin = spec.image == "builtin"
    n_ports = sum(1 for r in regions if r.model == "virtio-pmem")
    cells = numa_layout(spec.memory_bytes, spec.vcpus, spec.numa_nodes)
    return Plan(
        name=spec.name,
        spec_digest=spec.digest(),
        connect=spec.connect,
        pool=spec.pool,
        machine=MACHINE,
        accel=accel,
        accel_notice=notice,
        cpu_model=KVM_CPU_MODEL if accel == "kvm" else TCG_CPU_MODEL,
        vcpus=spec.vcpus,
        memory_bytes=spec.memory_bytes,
        max_memory_bytes=max_memory_bytes(spec.memory_bytes, regions, spec.hotplug.headroom_bytes),
        memory_slots=sum(1 for r in regions if r.model != "cxl") + spec.hotplug.slots,
        numa_cells=len(cells),
        boot=boot,
        image=spec.image,
        disk_bytes=spec.disk_bytes,
        overlay_volume=f"{spec.name}-root.qcow2",
        seed_volume=f"{spec.name}-seed.iso",
        kernel_volume=kernel if boot == "direct" else None,
        initrd_volume=initrd if boot == "direct" else None,
        base_volume=base if builtin else None,
        kernel_cmdline=DIRECT_KERNEL_CMDLINE if boot == "direct" else None,
        mac=mac_for(spec.name),
        network_mode=spec.network.mode,
        network_outbound=spec.network.outbound,
        network_name=spec.network.name,
        ssh_user=spec.ssh.user,
        boot_timeout_s=spec.timeouts.boot_s,
        ssh_timeout_s=spec.timeouts.ssh_s,
        regions=regions,
        spare_root_ports=min(spec.hotplug.slots, LAST_PORT_PCI_SLOT - FIRST_PORT_PCI_SLOT + 1 - n_ports),
        cells=cells,
    )


def numa_layout(memory_bytes: int, vcpus: int, nodes: int) -> tuple[NumaCell, ...]:
    """The rule (docs/spec.md): the RAM in equal shares, one per node (spec validation makes sure it
    divides into whole 2MiB blocks); the vCPUs in contiguous blocks from node 0, the first
    `vcpus % nodes` nodes one more than the rest. With fewer vCPUs than nodes the last nodes get
    none: memory-only nodes, as a real machine's pmem node (vcpus: 1, numa_nodes: 2 -> node 0 has
    CPU 0, node 1 none)."""
    share, extra = divmod(vcpus, nodes)
    cells, first = [], 0
    for node in range(nodes):
        count = share + (1 if node < extra else 0)
        cells.append(NumaCell(node, memory_bytes // nodes, tuple(range(first, first + count))))
        first += count
    return tuple(cells)


def choose_accel(wanted: str, facts: HostFacts, *, cxl: bool = False) -> tuple[Accel, str | None]:
    if facts.kvm_usable and cxl and wanted == "auto":
        # spec validation refuses accel: kvm with a cxl region; auto keeps to what was measured
        return "tcg", "accel auto: using tcg because CXL under KVM is unmeasured here"
    if facts.kvm_usable:
        return ("tcg", None) if wanted == "tcg" else ("kvm", None)
    if not facts.kvm_domain_type:
        reason = "libvirt offers no kvm domain type on this host"
    else:
        reason = "the host CPU has no vmx/svm (a paravirtual /dev/kvm hangs guests in firmware)"
    if wanted == "kvm":
        raise HostError(f"accel: kvm cannot work here: {reason}; use accel: auto or tcg")
    if wanted == "tcg":
        return "tcg", None
    return "tcg", f"accel auto: using tcg (software emulation, slower) because {reason}"


def mac_for(name: str) -> str:
    """Stable per guest name, in QEMU's locally administered 52:54:00 range."""
    tail = hashlib.sha256(name.encode()).digest()[:3]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def max_memory_bytes(memory_bytes: int, regions: tuple[RegionPlan, ...], headroom_bytes: int) -> int:
    """RAM + every region's backing + hotplug headroom, in whole 2 MiB blocks (memory devices are
    placed in 2 MiB steps)."""
    devices = sum(r.backing_bytes for r in regions if r.model != "cxl")  # CXL memory sits in its window
    total = memory_bytes + devices + round_up(headroom_bytes, DIMM_ALIGN_BYTES)
    return round_up(total, DIMM_ALIGN_BYTES)


def _boot(spec: GuestSpec) -> Boot:
    if spec.firmware == "auto":
        return "direct" if spec.image == "builtin" else "bios"
    return spec.firmware


def _regions(spec: GuestSpec) -> list[RegionPlan]:
    result = []
    n_dimm = n_port = 0
    for r in spec.pmem:
        if r.model == "cxl":
            result.append(region_plan(spec.name, r))
        elif r.model == "nvdimm":
            result.append(region_plan(spec.name, r, dimm_slot=n_dimm))
            n_dimm += 1
        else:
            result.append(region_plan(spec.name, r, port=n_port))
            n_port += 1
    return result


def region_plan(guest: str, r: RegionSpec, *, dimm_slot: int | None = None, port: int | None = None) -> RegionPlan:
    """The plan of one region; `port` is the index among the guest's virtio-pmem regions."""
    backing = backing_bytes_for(r.size_bytes)
    label = label_bytes_for(r.label_bytes)
    mode = r.namespace_mode
    filesystem = r.filesystem or "ext4"
    tail = reserves_tail(r.model, mode, filesystem, r.readonly)
    usable = expected_usable_bytes(r.model, backing, label, readonly=r.readonly, mode=mode, tail=tail)
    namespaces = tuple(namespace_plan(ns) for ns in r.namespaces or ())
    if namespaces:  # what its namespaces give, together
        usable = sum(ns.expected_usable_bytes for ns in namespaces)
    return RegionPlan(
        name=r.name,
        model=r.model,
        size_bytes=r.size_bytes,
        backing_bytes=backing,
        label_bytes=label,
        readonly=r.readonly,
        host_pmem=r.host_pmem,
        allocation=r.allocation,
        filesystem=filesystem,
        mount=r.mount,
        volume=r.volume or backing_volume(guest, r.name),
        adopted=r.volume is not None,
        numa_node=r.numa_node,
        alias=f"ua-pmem-{r.name}",
        dimm_slot=dimm_slot if r.model == "nvdimm" else None,
        pci_slot=FIRST_PORT_PCI_SLOT + port if port is not None else None,
        pci_bus=port + 1 if port is not None else None,
        expected_usable_bytes=usable,
        notes=_notes(r, backing, label, usable, tail),
        mode=mode,  # type: ignore[arg-type]
        align_bytes=r.devdax_align_bytes,
        reserved_tail=tail,
        lsa_volume=lsa_volume(guest, r.name) if r.model == "cxl" else None,
        cxl_serial=cxl_serial(guest, r.name) if r.model == "cxl" else None,
        namespaces=namespaces,
    )


def namespace_plan(ns: NamespaceSpec) -> NamespacePlan:
    filesystem = ns.filesystem or "ext4"
    tail = reserves_tail("nvdimm", ns.mode, filesystem, readonly=False)
    usable = namespace_usable_bytes(ns.size_bytes, ns.mode)
    return NamespacePlan(
        name=ns.name,
        size_bytes=ns.size_bytes,
        mode=ns.mode,
        align_bytes=ns.devdax_align_bytes,
        filesystem=filesystem,
        mount=ns.mount,
        expected_usable_bytes=max(usable - RESERVED_TAIL_BYTES, 0) if tail else usable,
        reserved_tail=tail,
    )


def lsa_volume(guest: str, region: str) -> str:
    """The label storage area's volume of a CXL region: its backing's name with .lsa for .raw."""
    return backing_volume(guest, region).removesuffix(".raw") + ".lsa"


def cxl_serial(guest: str, region: str) -> int:
    """A stable, non-zero device serial for the region's cxl-type3 (QEMU's `sn`). Not UINT64_MAX,
    which QEMU takes as "no serial" (then the interleave-set cookie is 0 and a re-created region
    is refused): 63 bits of a hash of the guest and region names, never 0."""
    digest = hashlib.sha256(f"nvmprov-cxl/{guest}/{region}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) or 1


def cxl_region(region: RegionPlan) -> CxlRegion:
    """The recorded parameters the guest re-creates REGION (model cxl) with at every boot."""
    if region.cxl_serial is None:
        raise HostError(f"region {region.name}: a cxl region without a device serial in its plan")
    return CxlRegion(CXL_ROOT_DECODER, region.cxl_serial, 1, CXL_INTERLEAVE_GRANULARITY)


def label_bytes_for(asked: int | None) -> int | None:
    """The label area, rounded up to 2 MiB.

    QEMU maps size - label into the guest and places the next memory device right after it, so
    a label that is not a 2 MiB multiple leaves every later region (a hot-plugged virtio-pmem too)
    misaligned, and the guest kernel refuses it ("misaligned, unable to map"; measured here with
    128 KiB). A 2 MiB label gives the same usable bytes (the namespace is aligned to 16 MiB anyway).
    """
    return None if asked is None else round_up(asked, DIMM_ALIGN_BYTES)


def _notes(r: RegionSpec, backing: int, label: int | None, usable: int, tail: bool) -> tuple[str, ...]:
    notes = []
    if backing != r.size_bytes:
        notes.append(f"size {format_size(r.size_bytes)} rounded up to {format_size(backing)} "
                     "(memory devices come in whole 2MiB blocks)")
    if r.label_bytes and label != r.label_bytes:
        notes.append(f"label {format_size(r.label_bytes)} rounded up to {format_size(label or 0)} so the "
                     "regions after it stay 2MiB aligned (the guest refuses misaligned pmem)")
    if label and r.namespaces:
        available = labelled_available_bytes(backing, label)
        taken = sum(ns.size_bytes for ns in r.namespaces)
        notes.append(f"the {format_size(label)} label comes out of the region: {format_size(available)} for "
                     f"namespaces, {len(r.namespaces)} take {format_size(taken)}")
    elif label:
        notes.append(f"the {format_size(label)} label comes out of the region and the namespace is "
                     f"aligned down to 16MiB: about {usable} bytes usable")
    if tail:
        notes.append(f"the last {format_size(RESERVED_TAIL_BYTES)} of its {r.namespace_mode} device are reserved "
                     "for nvmprov's proof (payload and marker, written once at create); they are not in usable "
                     "bytes: do not write there")
    return tuple(notes)
