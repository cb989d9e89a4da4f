"""The libvirt domain XML model (pure): built from a Plan as an ElementTree in a fixed element order
(render, region_device_xml, metadata_xml), and read back from any domain's XML (parse: the memory
hotplug facts; parse_metadata: nvmprov's record; references: what it uses on the host; device_xml).
Domain XML is parsed nowhere else.

QEMU rules this module keeps (measured on libvirt 9.0 + QEMU 7.2, see docs and tests):
access='shared' on every pmem device, <acpi/> + <maxMemory slots> + a NUMA cell for memory
devices, <pmem/> only on real host pmem, user networking through <qemu:commandline> bound to
127.0.0.1 with restrict=on, the NIC pinned at pcie.0 slot 0x1e.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import xml.etree.ElementTree as ET  # noqa: S405  (we build and parse our own/libvirt's XML)
from dataclasses import dataclass, replace

from . import __version__
from .errors import HostError
from .plan import CXL_LSA_BYTES, NIC_PCI_SLOT, Plan, RegionPlan
from .sizes import KiB, MiB

METADATA_NS = "https://nvmprov.dev/xmlns/domain/1"
METADATA_PREFIX = "nvmprov"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace(METADATA_PREFIX, METADATA_NS)

VOLUME_KINDS = ("overlay", "seed", "backing", "label")   # label: a CXL device's label storage area
SSH_FORWARD_HOST = "127.0.0.1"  # each guest's SSH forward listens on the hypervisor's loopback only
DISK_PCI_SLOT = 0x0F     # the root disk, an integrated endpoint on pcie.0 below the root ports
RNG_PCI_SLOT = 0x0E      # the virtio RNG, beside it
NVDIMM_MMAP_ALIGN_BYTES = 2 * MiB   # see _region_element; backing sizes are 2 MiB multiples


@dataclass(frozen=True)
class RenderContext:
    uuid: str
    ssh_port: int
    pool_dir: str
    console_log: str | None = None
    include_virtio_pmem: bool = False   # libvirt 9.0 cannot start a domain with virtio-pmem in it


@dataclass(frozen=True)
class Metadata:
    """What nvmprov made and needs to find again; stored in the domain (no secrets)."""

    version: str
    spec_digest: str
    ssh_port: int
    ssh_user: str
    regions: tuple[RegionPlan, ...] = ()
    volumes: tuple[tuple[str, str], ...] = ()   # (volume name, kind), in order of creation
    spec_path: str | None = None
    pool: str = "nvmprov"
    spec_json: str | None = None   # the full spec, so any command can rebuild the plan
    complete: bool = False         # create finished; False means a run was cut short (see workflow)

    @classmethod
    def from_plan(
        cls, plan: Plan, *, ssh_port: int, spec_path: str | None = None, spec_json: str | None = None
    ) -> Metadata:
        return cls(__version__, plan.spec_digest, ssh_port, plan.ssh_user, plan.regions, (), spec_path,
                   plan.pool, spec_json)

    def with_volume(self, name: str, kind: str) -> Metadata:
        if kind not in VOLUME_KINDS:
            raise ValueError(f"volume kind {kind!r} is not one of {VOLUME_KINDS}")
        if (name, kind) in self.volumes:
            return self
        return replace(self, volumes=(*self.volumes, (name, kind)))


# ---------------------------------------------------------------------------------------------
# small builders


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _kib(n_bytes: int) -> str:
    return str(n_bytes // KiB)


def _path(pool_dir: str, volume: str) -> str:
    return f"{pool_dir.rstrip('/')}/{volume}"


def _pci_address(parent: ET.Element, bus: int, slot: int) -> None:
    _sub(parent, "address", type="pci", domain="0x0000", bus=f"0x{bus:02x}", slot=f"0x{slot:02x}",
         function="0x0")


def _region_element(region: RegionPlan, pool_dir: str) -> ET.Element:
    # access='shared': without it QEMU maps the file privately and guest writes never reach it.
    mem = ET.Element("memory", model=region.model, access="shared")
    source = _sub(mem, "source")
    _sub(source, "path", _path(pool_dir, region.volume))
    if region.model == "nvdimm":
        # QEMU alignment of its mmap of the backing file (align=). libvirt always preallocates an
        # nvdimm without <pmem/>; on a 4 KiB-aligned mapping the kernel redoes a whole large page-
        # cache folio per 4 KiB fault: 4 GiB took 20-28 s to start, 2 MiB-aligned 3.3 s (docs/performance.md).
        _sub(source, "alignsize", _kib(NVDIMM_MMAP_ALIGN_BYTES), unit="KiB")
    if region.host_pmem:
        _sub(source, "pmem")     # QEMU pmem=on: only true on real host persistent memory
    target = _sub(mem, "target")
    _sub(target, "size", _kib(region.backing_bytes), unit="KiB")
    if region.model == "nvdimm":
        _sub(target, "node", str(region.numa_node))
        if region.label_bytes:
            label = _sub(target, "label")
            _sub(label, "size", _kib(region.label_bytes), unit="KiB")
        if region.readonly:
            _sub(target, "readonly")
    _sub(mem, "alias", name=region.alias)
    if region.model == "nvdimm":
        _sub(mem, "address", type="dimm", slot=str(region.dimm_slot))
    else:
        _pci_address(mem, region.pci_bus or 0, 0)
    return mem


def region_device_xml(region: RegionPlan, pool_dir: str) -> str:
    """The <memory> element of one region, for attachDeviceFlags."""
    return ET.tostring(_region_element(region, pool_dir), encoding="unicode")


# ---------------------------------------------------------------------------------------------
# metadata


def _m(tag: str) -> str:
    return f"{{{METADATA_NS}}}{tag}"


# notes: child elements; the namespaces of a split region come from the recorded spec (spec_json)
_REGION_FIELDS = [f.name for f in dataclasses.fields(RegionPlan)
                  if f.name not in ("notes", "namespaces", "namespace_of", "namespace_name", "namespace_bytes")]


def _attr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _default(r: RegionPlan, name: str) -> bool:
    """Fields added later (issue 17: mode, reserved_tail; issue 15: adopted; issue 19: numa_node) are
    left out at their default, so earlier guests' metadata reads the same."""
    if name == "mode":
        return r.mode == ("raw" if r.readonly else "fsdax")
    if name == "numa_node":
        return r.numa_node == 0
    return name in ("reserved_tail", "adopted") and not getattr(r, name)


