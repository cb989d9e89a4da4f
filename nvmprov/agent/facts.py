"""Facts about a guest: pure parsers of command output, and the mapping of spec regions to devices.

Nothing here talks to a guest. `gather()` in nvmprov.agent asks the guest program for the facts
(guest/read_facts.py) and hands them to `guest_facts`. Each parser takes text and returns frozen dataclasses.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from nvmprov.errors import GuestError
from nvmprov.plan import RegionPlan

SECTOR_BYTES = 512
STATX_ATTR_DAX = 0x00200000

# --------------------------------------------------------------------------------------------
# ndctl list


@dataclass(frozen=True)
class NdNamespace:
    dev: str  # "namespace0.0"
    mode: str  # "raw" | "fsdax" | "devdax" | "sector" | ...
    size_bytes: int  # usable size (fsdax: after the page map); 0 for an idle seed
    blockdev: str | None  # "pmem0" (raw, fsdax, sector); None for devdax or idle
    uuid: str | None  # None for label-less namespaces
    enabled: bool  # False when ndctl says "state": "disabled" (shown with --idle)
    align: int | None = None  # fsdax/devdax: the page size of its mappings ("align"); None: not shown
    name: str | None = None  # the name in its label (`create-namespace -n`); None: unnamed or label-less
    chardev: str | None = None  # devdax: its character device ("dax0.1"), as ndctl names it

    @property
    def active(self) -> bool:
        return self.enabled and self.size_bytes > 0


@dataclass(frozen=True)
class NdRegion:
    dev: str  # "region0"
    size_bytes: int
    available_bytes: int | None
    type: str | None  # "pmem"
    enabled: bool
    namespaces: tuple[NdNamespace, ...] = ()


@dataclass(frozen=True)
class NdDimm:
    dev: str  # "nmem0"
    handle: int | None  # NFIT device handle (QEMU: dimm slot + 1)


@dataclass(frozen=True)
class NdctlList:
    regions: tuple[NdRegion, ...] = ()
    namespaces: tuple[NdNamespace, ...] = ()  # top-level ones, when listed without regions
    dimms: tuple[NdDimm, ...] = ()

    def all_namespaces(self) -> tuple[NdNamespace, ...]:
        nested = tuple(ns for r in self.regions for ns in r.namespaces)
        return nested + self.namespaces


def _json_values(text: str) -> list[Any]:
    """Every JSON value in `text`: ndctl prints nothing for nothing, and one object per bus with -B."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return values
        value, pos = decoder.raw_decode(text, pos)
        values.append(value)


def _as_list(value: Any) -> list[dict[str, Any]]:
    """ndctl prints a lone object instead of a one-element array."""
    if value is None:
        return []
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, dict)]


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text, 0)
    except ValueError:
        return None


def _enabled(obj: dict[str, Any]) -> bool:
    return obj.get("state", "enabled") != "disabled"


def _namespace(obj: dict[str, Any]) -> NdNamespace:
    return NdNamespace(
        dev=str(obj["dev"]),
        mode=str(obj.get("mode", "unknown")),
        size_bytes=_int(obj.get("size")) or 0,
        blockdev=obj.get("blockdev"),
        uuid=obj.get("uuid"),
        enabled=_enabled(obj),
        align=_int(obj.get("align")),
        name=obj.get("name") or None,
        chardev=obj.get("chardev") or _chardev_in_daxregion(obj),
    )


def _chardev_in_daxregion(obj: dict[str, Any]) -> str | None:
    """`ndctl list -N` alone nests a devdax namespace's device under daxregion.devices[]."""
    daxregion = obj.get("daxregion")
    devices = _as_list(daxregion.get("devices")) if isinstance(daxregion, dict) else []
    return str(devices[0]["chardev"]) if devices and devices[0].get("chardev") else None


def _region(obj: dict[str, Any]) -> NdRegion:
    return NdRegion(
        dev=str(obj["dev"]),
        size_bytes=_int(obj.get("size")) or 0,
        available_bytes=_int(obj.get("available_size")),
        type=obj.get("type"),
        enabled=_enabled(obj),
        namespaces=tuple(_namespace(n) for n in _as_list(obj.get("namespaces"))),
    )


