"""`nvmprov show NAME`: a guest's memory map as a person wants it.

The NUMA topology (each node's RAM, vCPUs and regions; the node the guest kernel shows a region on,
when nvmprov can log in), RAM and every region with its guest physical address range (from inside
the guest when nvmprov can log in: /proc/iomem and /sys/bus/nd/devices/regionN; else from
libvirt's live XML where it has a base address), model, size and usable bytes, free slots,
hotplug headroom and SSH coordinates.
Building the map is pure (build_map, probe_of); only show() talks to libvirt and the guest.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import agent, domain, identity, managed, proof, state, virt
from .errors import GuestError, NvmprovError
from .plan import CXL_GRANULE_BYTES
from .sizes import human_size, round_up

if TYPE_CHECKING:
    import libvirt

    from .agent.facts import GuestFacts
    from .domain import Metadata
    from .progress import Progress

PROBE_DEADLINE_S = 20.0     # show must not hang on a guest that is still booting

@dataclass(frozen=True)
class GuestRegion:
    dev: str            # region0
    start: int
    size_bytes: int
    nfit_handle: int | None
    sysfs: str
    blockdevs: tuple[str, ...]
    target_node: int | None = None   # regionN/target_node (None: the kernel shows none)

    def pci_slot(self) -> int | None:
        """Slot on pcie.0 of the device or of its root port (first hop under pci0000:00)."""
        m = re.search(r"/pci0000:00/0000:00:([0-9a-f]{2})\.", self.sysfs)
        return int(m.group(1), 16) if m else None


    @property
    def cxl(self) -> bool:
        """The nd region of a CXL region (its bus hangs off the CXL nvdimm bridge)."""
        return "/nvdimm-bridge" in self.sysfs


@dataclass(frozen=True)
class CxlWindow:
    """A CXL fixed memory window as the guest shows it (a root decoder: decoder0.0)."""

    decoder: str
    start: int
    size_bytes: int


@dataclass(frozen=True)
class Probe:
    ram: tuple[tuple[int, int], ...]          # inclusive (start, end)
    regions: tuple[GuestRegion, ...]
    cxl_windows: tuple[CxlWindow, ...] = ()


def probe_of(facts: GuestFacts) -> Probe:
    """The map's part of the agent's facts: System RAM, and each region's range, handle and devices."""
    regions = []
    for r in facts.regions.values():
        if r.start is None:  # root-only: a facts read without root sees no ranges
            continue
        dimm = facts.dimms.get(r.mappings[0].dimm) if r.mappings else None
        regions.append(GuestRegion(
            dev=r.dev, start=r.start, size_bytes=r.size_bytes,
            nfit_handle=dimm.handle if dimm is not None else None, sysfs=r.sysfs_path,
            blockdevs=tuple(sorted(b.name for b in facts.blockdevs.values() if b.region == r.dev)),
            target_node=r.target_node,
        ))
    windows = tuple(CxlWindow(name, start, size) for name, (start, size) in sorted(facts.cxl_windows.items()))
    return Probe(facts.system_ram, tuple(regions), windows)


@dataclass
class RegionView:
    name: str
    model: str
    size_bytes: int
    usable_bytes: int | None
    where: str                       # "live", "config", "live+config", "recorded" (hot-plugged at start)
    backing_path: str | None
    guest_start: int | None = None   # guest physical address range, inclusive end
    guest_end: int | None = None
    guest_region: str | None = None  # region0
    guest_device: str | None = None  # /dev/pmem0
    numa_node: int | None = None     # <target><node> in libvirt's XML (else the recorded plan's); None: none
    target_node: int | None = None   # the node the guest kernel shows it on (sysfs target_node)


@dataclass
class NodeView:
    """One guest NUMA node: its RAM, its vCPUs (None: memory only) and the regions placed on it."""

    id: int
    memory_bytes: int
    cpus: str | None
    regions: list[str] = field(default_factory=list)


@dataclass
class MemoryMap:
    name: str
    state: str                       # running / shut off
    managed: bool
    ram_bytes: int
    ram_ranges: list[tuple[int, int]] = field(default_factory=list)
    regions: list[RegionView] = field(default_factory=list)
    nodes: list[NodeView] = field(default_factory=list)
    max_memory_bytes: int = 0
    slots: int = 0
    free_slots: int = 0
    headroom_bytes: int = 0
    free_root_ports: int = 0
    addresses_from: str = "libvirt"  # "guest" when the ranges were read inside the guest
    # The CXL fixed memory window: {"size_bytes", "regions", and from the guest "decoder", "start", "end"};
    # None without CXL regions. Its size is on QEMU's command line, the address only in the guest.
    cxl_window: dict[str, Any] | None = None
    ssh: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _region_name(alias: str | None) -> str:
    return alias.removeprefix("ua-pmem-") if alias else "-"