def _metadata_element(md: Metadata) -> ET.Element:
    root = ET.Element(_m("guest"), version=md.version)
    spec = _sub(root, _m("spec"), md.spec_json, digest=md.spec_digest)
    if md.spec_path is not None:
        spec.set("path", md.spec_path)
    _sub(root, _m("pool"), name=md.pool)
    _sub(root, _m("state"), complete=_attr(md.complete))
    _sub(root, _m("ssh"), port=str(md.ssh_port), user=md.ssh_user)
    regions = _sub(root, _m("regions"))
    for r in md.regions:
        # fields added later (mode, reserved_tail, adopted) only when not at their default: the metadata
        # of every other region stays as it was
        attrs = {n: _attr(getattr(r, n)) for n in _REGION_FIELDS if getattr(r, n) is not None and not _default(r, n)}
        region = _sub(regions, _m("region"), **attrs)
        for note in r.notes:
            _sub(region, _m("note"), note)
    volumes = _sub(root, _m("volumes"))
    for name, kind in md.volumes:
        _sub(volumes, _m("volume"), name=name, kind=kind)
    return root


def metadata_xml(md: Metadata) -> str:
    """The inner element alone, without a namespace, as virDomainSetMetadata wants it: libvirt
    puts every element of it into the namespace it is given (declaring it twice fails)."""
    root = _metadata_element(md)
    prefix = f"{{{METADATA_NS}}}"
    for el in root.iter():
        el.tag = el.tag.removeprefix(prefix)
    return ET.tostring(root, encoding="unicode")


_INT_FIELDS = {"size_bytes", "backing_bytes", "label_bytes", "dimm_slot", "pci_slot", "pci_bus",
               "expected_usable_bytes", "align_bytes", "numa_node", "cxl_serial"}
_BOOL_FIELDS = {"readonly", "host_pmem", "reserved_tail", "adopted"}