def _classify(obj: dict[str, Any]) -> str:
    dev = str(obj.get("dev", ""))
    for kind in ("region", "namespace", "nmem"):
        if dev.startswith(kind):
            return kind
    return "other"


def parse_ndctl_list(text: str) -> NdctlList:
    """Parse `ndctl list` JSON in any of its shapes.

    Shapes: nothing at all; one object; an array; {"dimms": [...], "regions": [...]} when
    several kinds are listed; several top-level objects (one per bus).
    """
    regions: list[NdRegion] = []
    namespaces: list[NdNamespace] = []
    dimms: list[NdDimm] = []
    pending: list[dict[str, Any]] = []
    try:
        values = _json_values(text)
    except ValueError as e:
        raise GuestError(f"cannot parse `ndctl list` output: {e}: {text[:200]!r}") from e
    for value in values:
        pending.extend(_as_list(value))
    while pending:
        obj = pending.pop(0)
        if any(k in obj for k in ("regions", "dimms", "namespaces")) and "dev" not in obj or "provider" in obj:
            pending.extend(_as_list(obj.get("dimms")))
            pending.extend(_as_list(obj.get("regions")))
            pending.extend(_as_list(obj.get("namespaces")))
            continue
        kind = _classify(obj)
        if kind == "region":
            regions.append(_region(obj))
        elif kind == "namespace":
            namespaces.append(_namespace(obj))
        elif kind == "nmem":
            dimms.append(NdDimm(dev=str(obj["dev"]), handle=_int(obj.get("handle"))))
    return NdctlList(tuple(regions), tuple(namespaces), tuple(dimms))


# --------------------------------------------------------------------------------------------
# /proc/mounts, blkid, fincore, statx


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]

    @property
    def dax(self) -> bool:
        """ext4/xfs show `dax=always` (or plain `dax` on older kernels); `dax=inode/never` is not it."""
        return any(o in ("dax", "dax=always") for o in self.options)