def build_map(live_xml: str, config_xml: str, *, running: bool, md: Metadata | None) -> MemoryMap:
    """The map from libvirt alone: the live XML when running, the persistent one otherwise."""
    now = domain.parse(live_xml if running else config_xml)
    cfg = domain.parse(config_xml)
    views: dict[str, RegionView] = {}
    live_aliases = {d.alias for d in now.devices} if running else set()
    cfg_aliases = {d.alias for d in cfg.devices}
    for dev in (*now.devices, *(d for d in cfg.devices if d.alias not in live_aliases)):
        name = _region_name(dev.alias)
        where = "+".join(w for w, on in (("live", dev.alias in live_aliases), ("config", dev.alias in cfg_aliases))
                         if on)
        # an nvdimm without <node> is on node 0 (QEMU's default); virtio-pmem has no node
        on = dev.node if dev.node is not None or dev.model != "nvdimm" else 0
        view = RegionView(name, dev.model, dev.size_bytes, None, where, dev.path, numa_node=on)
        if dev.base is not None and running and dev.alias in live_aliases:
            view.guest_start = dev.base
            view.guest_end = dev.base + dev.size_bytes - (dev.label_bytes or 0) - 1
        views[name] = view
    cxl_paths = domain.references(config_xml).paths
    for r in md.regions if md else ():
        if r.model == "cxl":  # on QEMU's command line, not a libvirt device
            path = next((p for p in sorted(cxl_paths) if p.endswith("/" + r.volume)), None)
            views[r.name] = RegionView(r.name, r.model, r.backing_bytes, None, "qemu args", path)
        view = views.get(r.name) or RegionView(r.name, r.model, r.backing_bytes, None, "recorded", None)
        view.usable_bytes = r.expected_usable_bytes
        if view.numa_node is None and r.model == "nvdimm":
            view.numa_node = r.numa_node
        views[r.name] = view
    nodes = [NodeView(c.id, c.memory_bytes, c.cpus) for c in now.cells]
    for view in views.values():
        node = next((n for n in nodes if n.id == view.numa_node), None)
        if node is not None:
            node.regions.append(view.name)
    cxl = [r for r in md.regions if r.model == "cxl"] if md else []
    window = {"size_bytes": round_up(sum(r.backing_bytes for r in cxl), CXL_GRANULE_BYTES),
              "regions": [r.name for r in cxl]} if cxl else None
    return MemoryMap(
        name=now.name, state="running" if running else "shut off", managed=md is not None,
        ram_bytes=now.ram_bytes, regions=list(views.values()), max_memory_bytes=now.max_memory_bytes,
        slots=now.slots, free_slots=now.free_slots, headroom_bytes=now.headroom_bytes,
        free_root_ports=len(now.free_root_ports), nodes=nodes, cxl_window=window,
    )


def merge_probe(mm: MemoryMap, probe: Probe, md: Metadata) -> None:
    """Put the guest's own view (ranges, devices) on the regions nvmprov recorded."""
    mm.ram_ranges = list(probe.ram)
    mm.addresses_from = "guest"
    for view in mm.regions:
        r = next((x for x in md.regions if x.name == view.name), None)
        if r is None:
            continue
        if r.model == "nvdimm":
            found = [g for g in probe.regions if g.nfit_handle == (r.dimm_slot or 0) + 1]
        elif r.model == "cxl":
            found = [g for g in probe.regions if g.cxl]
        else:
            found = [g for g in probe.regions if g.nfit_handle is None and g.pci_slot() == r.pci_slot]
        if len(found) == 1:
            g = found[0]
            view.guest_start, view.guest_end = g.start, g.start + g.size_bytes - 1
            view.guest_region = g.dev
            view.guest_device = f"/dev/{g.blockdevs[0]}" if g.blockdevs else None
            view.target_node = g.target_node
    if mm.cxl_window is not None and probe.cxl_windows:
        w = probe.cxl_windows[0]   # nvmprov makes one window (cxl-fmw.0)
        mm.cxl_window.update(decoder=w.decoder, start=w.start, end=w.start + w.size_bytes - 1,
                             size_bytes=w.size_bytes)