def _region_from(el: ET.Element) -> RegionPlan:
    values: dict[str, object] = {n: None for n in _REGION_FIELDS}
    for name, text in el.attrib.items():
        if name in _INT_FIELDS:
            values[name] = int(text)
        elif name in _BOOL_FIELDS:
            values[name] = text == "true"
        elif name in values:
            values[name] = text
    values["notes"] = tuple(n.text or "" for n in el.iterfind(_m("note")))
    values["reserved_tail"] = bool(values["reserved_tail"])
    if values["mode"] is None and values["model"] in ("nvdimm", "cxl"):  # left out at its default (or before modes)
        values["mode"] = "raw" if values["readonly"] else "fsdax"
    values["adopted"] = values["adopted"] is True
    values["numa_node"] = values["numa_node"] or 0
    return RegionPlan(**values)  # type: ignore[arg-type]


def parse_metadata(domain_xml: str) -> Metadata | None:
    """nvmprov's metadata in a full domain XML (or the bare element); None when absent."""
    root = _tree(domain_xml)
    el = root if root.tag == _m("guest") else root.find(f"metadata/{_m('guest')}")
    if el is None:
        return None
    spec, ssh = el.find(_m("spec")), el.find(_m("ssh"))
    if spec is None or ssh is None:
        return None
    return Metadata(
        version=el.get("version", ""),
        spec_digest=spec.get("digest", ""),
        ssh_port=int(ssh.get("port", "0")),
        ssh_user=ssh.get("user", ""),
        regions=tuple(_region_from(r) for r in el.iterfind(f"{_m('regions')}/{_m('region')}")),
        volumes=tuple((v.get("name", ""), v.get("kind", "")) for v in el.iterfind(f"{_m('volumes')}/{_m('volume')}")),
        spec_path=spec.get("path"),
        pool=_child_attr(el, "pool", "name", "nvmprov"),
        spec_json=(spec.text or "").strip() or None,
        complete=_child_attr(el, "state", "complete", "false") == "true",
    )


def _child_attr(el: ET.Element, tag: str, attr: str, default: str) -> str:
    child = el.find(_m(tag))
    return default if child is None else child.get(attr, default)


# ---------------------------------------------------------------------------------------------
# parse: what an existing domain's XML says about memory hotplug
#
# Any domain, nvmprov's or not (attach/detach/show/doctor). Rules measured on libvirt 9.0 + QEMU 7.2:
# every <memory> device (nvdimm and virtio-pmem alike) takes one of maxMemory's slots and its size
# counts against maxMemory; virtio-pmem needs a hot-pluggable PCIe root port (pcie.0 itself refuses
# hotplug).


def _tree(domain_xml: str) -> ET.Element:
    """The one place domain XML is parsed: libvirt's own output (or our own render)."""
    return ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own output, not untrusted input


_UNITS = {
    "b": 1, "bytes": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": KiB**2, "mib": KiB**2, "mb": 1000**2,
    "g": KiB**3, "gib": KiB**3, "gb": 1000**3, "t": KiB**4, "tib": KiB**4, "tb": 1000**4,
}


@dataclass(frozen=True)
class MemDevice:
    """One <devices><memory> element."""

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
    """What any domain's XML (nvmprov's or not, live or persistent) says about memory hotplug."""
    root = _tree(domain_xml)
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


def device_xml(domain_xml: str, alias: str) -> str | None:
    """The <memory> device of that alias, as XML for detachDeviceFlags; None when there is none."""
    for el in _tree(domain_xml).findall("./devices/memory"):
        a = el.find("alias")
        if a is not None and a.get("name") == alias:
            return ET.tostring(el, encoding="unicode")
    return None


# ---------------------------------------------------------------------------------------------
# what a domain uses on the host


@dataclass(frozen=True)
class References:
    """The host files a domain's XML names and the storage volumes it names by pool."""

    paths: frozenset[str]                   # absolute, normalised (posixpath.normpath)
    volumes: frozenset[tuple[str, str]]     # (pool, volume)


