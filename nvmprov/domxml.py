"""What an existing libvirt domain's XML says about memory hotplug (pure parsing, no libvirt).

Shared by attach/detach/show/doctor: any domain, nvmprov's or not. Rules measured on libvirt 9.0 +
QEMU 7.2: every <memory> device (nvdimm and virtio-pmem alike) takes one of maxMemory's slots and
its size counts against maxMemory; virtio-pmem needs a hot-pluggable PCIe root port (pcie.0 itself
refuses hotplug).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: S405  (libvirt's own XML)
from dataclasses import dataclass

from .sizes import KiB

_UNITS = {
    "b": 1, "bytes": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": KiB**2, "mib": KiB**2, "mb": 1000**2,
    "g": KiB**3, "gib": KiB**3, "gb": 1000**3, "t": KiB**4, "tib": KiB**4, "tb": 1000**4,
}


@dataclass(frozen=True)
class MemDevice:
    model: str                  # "nvdimm", "virtio-pmem", "dimm", ...
    alias: str | None           # "ua-pmem-data" (user alias) or libvirt's "nvdimm0"
    size_bytes: int             # <target><size>, label included
    label_bytes: int | None
    path: str | None            # backing file
    dimm_slot: int | None       # <address type='dimm' slot=N>
    base: int | None            # <address ... base='0x...'> guest physical address, live XML only
    pci_bus: int | None         # <address type='pci' bus=N>
    shared: bool                # access='shared'
    node: int | None = None     # <target><node>: the guest NUMA node (None: not given)


@dataclass(frozen=True)
class Cell:
    """One <cpu><numa><cell>: a guest NUMA node."""

    id: int
    memory_bytes: int
    cpus: str | None            # libvirt's cpuset ('0-1', '0,2'); None: a node with memory and no CPUs


@dataclass(frozen=True)
class RootPort:
    index: int                  # the controller index: devices behind it use <address bus=index>
    slot: int | None            # its own slot on pcie.0
    alias: str | None
    hotplug: bool               # <target hotplug='off'/> turns hotplug off


@dataclass(frozen=True)
class DomainFacts:
    name: str
    machine: str                # "pc-q35-7.2", "pc-i440fx-7.2", ...
    ram_bytes: int              # boot RAM (NUMA cells, else <memory> minus the memory devices)
    max_memory_bytes: int       # 0: no <maxMemory>
    slots: int
    numa_cells: int
    acpi: bool
    devices: tuple[MemDevice, ...]
    root_ports: tuple[RootPort, ...]
    used_buses: frozenset[int]  # PCI buses some device sits on
    cells: tuple[Cell, ...] = ()

    @property
    def q35(self) -> bool:
        return "q35" in self.machine

    @property
    def free_slots(self) -> int:
        return max(self.slots - len(self.devices), 0)

    @property
    def device_bytes(self) -> int:
        return sum(d.size_bytes for d in self.devices)

    @property
    def headroom_bytes(self) -> int:
        """What maxMemory still admits beyond RAM and the memory devices."""
        return max(self.max_memory_bytes - self.ram_bytes - self.device_bytes, 0) if self.max_memory_bytes else 0

    @property
    def has_nvdimm(self) -> bool:
        return any(d.model == "nvdimm" for d in self.devices)

    @property
    def free_root_ports(self) -> tuple[RootPort, ...]:
        return tuple(p for p in self.root_ports if p.hotplug and p.index not in self.used_buses)

    def free_dimm_slot(self) -> int | None:
        used = {d.dimm_slot for d in self.devices if d.dimm_slot is not None}
        return next((s for s in range(self.slots) if s not in used), None)

    def cell(self, node: int) -> Cell | None:
        return next((c for c in self.cells if c.id == node), None)

    def device(self, alias: str) -> MemDevice | None:
        return next((d for d in self.devices if d.alias == alias), None)


def _size(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        return 0
    return int(el.text.strip()) * _UNITS[el.get("unit", "KiB").lower()]  # type: ignore[union-attr]


def _int(text: str | None) -> int | None:
    return None if text is None else int(text, 0)


def _mem_device(el: ET.Element) -> MemDevice:
    addr = el.find("address")
    alias = el.find("alias")
    label = el.find("target/label/size")
    path = el.findtext("source/path")
    return MemDevice(
        model=el.get("model", ""),
        alias=alias.get("name") if alias is not None else None,
        size_bytes=_size(el.find("target/size")),
        label_bytes=_size(label) if label is not None else None,
        path=path.strip() if path else None,
        dimm_slot=_int(addr.get("slot")) if addr is not None and addr.get("type") == "dimm" else None,
        base=_int(addr.get("base")) if addr is not None else None,
        pci_bus=_int(addr.get("bus")) if addr is not None and addr.get("type") == "pci" else None,
        shared=el.get("access") == "shared",
        node=_int(el.findtext("target/node")),
    )


def _cell(el: ET.Element, index: int) -> Cell:
    return Cell(id=_int(el.get("id")) if el.get("id") is not None else index,  # type: ignore[arg-type]
                memory_bytes=int(el.get("memory", "0")) * _UNITS[el.get("unit", "KiB").lower()],
                cpus=el.get("cpus") or None)


def _root_port(el: ET.Element) -> RootPort:
    addr = el.find("address")
    alias = el.find("alias")
    target = el.find("target")
    return RootPort(
        index=int(el.get("index", "0")),
        slot=_int(addr.get("slot")) if addr is not None else None,
        alias=alias.get("name") if alias is not None else None,
        hotplug=target is None or target.get("hotplug", "on") != "off",
    )


def parse(domain_xml: str) -> DomainFacts:
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own output
    devices = tuple(_mem_device(m) for m in root.findall("./devices/memory"))
    cells = root.findall("./cpu/numa/cell")
    cell_bytes = sum(int(c.get("memory", "0")) * _UNITS[c.get("unit", "KiB").lower()] for c in cells)
    total = _size(root.find("memory"))
    max_el = root.find("maxMemory")
    used_buses = {
        int(a.get("bus", "0"), 0)
        for a in root.findall("./devices/*/address")
        if a.get("type") == "pci"
    }
    ports = tuple(_root_port(c) for c in root.findall("./devices/controller")
                  if c.get("type") == "pci" and c.get("model") == "pcie-root-port")
    type_el = root.find("./os/type")
    return DomainFacts(
        name=root.findtext("name", ""),
        machine=type_el.get("machine", "") if type_el is not None else "",
        ram_bytes=cell_bytes or max(total - sum(d.size_bytes for d in devices), 0),
        max_memory_bytes=_size(max_el),
        slots=int(max_el.get("slots", "0")) if max_el is not None else 0,
        numa_cells=len(cells),
        acpi=root.find("./features/acpi") is not None,
        devices=devices,
        root_ports=ports,
        used_buses=frozenset(used_buses),
        cells=tuple(_cell(c, i) for i, c in enumerate(cells)),
    )