def _unescape_mount_field(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_mounts(text: str) -> tuple[Mount, ...]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        source, target, fstype, options = (_unescape_mount_field(f) for f in fields[:4])
        mounts.append(Mount(source, target, fstype, tuple(options.split(","))))
    return tuple(mounts)


@dataclass(frozen=True)
class Blkid:
    type: str | None
    uuid: str | None
    label: str | None
    usage: str | None


# blkid(8), `-p`: exit 2 "the specified token was not found, or no (specified) devices could be identified"
BLKID_NOTHING_FOUND_RC = 2


@dataclass(frozen=True)
class BlkidFailure:
    """blkid could not say whether the device holds anything: a formatting decision must not rest on it."""

    rc: int | None  # None: the collector recorded no blkid run at all
    stderr: str


def parse_blkid_export(text: str) -> Blkid | None:
    """`blkid -p -o export DEV`; None when it found nothing (empty output, exit status 2)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    if not values.get("TYPE") and not values.get("PTTYPE"):
        return None
    return Blkid(
        type=values.get("TYPE") or values.get("PTTYPE"),
        uuid=values.get("UUID"),
        label=values.get("LABEL"),
        usage=values.get("USAGE"),
    )


def parse_fincore(text: str) -> dict[str, int]:
    """Page-cache pages per file from `fincore --json -o PAGES,FILE` or `fincore -n -o PAGES,FILE`."""
    stripped = text.strip()
    if not stripped:
        return {}
    if stripped.startswith("{"):
        try:
            rows = json.loads(stripped).get("fincore", [])
        except ValueError as e:
            raise GuestError(f"cannot parse fincore output: {e}: {stripped[:200]!r}") from e
        return {str(r["file"]): int(r["pages"]) for r in rows}
    out: dict[str, int] = {}
    for line in stripped.splitlines():
        pages, _, name = line.strip().partition(" ")
        if pages.isdigit() and name.strip():
            out[name.strip()] = int(pages)
    return out


@dataclass(frozen=True)
class Statx:
    mask: int
    blksize: int
    attributes: int
    nlink: int
    uid: int
    gid: int
    mode: int
    ino: int
    size: int
    blocks: int
    attributes_mask: int

    @property
    def dax(self) -> bool:
        return bool(self.attributes & STATX_ATTR_DAX)


# struct statx (linux/stat.h), little-endian x86_64: mask u32, blksize u32, attributes u64,
# nlink u32, uid u32, gid u32, mode u16, pad u16, ino u64, size u64, blocks u64, attributes_mask u64
_STATX_HEAD = struct.Struct("<IIQIIIH2xQQQQ")


def parse_statx(raw: bytes) -> Statx:
    if len(raw) < _STATX_HEAD.size:
        raise GuestError(f"statx buffer too short: {len(raw)} bytes")
    return Statx(*_STATX_HEAD.unpack_from(raw))


# --------------------------------------------------------------------------------------------
# sysfs topology and the whole fact set


@dataclass(frozen=True)
class Mapping:
    dimm: str  # "nmem0"
    offset: int
    length: int
    position: int


def parse_mapping(text: str) -> Mapping | None:
    """/sys/bus/nd/devices/regionN/mappingK: "nmem0,0,536739840,0" (dimm,offset,length,position)."""
    parts = text.strip().split(",")
    if len(parts) != 4 or not parts[0]:
        return None
    offset, length, position = (_int(p) for p in parts[1:])
    if offset is None or length is None or position is None:
        return None
    return Mapping(parts[0], offset, length, position)


@dataclass(frozen=True)
class Region:
    dev: str
    sysfs_path: str  # realpath: .../ACPI0012:00/ndbus0/region0 or .../0000:00:05.0/virtio3/ndbus1/region1
    size_bytes: int
    read_only: bool
    mappings: tuple[Mapping, ...]
    namespaces: tuple[NdNamespace, ...]
    # regionN/target_node: the node the region is placed on (NFIT proximity domain); None when the
    # kernel does not show it, -1 for no node. regionN/numa_node is only the nearest online node.
    target_node: int | None = None
    numa_node: int | None = None
    # sysfs persistence_domain: "cpu_cache" or "memory_controller"; None when the kernel shows none
    # (it hides the attribute when the platform declares neither, as QEMU's NFIT does by default)
    persistence_domain: str | None = None
    start: int | None = None  # regionN/resource: the guest physical address (None: not shown)

    @property
    def active_namespace(self) -> NdNamespace | None:
        active = [ns for ns in self.namespaces if ns.active]
        return max(active, key=lambda ns: ns.size_bytes) if active else None

    @property
    def cxl(self) -> bool:
        """Is this the nd region of a CXL region? (its bus hangs off the CXL nvdimm bridge:
        .../ACPI0017:00/root0/nvdimm-bridge0/ndbus0/region0)"""
        return "/nvdimm-bridge" in self.sysfs_path

    @property
    def pci_path(self) -> tuple[str, ...]:
        """PCI addresses from the root bus down to a virtio-pmem device; () for an NFIT region.

        ("0000:00:10.0", "0000:01:00.0") for a device behind the root port in slot 0x10.
        """
        if "/virtio" not in self.sysfs_path:
            return ()
        return tuple(re.findall(r"/([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])(?=/)", self.sysfs_path))


@dataclass(frozen=True)
class BlockDevice:
    name: str  # "pmem0"
    sysfs_path: str
    size_bytes: int
    read_only: bool
    dax: bool  # /sys/block/X/queue/dax
    fs: Blkid | None  # None: nothing found, or blkid failed (then blkid_failure says why)
    blkid_failure: BlkidFailure | None = None

    @property
    def region(self) -> str | None:
        m = re.search(r"/(region\d+)/", self.sysfs_path)
        return m.group(1) if m else None


@dataclass(frozen=True)
class DaxDevice:
    """A device-dax character device (/dev/daxN.M), from /sys/bus/dax/devices."""

    name: str  # "dax1.0"
    sysfs_path: str  # .../ndbus0/region1/dax1.0/dax1.0
    size_bytes: int
    align_bytes: int | None

    @property
    def region(self) -> str | None:
        m = re.search(r"/(region\d+)/", self.sysfs_path)
        return m.group(1) if m else None


def _daxdev(name: str, raw: dict[str, Any]) -> DaxDevice:
    return DaxDevice(name, str(raw.get("path") or ""), _int(raw.get("size")) or 0, _int(raw.get("align")))


@dataclass(frozen=True)
class StepResult:
    """A command the fact collector ran for the host before reading (a planned step, or modprobe)."""

    command: str
    rc: int
    stderr: str


@dataclass(frozen=True)
class GuestFacts:
    modules: frozenset[str]
    ndctl_error: str | None  # stderr when ndctl failed (missing, ...)
    regions: dict[str, Region]
    dimms: dict[str, NdDimm]  # handle from sysfs nfit/handle, else from ndctl
    blockdevs: dict[str, BlockDevice]
    mounts: tuple[Mount, ...]
    fstab: str
    kernel_log: tuple[str, ...] = ()  # nvdimm-related dmesg lines, for error messages
    steps: tuple[StepResult, ...] = ()  # the round's commands run before reading, in order; stops at a failure
    modprobe: StepResult | None = None  # the collector's own module loading; None when nothing was missing
    daxdevs: dict[str, DaxDevice] = field(default_factory=dict)  # device-dax character devices
    cxl_memdevs: dict[str, int | None] = field(default_factory=dict)  # CXL memdev ("mem0") -> its serial
    cxl_windows: dict[str, tuple[int, int]] = field(default_factory=dict)  # root decoder -> (start, size)
    system_ram: tuple[tuple[int, int], ...] = ()  # /proc/iomem's top-level System RAM, inclusive ranges

    def kernel_lines(self, *words: str) -> tuple[str, ...]:
        return tuple(line for line in self.kernel_log if any(w in line for w in words))

    def mounts_of(self, device: str) -> tuple[Mount, ...]:
        return tuple(m for m in self.mounts if m.source == device)

    def mount_at(self, target: str) -> Mount | None:
        wanted = target.rstrip("/") or "/"
        found = [m for m in self.mounts if m.target == wanted]
        return found[-1] if found else None  # the last one is the visible one


def _region_from_sysfs(name: str, raw: dict[str, Any], nd: dict[str, NdRegion]) -> Region:
    mappings = tuple(m for m in (parse_mapping(t or "") for t in raw.get("mappings") or []) if m)
    listed = nd.get(name)
    return Region(
        dev=name,
        sysfs_path=str(raw.get("path") or ""),
        size_bytes=_int(raw.get("size")) or (listed.size_bytes if listed else 0),
        read_only=raw.get("read_only") == "1",
        mappings=mappings,
        namespaces=listed.namespaces if listed else (),
        target_node=parse_node(raw.get("target_node")),
        numa_node=parse_node(raw.get("numa_node")),
        persistence_domain=raw.get("persistence_domain") or None,
        start=_int(raw.get("resource")),
    )


def parse_node(text: str | None) -> int | None:
    """A sysfs node number ("1\n", "-1" for none); None when absent or not a number."""
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def blkid_verdict(blkid: dict[str, Any]) -> tuple[Blkid | None, BlkidFailure | None]:
    """What a recorded `blkid -p -o export` run says: a signature, nothing (exit 2 only), or a failure.

    Only exit status 2 means "nothing there". Any other non-zero status (8: ambivalent probing
    result, several signatures; 127: blkid missing; 4: usage) means blkid could not tell, and so
    does exit 0 without a TYPE or PTTYPE.
    """
    rc = blkid.get("rc")
    stderr = str(blkid.get("stderr") or "")
    if rc == 0:
        found = parse_blkid_export(str(blkid.get("stdout") or ""))
        if found is None:
            return None, BlkidFailure(0, stderr or "blkid exited 0 but printed no TYPE or PTTYPE")
        return found, None
    if rc == BLKID_NOTHING_FOUND_RC:
        return None, None
    return None, BlkidFailure(_int(rc), stderr or ("no blkid result recorded" if rc is None else ""))


def _blockdev(name: str, raw: dict[str, Any]) -> BlockDevice:
    fs, failure = blkid_verdict(raw.get("blkid") or {})
    return BlockDevice(
        name=name,
        sysfs_path=str(raw.get("path") or ""),
        size_bytes=(_int(raw.get("size_sectors")) or 0) * SECTOR_BYTES,
        read_only=raw.get("ro") == "1",
        dax=raw.get("dax") == "1",
        fs=fs,
        blkid_failure=failure,
    )


def parse_guest_facts(text: str) -> GuestFacts:
    """Facts as JSON text (the captures in tests/unit/fixtures/agent)."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise GuestError(f"the guest's facts are no JSON: {e}: {text[:200]!r}") from e
    return guest_facts(raw)


def guest_facts(raw: dict[str, Any]) -> GuestFacts:
    """What guest/read_facts.py read, with the round's "steps" and "modprobe" (absent: none ran)."""
    if not isinstance(raw, dict):
        raise GuestError(f"the guest's facts are no JSON object: {str(raw)[:200]!r}")
    ndctl_run = raw.get("ndctl") or {}
    ndctl_ok = ndctl_run.get("rc") == 0
    listed = parse_ndctl_list(ndctl_run.get("stdout", "")) if ndctl_ok else NdctlList()
    nd_regions = {r.dev: r for r in listed.regions}
    dimms = {d.dev: d for d in listed.dimms}
    for name, nmem in (raw.get("nmems") or {}).items():
        handle = _int(nmem.get("handle"))
        dimms[name] = NdDimm(name, handle if handle is not None else dimms.get(name, NdDimm(name, None)).handle)
    return GuestFacts(
        modules=frozenset(raw.get("modules") or ()),
        ndctl_error=None if ndctl_ok else (ndctl_run.get("stderr") or f"exit {ndctl_run.get('rc')}").strip(),
        regions={n: _region_from_sysfs(n, r, nd_regions) for n, r in (raw.get("regions") or {}).items()},
        dimms=dimms,
        blockdevs={n: _blockdev(n, b) for n, b in (raw.get("blockdevs") or {}).items()},
        mounts=parse_proc_mounts(raw.get("mounts") or ""),
        fstab=raw.get("fstab") or "",
        kernel_log=tuple(raw.get("kernel_log") or ()),
        steps=tuple(_step_result(r) for r in raw.get("steps") or ()),
        modprobe=_step_result(raw["modprobe"]) if raw.get("modprobe") else None,
        daxdevs={n: _daxdev(n, d) for n, d in (raw.get("daxdevs") or {}).items()},
        cxl_memdevs={n: _int((m or {}).get("serial")) for n, m in (raw.get("cxl_memdevs") or {}).items()},
        cxl_windows={n: (start, size) for n, w in (raw.get("cxl_windows") or {}).items()
                     if (start := _int((w or {}).get("start"))) is not None
                     and (size := _int((w or {}).get("size"))) is not None},
        system_ram=tuple(r for r in (_hex_range(t) for t in raw.get("system_ram") or ()) if r is not None),
    )


def _hex_range(text: str) -> tuple[int, int] | None:
    """/proc/iomem's "start-end" (hex, inclusive)."""
    lo, sep, hi = str(text).partition("-")
    try:
        return (int(lo, 16), int(hi, 16)) if sep else None
    except ValueError:
        return None


def _step_result(raw: dict[str, Any]) -> StepResult:
    rc = _int(raw.get("rc"))
    return StepResult(str(raw.get("command") or ""), rc if rc is not None else -1, str(raw.get("stderr") or ""))


# --------------------------------------------------------------------------------------------
# which guest region is which spec region


def nfit_handle(region: RegionPlan) -> int:
    """QEMU numbers NFIT device handles from the DIMM slot: handle = slot + 1."""
    if region.dimm_slot is None:
        raise GuestError(f"region {region.name}: nvdimm without a dimm slot in the plan")
    return region.dimm_slot + 1


def pci_address(region: RegionPlan) -> str:
    """The address on pcie.0 of the region's device, or of the root port it is plugged into."""
    if region.pci_slot is None:
        raise GuestError(f"region {region.name}: virtio-pmem without a PCI slot in the plan")
    return f"0000:00:{region.pci_slot:02x}.0"


def expected_region_bytes(region: RegionPlan) -> int:
    """What the guest's region should measure: the backing size minus the label area."""
    return region.backing_bytes - (region.label_bytes or 0)


def locate(facts: GuestFacts, region: RegionPlan) -> Region:
    """The guest region of a spec region, by NFIT handle (nvdimm) or PCI address (virtio-pmem).

    Never by enumeration order; the size is cross-checked.
    """
    if region.model == "nvdimm":
        found = _by_handle(facts, nfit_handle(region))
        where = f"NFIT handle {nfit_handle(region):#x} (dimm slot {region.dimm_slot})"
    elif region.model == "cxl":
        # one CXL region per guest (spec rule): the nd region on the CXL nvdimm bridge's bus
        found = [r for r in facts.regions.values() if r.cxl]
        where = "the CXL nvdimm bridge (made by `cxl create-region`)"
    else:
        # The first address under the root bus: the device itself, or the root port it sits behind.
        found = [r for r in facts.regions.values() if r.pci_path[:1] == (pci_address(region),)]
        where = f"virtio-pmem PCI slot {pci_address(region)}"
    if not found:
        seen = ", ".join(sorted(facts.regions)) or "none"
        raise GuestError(
            f"region {region.name}: no guest region at {where} (guest regions: {seen}); "
            "is the device attached and are the nfit/virtio_pmem modules loaded?"
        )
    if len(found) > 1:
        raise GuestError(f"region {region.name}: several guest regions at {where}: {[r.dev for r in found]}")
    guest = found[0]
    expected = expected_region_bytes(region)
    if guest.size_bytes != expected:
        raise GuestError(
            f"region {region.name}: guest {guest.dev} at {where} measures {guest.size_bytes} bytes, "
            f"expected {expected}; the device is not the one the plan describes"
        )
    return guest


def cxl_memdev(facts: GuestFacts, region: RegionPlan) -> str:
    """The guest's name of the CXL region's type-3 device ("mem0"), found by its recorded serial."""
    found = [name for name, serial in facts.cxl_memdevs.items() if serial == region.cxl_serial]
    if len(found) != 1:
        seen = ", ".join(f"{n} (serial {s:#x})" if s is not None else n for n, s in sorted(facts.cxl_memdevs.items()))
        raise GuestError(
            f"region {region.name}: {'no' if not found else 'more than one'} CXL memory device with serial "
            f"{region.cxl_serial or 0:#x} in the guest (it shows: {seen or 'none'}); is the guest kernel's CXL "
            "support (cxl_acpi, cxl_pci, cxl_mem) loaded, and was the domain started with its CXL arguments?"
        )
    return found[0]


def _by_handle(facts: GuestFacts, handle: int) -> list[Region]:
    nmems = {d.dev for d in facts.dimms.values() if d.handle == handle}
    return [r for r in facts.regions.values() if nmems & {m.dimm for m in r.mappings}]


def dimm_of(guest: Region) -> str | None:
    """The nmem behind a (non-interleaved) NFIT region: `ndctl init-labels` takes it."""
    return guest.mappings[0].dimm if len(guest.mappings) == 1 else None


def namespace_of(guest: Region, region: RegionPlan | None = None) -> NdNamespace | None:
    """The namespace of a spec region: the guest region's active one; for a unit of a split region
    (RegionPlan.namespace_name) the active namespace with that name in its label, else None."""
    if region is None or region.namespace_name is None:
        return guest.active_namespace
    named = [ns for ns in guest.namespaces if ns.active and ns.name == region.namespace_name]
    return named[0] if named else None


def blockdev_of(facts: GuestFacts, guest: Region, region: RegionPlan | None = None) -> BlockDevice | None:
    """The region's block device: the active namespace's, else the one under the region in sysfs.
    A unit of a split region has only its own namespace's (the region holds its siblings' too)."""
    ns = namespace_of(guest, region)
    if ns is not None and ns.blockdev and ns.blockdev in facts.blockdevs:
        return facts.blockdevs[ns.blockdev]
    if region is not None and region.namespace_name is not None:
        return None
    under = [b for b in facts.blockdevs.values() if b.region == guest.dev]
    return max(under, key=lambda b: b.size_bytes) if under else None


def daxdev_of(facts: GuestFacts, guest: Region, region: RegionPlan | None = None) -> DaxDevice | None:
    """The region's device-dax character device (a devdax namespace), if the guest shows one."""
    if region is not None and region.namespace_name is not None:
        ns = namespace_of(guest, region)
        return facts.daxdevs.get(ns.chardev) if ns is not None and ns.chardev else None
    under = [d for d in facts.daxdevs.values() if d.region == guest.dev]
    return max(under, key=lambda d: d.size_bytes) if under else None