def references(domain_xml: str) -> References:
    """Everything a domain (nvmprov's or not) uses on the host, read from one of its XMLs:
    - every attribute value and element text that is an absolute path (disks and their backing
      chains, memory device <path>, kernel, initrd, loader, nvram, logs ...);
    - <source pool='P' volume='V'/> sources;
    - paths inside <qemu:commandline> arguments, in QEMU's key=value form (mem-path=/x,file=/x)
      and its JSON form ({"qom-type": ..., "mem-path": "/x"}): a domain's own CXL backing and
      label files are only named there;
    - the regions of nvmprov's metadata, as (pool, volume): a stopped guest's virtio-pmem region is
      in no libvirt XML (start plugs it from the metadata) and its volume is still the guest's.
    """
    root = _tree(domain_xml)
    paths: set[str] = set()
    volumes: set[tuple[str, str]] = set()
    qemu_arg = f"{{{QEMU_NS}}}arg"
    for el in root.iter():
        values = [*el.attrib.values(), (el.text or "").strip()]
        if el.tag == qemu_arg:
            values += _arg_paths(el.get("value", ""))
        paths.update(posixpath.normpath(v) for v in values if v.startswith("/"))
        if el.tag == "source" and el.get("pool") and el.get("volume"):
            volumes.add((el.get("pool", ""), el.get("volume", "")))
    md = root.find(f"metadata/{_m('guest')}")
    if md is not None:
        pool = _child_attr(md, "pool", "name", "nvmprov")
        for r in md.iterfind(f"{_m('regions')}/{_m('region')}"):   # a CXL region's label storage area too
            volumes.update((pool, r.get(key, "")) for key in ("volume", "lsa_volume") if r.get(key))
    return References(frozenset(paths), frozenset(volumes))


def _arg_paths(arg: str) -> list[str]:
    """Absolute paths in one QEMU argument: JSON (-object/-device '{...}') or key=value,key=value
    (a comma inside a value is written ',,')."""
    arg = arg.strip()
    if arg.startswith("{"):
        try:
            return [s for s in _json_strings(json.loads(arg)) if s.startswith("/")]
        except ValueError:
            pass   # not JSON after all: read it as key=value
    values = [item.split("=", 1)[-1] for item in _keyval_items(arg)]
    return [v for v in values if v.startswith("/")]


def _keyval_items(arg: str) -> list[str]:
    items, current, i = [], [], 0
    while i < len(arg):
        if arg[i] == "," and arg[i + 1:i + 2] == ",":
            current.append(",")
            i += 2
            continue
        if arg[i] == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(arg[i])
        i += 1
    return [*items, "".join(current)]


def _json_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _json_strings(v)]
    return []


# ---------------------------------------------------------------------------------------------
# the domain


def _in_config(plan: Plan, ctx: RenderContext) -> list[RegionPlan]:
    return [r for r in plan.regions if r.model == "nvdimm" or (r.model == "virtio-pmem" and ctx.include_virtio_pmem)]


def _os(dom: ET.Element, plan: Plan, ctx: RenderContext) -> None:
    os_el = _sub(dom, "os")
    if plan.boot == "efi":
        os_el.set("firmware", "efi")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=plan.machine)
    if plan.boot == "direct":
        _sub(os_el, "kernel", _path(ctx.pool_dir, plan.kernel_volume or ""))
        _sub(os_el, "initrd", _path(ctx.pool_dir, plan.initrd_volume or ""))
        _sub(os_el, "cmdline", plan.kernel_cmdline or "")
    else:
        _sub(os_el, "boot", dev="hd")


def _cpu(dom: ET.Element, plan: Plan) -> None:
    if plan.accel == "kvm":
        cpu = _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="on")
    else:
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", plan.cpu_model, fallback="allow")
    numa = _sub(cpu, "numa")
    # Memory devices need a NUMA node to land in: one cell per node of the plan (one by default,
    # with all vCPUs and RAM). A memory-only node is a cell without cpus (libvirt 9.0 takes it).
    for cell in plan.numa:
        el = _sub(numa, "cell", id=str(cell.id))
        if cell.cpuset is not None:
            el.set("cpus", cell.cpuset)
        el.set("memory", _kib(cell.memory_bytes))
        el.set("unit", "KiB")