# ---------------------------------------------------------------------------------------------
# text


def _range(start: int | None, end: int | None) -> str:
    return "-" if start is None or end is None else f"0x{start:011x}-0x{end:011x}"


def _node_lines(mm: MemoryMap) -> list[str]:
    """One line per NUMA node: RAM, vCPUs, regions (with the guest's node where it was read)."""
    by_name = {v.name: v for v in mm.regions}

    def region(name: str) -> str:
        seen = by_name[name].target_node
        return name if seen is None else f"{name} (guest: node {seen})"

    lines = []
    for n in mm.nodes:
        cpus = f"vCPUs {n.cpus}" if n.cpus else "no vCPUs (memory only)"
        regions = ", ".join(region(r) for r in n.regions) or "-"
        lines.append(f"  NUMA node {n.id:<2} {human_size(n.memory_bytes):>10}  {cpus:<22}  regions: {regions}")
    placed = {r for n in mm.nodes for r in n.regions}
    off = [region(v.name) for v in mm.regions if v.name not in placed and v.model != "cxl"]
    if mm.nodes and off:
        lines.append(f"  no NUMA node (virtio-pmem has none in libvirt): {', '.join(off)}")
    return lines


def render_text(mm: MemoryMap) -> str:
    lines = [f"{mm.name}: {mm.state}" + ("" if mm.managed else " (not managed by nvmprov)")]
    ram = ", ".join(_range(a, b) for a, b in mm.ram_ranges) or "-"
    lines.append(f"  RAM          {human_size(mm.ram_bytes):>10}  {ram}")
    lines += _node_lines(mm)
    if mm.cxl_window is not None:
        w = mm.cxl_window
        at, decoder = _range(w.get("start"), w.get("end")), w.get("decoder", "cxl-fmw.0")
        lines.append(f"  CXL window   {human_size(w['size_bytes']):>10}  {at}  ({decoder}; regions: "
                     f"{', '.join(w['regions'])})")
    headers = ("region", "model", "size", "usable", "guest physical range", "device", "attached", "backing")
    rows = [(v.name, v.model, human_size(v.size_bytes), human_size(v.usable_bytes), _range(v.guest_start, v.guest_end),
             v.guest_device or v.guest_region or "-", v.where, v.backing_path or "-") for v in mm.regions]
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    else:
        lines.append("  no pmem regions")
    lines.append(f"  hotplug: {mm.free_slots} of {mm.slots} memory slots free, {human_size(mm.headroom_bytes)} "
                 f"headroom under maxMemory {human_size(mm.max_memory_bytes)}, {mm.free_root_ports} free PCIe root "
                 "ports")
    lines.append(f"  addresses from: {mm.addresses_from}")
    if mm.ssh:
        s = mm.ssh
        lines.append(f"  ssh: ssh -i {s['identity_file']} -o UserKnownHostsFile={s['known_hosts']} -p {s['port']} "
                     f"{s['user']}@{s['host']}   (or: nvmprov ssh {mm.name})")
    lines += [f"  note: {n}" for n in mm.notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# side effects


def show(conn: libvirt.virConnect, name: str, progress: Progress) -> MemoryMap:
    dom = virt.require(conn, name)
    config_xml = virt.xml_desc(dom, inactive=True)
    running = virt.is_active(dom)
    md = domain.parse_metadata(config_xml)
    mm = build_map(virt.xml_desc(dom), config_xml, running=running, md=md)
    if md is None:
        if running:
            mm.notes.append("nvmprov cannot log in to a domain it did not create: guest addresses are what "
                            "libvirt reports")
        return mm
    files = state.current_files(state.check_name(name), identity.of(conn))  # show moves nothing
    mm.ssh = asdict(managed.ssh_coordinates(files, md.ssh_port, md.ssh_user))
    if not running:
        return mm
    try:
        merge_probe(mm, _probe(dom, md, files, progress), md)
    except (GuestError, NvmprovError) as exc:
        mm.notes.append(f"could not read the map inside the guest ({exc}); addresses are what libvirt reports")
    return mm


def _probe(dom: libvirt.virDomain, md: Metadata, files: state.GuestFiles, progress: Progress) -> Probe:
    coords = managed.ssh_coordinates(files, md.ssh_port, md.ssh_user)
    session = proof.open_session(dom, files, coords, PROBE_DEADLINE_S, progress)
    try:
        facts = agent.gather(session)  # the agent's own read, no modules loaded, nothing run
    finally:
        session.close()
    return probe_of(facts)