def _disks(devices: ET.Element, plan: Plan, ctx: RenderContext) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    _sub(disk, "source", file=_path(ctx.pool_dir, plan.overlay_volume))
    _sub(disk, "target", dev="vda", bus="virtio")
    # Every PCI device gets a fixed address on pcie.0, so libvirt never parks one of its own in
    # the root ports that are kept free for virtio-pmem hotplug.
    _pci_address(disk, 0, DISK_PCI_SLOT)
    seed = _sub(devices, "disk", type="file", device="cdrom")
    _sub(seed, "driver", name="qemu", type="raw")
    _sub(seed, "source", file=_path(ctx.pool_dir, plan.seed_volume))
    _sub(seed, "target", dev="sda", bus="sata")
    _sub(seed, "readonly")


def _root_ports(devices: ET.Element, plan: Plan) -> None:
    """A pcie-root-port per virtio-pmem region (pcie.0 itself refuses hotplug) plus spares."""
    ports = [(r.pci_bus, r.pci_slot, f"ua-port-{r.name}") for r in plan.virtio_pmem_regions]
    first_free = len(ports)
    for i in range(plan.spare_root_ports):
        n = first_free + i
        ports.append((n + 1, 0x10 + n, f"ua-port-spare{i}"))
    for index, slot, alias in ports:
        ctl = _sub(devices, "controller", type="pci", index=str(index), model="pcie-root-port")
        _sub(ctl, "alias", name=alias)
        _pci_address(ctl, 0, slot or 0)


def _network_interface(devices: ET.Element, plan: Plan) -> None:
    if plan.network_mode != "network":
        return
    iface = _sub(devices, "interface", type="network")
    _sub(iface, "mac", address=plan.mac)
    _sub(iface, "source", network=plan.network_name or "")
    _sub(iface, "model", type="virtio")
    _pci_address(iface, 0, NIC_PCI_SLOT)


def _serial(devices: ET.Element, ctx: RenderContext) -> None:
    serial = _sub(devices, "serial", type="pty")
    if ctx.console_log:
        _sub(serial, "log", file=ctx.console_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")


def _rng(devices: ET.Element) -> None:
    """A virtio RNG fed from the host's /dev/urandom. Without it the guest kernel's RNG was ready
    only ~1.3 s after sshd had started (sshd waits for it) under TCG: the emulated CPU has no
    RDRAND and little timing jitter to gather."""
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _pci_address(rng, 0, RNG_PCI_SLOT)


def _devices(dom: ET.Element, plan: Plan, ctx: RenderContext) -> None:
    devices = _sub(dom, "devices")
    _disks(devices, plan, ctx)
    _sub(devices, "controller", type="usb", index="0", model="none")   # else xhci takes a root port
    _root_ports(devices, plan)
    _network_interface(devices, plan)
    _serial(devices, ctx)
    _rng(devices)
    _sub(devices, "memballoon", model="none")   # a balloon would fight the fixed NUMA cell
    for region in _in_config(plan, ctx):
        devices.append(_region_element(region, ctx.pool_dir))


def user_netdev_args(plan: Plan, ssh_port: int) -> list[str]:
    """QEMU arguments of the user-mode NIC: SSH forwarded from 127.0.0.1 only, no outbound route
    unless the spec asks (restrict=on)."""
    restrict = "off" if plan.network_outbound else "on"
    return [
        "-netdev", f"user,id=net0,restrict={restrict},hostfwd=tcp:{SSH_FORWARD_HOST}:{ssh_port}-:22",
        # The explicit address matters: without it the NIC takes slot 1, libvirt's root port.
        "-device", f"virtio-net-pci,netdev=net0,mac={plan.mac},bus=pcie.0,addr=0x{NIC_PCI_SLOT:02x}",
    ]


# The CXL topology measured to work (docs/performance.md, issue 20): a CXL host bridge with two root
# ports (with one, the bridge is passthrough, its HDM decoder is never programmed and writes never
# reach the host file), the type-3 device behind the first, a fixed memory window on the bridge.
# The -device arguments are JSON: in key=value form pxb-cxl took the PCI slot libvirt's own root
# port needs and the domain did not start.
CXL_HOST_BRIDGE = "cxl.1"
CXL_BUS_NR = 52
CXL_ROOT_PORTS = (("rp0", 0, 2), ("rp1", 1, 3))   # (id, port, slot), chassis 0


def _json_device(**props: object) -> str:
    return json.dumps(props, separators=(",", ":"))


def _backend_path(pool_dir: str, volume: str) -> str:
    path = _path(pool_dir, volume)
    if "," in path:  # QEMU's key=value syntax would split it (and ",," escaping is one more trap)
        raise HostError(f"the storage pool's directory {pool_dir!r} has a comma, which QEMU's command line cannot "
                        "take in a CXL memory backend's mem-path; use a pool in a directory without one")
    return path


def cxl_args(plan: Plan, pool_dir: str) -> list[str]:
    """QEMU arguments of the plan's CXL regions (none: []). libvirt neither chowns nor labels the
    files they name: nvmprov makes those volumes owned by QEMU's user (storage.make_backing)."""
    regions = plan.cxl_regions
    if not regions:
        return []
    args = ["-machine", "cxl=on"]
    for i, r in enumerate(regions):
        args += ["-object", f"memory-backend-file,id=cxl-mem{i},share=on,"
                            f"mem-path={_backend_path(pool_dir, r.volume)},size={r.backing_bytes}",
                 "-object", f"memory-backend-file,id=cxl-lsa{i},share=on,"
                            f"mem-path={_backend_path(pool_dir, r.lsa_volume or '')},size={CXL_LSA_BYTES}"]
    args += ["-device", _json_device(driver="pxb-cxl", bus_nr=CXL_BUS_NR, bus="pcie.0", id=CXL_HOST_BRIDGE)]
    for rp, port, slot in CXL_ROOT_PORTS:
        args += ["-device", _json_device(driver="cxl-rp", port=port, bus=CXL_HOST_BRIDGE, id=rp, chassis=0,
                                         slot=slot)]
    for i, r in enumerate(regions):
        args += ["-device", _json_device(driver="cxl-type3", bus=CXL_ROOT_PORTS[i][0], memdev=f"cxl-mem{i}",
                                         lsa=f"cxl-lsa{i}", id=r.alias, sn=r.cxl_serial)]
    args += ["-machine", f"cxl-fmw.0.targets.0={CXL_HOST_BRIDGE},cxl-fmw.0.size={plan.cxl_window_bytes}"]
    return args


def _qemu_commandline(dom: ET.Element, plan: Plan, ctx: RenderContext) -> None:
    args = user_netdev_args(plan, ctx.ssh_port) if plan.network_mode == "user" else []
    args += cxl_args(plan, ctx.pool_dir)
    if not args:
        return
    cmd = _sub(dom, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        _sub(cmd, f"{{{QEMU_NS}}}arg", value=arg)


def _memory_in_config(plan: Plan, ctx: RenderContext) -> int:
    return plan.memory_bytes + sum(r.backing_bytes for r in _in_config(plan, ctx))


def build_element(plan: Plan, ctx: RenderContext, metadata: Metadata | None = None) -> ET.Element:
    dom = ET.Element("domain", type="kvm" if plan.accel == "kvm" else "qemu")
    _sub(dom, "name", plan.name)
    _sub(dom, "uuid", ctx.uuid)
    md = metadata if metadata is not None else Metadata.from_plan(plan, ssh_port=ctx.ssh_port)
    _sub(dom, "metadata").append(_metadata_element(md))
    _sub(dom, "maxMemory", _kib(plan.max_memory_bytes), slots=str(plan.memory_slots), unit="KiB")
    _sub(dom, "memory", _kib(_memory_in_config(plan, ctx)), unit="KiB")
    _sub(dom, "vcpu", str(plan.vcpus), placement="static")
    _os(dom, plan, ctx)
    features = _sub(dom, "features")
    _sub(features, "acpi")      # QEMU refuses memory hotplug (so nvdimms) without ACPI
    _sub(features, "apic")
    _cpu(dom, plan)
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    _devices(dom, plan, ctx)
    _qemu_commandline(dom, plan, ctx)
    return dom


def render(plan: Plan, ctx: RenderContext, metadata: Metadata | None = None) -> str:
    """The full domain XML; `metadata` defaults to the plan's, with no volumes recorded yet."""
    dom = build_element(plan, ctx, metadata)
    ET.indent(dom, space="  ")
    return ET.tostring(dom, encoding="unicode") + "\n"
