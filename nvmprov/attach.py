"""`nvmprov attach` and `nvmprov detach`: persistent memory into (and out of) any libvirt domain.

First a pure check of what the domain can take (attach_problems), or a pure plan of the detach
(plan_detach: steps or problems); when it cannot, nothing is changed and the message says what
must change. On a domain nvmprov manages the region joins the recorded spec (so start/verify know
it) and the in-guest agent formats and verifies it.

Measured on libvirt 9.0 + QEMU 7.2 (GUIDE.md): live nvdimm needs a domain started with an nvdimm
("nvdimm is not enabled: missing 'nvdimm' in '-M'"); virtio-pmem hot-plugs into a free PCIe root
port but a domain with virtio-pmem in its config cannot start; QEMU cannot hot-unplug nvdimms.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pydantic import ValidationError

from . import domain, host, identity, ledger, naming, proof, state, storage, virt
from .errors import GuestError, HostError, UsageError, VirtError
from .managed import plan_from_metadata, ssh_coordinates
from .plan import FIRST_PORT_PCI_SLOT, Filesystem, Model, RegionPlan, label_bytes_for
from .report import GuestReport, Report
from .sizes import DIMM_ALIGN_BYTES, KiB, backing_bytes_for, expected_usable_bytes, format_size, round_up
from .spec import RegionSpec, parse_size
from .uris import pool_dir_for

if TYPE_CHECKING:
    import libvirt

    from .domain import Metadata
    from .plan import Plan
    from .progress import Progress

SUGGESTED_HEADROOM_BYTES = 8 * 1024**3  # what nvmprov gives its own guests (hotplug.headroom)
SUGGESTED_SLOTS = 4
CXL_NO_HOTPLUG = ("--model cxl: a CXL region cannot be attached: there is no CXL hotplug on this stack (libvirt 9.0 "
                  "has no CXL device, QEMU 7.2 builds the CXL topology at start only); put the region in the spec "
                  "with model: cxl and create (or recreate) the guest")


@dataclass(frozen=True)
class AttachRequest:
    region: str
    size_bytes: int
    model: Model = "nvdimm"
    label_bytes: int | None = None
    mode: str | None = None                # nvdimm namespace mode (managed guests); None: fsdax
    align_bytes: int | None = None         # devdax only
    filesystem: Filesystem | None = None   # None: ext4 on managed guests (devdax: none), nothing on others
    mount: str | None = None
    allocation: str = "full"
    live: bool = False                     # resolved targets (see targets())
    config: bool = False
    virtio_pmem_in_config: bool = False    # HostFacts.virtio_pmem_in_config (libvirt >= 9.5)
    numa_node: int = 0                     # the guest NUMA node (nvdimm <target><node>); the domain needs that cell

    @property
    def backing_bytes(self) -> int:
        return backing_bytes_for(self.size_bytes)


# ---------------------------------------------------------------------------------------------
# pure: where the device goes, what stands in the way


def targets(*, live: bool, config: bool, model: Model, running: bool) -> tuple[bool, bool]:
    """(live, config) for the flags given; neither flag: what lasts and works on this domain.

    virtio-pmem never goes into the config by default (libvirt 9.0 cannot start such a domain);
    nvmprov's own guests re-plug it from their metadata on every start instead.
    """
    if live or config:
        return live, config
    if model == "virtio-pmem":
        return running, False
    return running, True


def unplugged_problems(domain_name: str, request: AttachRequest) -> list[str]:
    """A foreign domain where the resolved request goes nowhere (a stopped domain and virtio-pmem,
    which targets() keeps out of the config): refuse, rather than make a volume no device uses.
    nvmprov's own guests are different: their metadata records the region and start plugs it."""
    if request.live or request.config:
        return []
    if request.virtio_pmem_in_config:
        return [f"{domain_name} is not running and virtio-pmem goes live by default: start {domain_name} first, "
                "or pass --config to add it to the config"]
    return [f"virtio-pmem attaches live only on this libvirt: start {domain_name} first"]


def _kib(n: int) -> int:
    return n // KiB


def attach_problems(domain_xml: str, request: AttachRequest, running: bool) -> list[str]:
    """What keeps REQUEST from working on this domain, each with the change that fixes it.

    DOMAIN_XML is the live XML when `running` (for request.live) or the persistent one. Empty: go.
    """
    d = domain.parse(domain_xml)
    name = d.name
    problems: list[str] = []
    if request.live and not running:
        problems.append(f"domain {name} is not running: --live needs a running domain; drop --live to add the "
                        "region to its config (it appears at the next start)")
    problems += _memory_problems(d, request)
    if request.model == "nvdimm" and request.live and running and not d.has_nvdimm:
        problems.append(
            f"domain {name} was started without an nvdimm, so QEMU has nvdimm support off (\"nvdimm is not enabled: "
            "missing 'nvdimm' in '-M'\") and cannot take one live: use --model virtio-pmem (hot-plugs into the "
            f"running domain), or attach the nvdimm with --config and power-cycle {name} (virsh destroy + start)"
        )
    if request.model == "virtio-pmem":
        problems += _virtio_pmem_problems(d, request)
    if request.model != "nvdimm" and request.label_bytes is not None:
        problems.append("--label is for nvdimm only; drop it or use --model nvdimm")
    problems += _node_problems(d, request)
    if d.device(f"ua-pmem-{request.region}") is not None:
        problems.append(f"domain {name} already has a region named {request.region} (alias ua-pmem-{request.region}); "
                        "choose another --name")
    return problems


def _memory_problems(d: domain.DomainFacts, request: AttachRequest) -> list[str]:
    name = d.name
    problems = []
    after = "; power the domain off and start it again for it to take effect" if request.live else ""
    if not d.acpi:
        problems.append(f"domain {name} has no ACPI and QEMU refuses memory hotplug without it: add <acpi/> under "
                        f"<features> (virsh edit {name}){after}")
    need_max = round_up(d.ram_bytes + d.device_bytes + request.backing_bytes + SUGGESTED_HEADROOM_BYTES,
                        DIMM_ALIGN_BYTES)
    if d.max_memory_bytes == 0:
        problems.append(
            f"domain {name} has no <maxMemory>, which memory devices need: add "
            f"<maxMemory slots='{len(d.devices) + SUGGESTED_SLOTS}' unit='KiB'>{_kib(need_max)}</maxMemory> "
            f"(RAM + regions + {format_size(SUGGESTED_HEADROOM_BYTES)} headroom) with virsh edit {name}{after}"
        )
    else:
        if d.free_slots < 1:
            problems.append(f"all {d.slots} memory slots of domain {name} are taken: raise <maxMemory slots=...> to "
                            f"{d.slots + SUGGESTED_SLOTS} (virsh edit {name}){after}, or detach a region")
        if d.headroom_bytes < request.backing_bytes:
            problems.append(
                f"domain {name}'s maxMemory ({d.max_memory_bytes} bytes) leaves {d.headroom_bytes} bytes beside RAM "
                f"and its regions, the region needs {request.backing_bytes}: raise <maxMemory> to at least "
                f"{_kib(d.ram_bytes + d.device_bytes + request.backing_bytes)} KiB (virsh edit {name}){after}, "
                "or ask for a smaller --size"
            )
    if d.numa_cells == 0:
        problems.append(f"domain {name} has no NUMA cell and memory devices need one to land in: add "
                        f"<numa><cell id='0' cpus='0-N' memory='{_kib(d.ram_bytes)}' unit='KiB'/></numa> under <cpu> "
                        f"(virsh edit {name}){after}")
    return problems


def _node_problems(d: domain.DomainFacts, request: AttachRequest) -> list[str]:
    """--numa-node: an nvdimm only (libvirt 9.0 refuses a node on virtio-pmem), and a node the domain has."""
    if request.numa_node == 0:
        return []   # node 0: the default, and what libvirt gives a device without <node>
    if request.model != "nvdimm":
        return ["--numa-node is for nvdimm only: libvirt 9.0 refuses a NUMA node on virtio-pmem (\"virtio-pmem "
                "does not support NUMA nodes\"; QEMU 7.2's virtio-pmem-pci has none); drop it or use --model nvdimm"]
    if d.numa_cells == 0 or d.cell(request.numa_node) is not None:
        return []   # no cell at all is reported by _memory_problems
    have = ", ".join(str(c.id) for c in d.cells)
    return [f"domain {d.name} has no NUMA node {request.numa_node} (its nodes: {have}) and a memory device lands in "
            f"an existing one: use --numa-node {have.split(', ')[-1]} or lower; nodes are fixed at start, so more need "
            f"another <cell> under <cpu><numa> (virsh edit {d.name}, then power it off and start it; an nvmprov guest: "
            "numa_nodes: in its spec, recreated)"]


def _virtio_pmem_problems(d: domain.DomainFacts, request: AttachRequest) -> list[str]:
    problems = []
    if request.config and not request.virtio_pmem_in_config:
        problems.append(
            f"this libvirt cannot start a domain with virtio-pmem in its config (\"virtio-pmem memory device info is "
            f"not handled yet\"), so --config would leave {d.name} unbootable: attach it --live (it lasts until the "
            "domain stops), or use --model nvdimm --config"
        )
    if d.q35 and not d.free_root_ports:
        problems.append(
            f"domain {d.name} has no free hot-pluggable pcie-root-port and pcie.0 itself does not support hotplug: "
            f"add <controller type='pci' model='pcie-root-port'/> (virsh edit {d.name}), power it off and start it "
            "again; nvmprov's own guests carry spare ports (hotplug.slots)"
        )
    return problems


def volume_name(domain_name: str, region: str) -> str:
    """The backing volume of a region attached to a domain nvmprov did not make: one per (domain,
    region), never another's (naming.foreign_backing_volume escapes, it does not fold)."""
    volume = naming.foreign_backing_volume(domain_name, region)
    if naming.too_long(volume):
        raise UsageError(f"the volume name for domain {domain_name!r} would be {len(volume.encode())} bytes, more than "
                         "a file name takes; rename the domain (virsh domrename) or give a shorter --name")
    return volume


def foreign_region_plan(d: domain.DomainFacts, request: AttachRequest, volume: str) -> RegionPlan:
    """The region of a domain nvmprov did not make: the first free DIMM slot or root port."""
    label = label_bytes_for(request.label_bytes)
    dimm_slot = d.free_dimm_slot() if request.model == "nvdimm" else None
    port = d.free_root_ports[0] if request.model == "virtio-pmem" and d.free_root_ports else None
    return RegionPlan(
        name=request.region, model=request.model, size_bytes=request.size_bytes, backing_bytes=request.backing_bytes,
        label_bytes=label, readonly=False, host_pmem=False, allocation=request.allocation,  # type: ignore[arg-type]
        filesystem="none", mount=None, volume=volume, alias=f"ua-pmem-{request.region}",
        dimm_slot=dimm_slot if request.model == "nvdimm" else None,
        pci_slot=(port.slot if port and port.slot is not None else FIRST_PORT_PCI_SLOT) if port else None,
        pci_bus=port.index if port else None,
        expected_usable_bytes=expected_usable_bytes(request.model, request.backing_bytes, label),
        numa_node=request.numa_node if request.model == "nvdimm" else 0,
    )


def placement_problems(d: domain.DomainFacts, region: RegionPlan) -> list[str]:
    """A managed guest's plan puts the region at a fixed slot/port: is it free in the domain?"""
    if region.model == "nvdimm" and any(x.dimm_slot == region.dimm_slot for x in d.devices):
        return [f"DIMM slot {region.dimm_slot} that the recorded spec gives region {region.name} is taken in domain "
                f"{d.name} (a device nvmprov did not record); detach that device first"]
    if region.model == "virtio-pmem" and d.q35 and region.pci_bus not in {p.index for p in d.free_root_ports}:
        return [f"root port {region.pci_bus} that the recorded spec gives region {region.name} is not a free "
                f"hot-pluggable pcie-root-port in domain {d.name}; every spare port is used (hotplug.slots)"]
    return []


def managed_spec_json(spec_json: str, region: dict[str, object], backing_bytes: int) -> str:
    """The recorded spec with the region appended and the hotplug reserve it used taken off, so the
    rebuilt plan keeps the domain's slot count and maxMemory."""
    data = json.loads(spec_json)
    data["pmem"].append(region)
    hp = data.setdefault("hotplug", {})
    hp["slots"] = max(int(hp.get("slots", SUGGESTED_SLOTS)) - 1, 0)
    headroom = parse_size(hp.get("headroom", "8GiB"), allow_zero=True)
    hp["headroom"] = format_size(max(headroom - backing_bytes, 0))
    return json.dumps(data, separators=(",", ":"))


def region_spec(request: AttachRequest, *, managed: bool) -> dict[str, object]:
    """The region as a spec entry (YAML keys), validated by the spec's own rules (UsageError)."""
    raw: dict[str, object] = {"name": request.region, "size": format_size(request.size_bytes),
                              "model": request.model, "allocation": request.allocation}
    if request.filesystem is not None or not managed:
        raw["filesystem"] = request.filesystem or "none"
    if request.label_bytes is not None:
        raw["label"] = format_size(request.label_bytes)
    if request.mode is not None:
        raw["mode"] = request.mode
    if request.align_bytes is not None:
        raw["align"] = format_size(request.align_bytes)
    if request.mount is not None:
        raw["mount"] = request.mount
    if request.numa_node != 0:
        raw["numa_node"] = request.numa_node
    try:
        return RegionSpec.model_validate(raw).model_dump(mode="json", by_alias=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = err.get("ctx", {}).get("error")
        loc = (*err["loc"], *getattr(cause, "loc", ()))  # a cross-field rule names its key (spec._Problem)
        key = ".".join(str(p) for p in loc) or "region"
        msg = str(cause if cause is not None else err["msg"]).removeprefix("Value error, ").removeprefix(f"{key} ")
        where = key.replace("_", "-")  # the option's spelling: numa_node -> --numa-node
        raise UsageError(f"--{where}: {msg}") from None


# ---------------------------------------------------------------------------------------------
# detach, pure


def nvdimm_unplug_problem(domain_name: str, region: str) -> str:
    return (f"QEMU cannot hot-unplug an nvdimm (\"nvdimm device hot unplug is not supported yet\"): "
            f"`nvmprov detach {domain_name} {region} --config` drops {region} from the config; it leaves the guest "
            "at the next power-off and start")


@dataclass(frozen=True)
class Unplug:
    """Take the device out of the running domain (QEMU 7.2 refuses virtio-pmem: see _unplug_live)."""

    device_xml: str
    region: str
    managed: bool               # the guest is nvmprov's: the refusal names `detach --config`


@dataclass(frozen=True)
class DropFromConfig:
    """Take the device out of the persistent definition: it leaves at the next power-off and start."""

    device_xml: str


@dataclass(frozen=True)
class Unrecord:
    """Rewrite nvmprov's metadata with this recorded spec (the region gone, its slot given back)."""

    spec_json: str


@dataclass(frozen=True)
class PurgeVolume:
    """Delete the backing volume if, when the step runs, no domain uses it and nvmprov made it for
    this domain (ledger.may_delete); an adopted one only with --purge-adopted."""

    pool: str
    volume: str
    path: str                   # "" when no XML names it (a stopped guest's virtio-pmem)
    adopted: bool
    made: tuple[str, ...]       # the volumes the guest's metadata lists as made (guests older than the ledger)


DetachStep = Unplug | DropFromConfig | Unrecord | PurgeVolume
_STEP_TARGETS = {Unplug: "live", DropFromConfig: "config", Unrecord: "metadata"}


@dataclass(frozen=True)
class DetachPlan:
    """What detach does, in order, or why it must not (problems: nothing is done)."""

    domain: str
    region: str
    steps: tuple[DetachStep, ...] = ()
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # said after the steps, before what the purge finds
    volume: str | None = None

    @property
    def targets(self) -> list[str]:
        """What the region leaves: "live", "config", "metadata" (DetachResult.detached)."""
        return [_STEP_TARGETS[type(s)] for s in self.steps if type(s) in _STEP_TARGETS]


def plan_detach(live_xml: str, config_xml: str, md: Metadata | None, region: str, *, running: bool, live: bool,
                config: bool, purge: ledger.Purge) -> DetachPlan:
    """The steps that take REGION out of a domain, or the problems that stop it (pure).

    LIVE_XML and CONFIG_XML: the domain's current and persistent XML; MD: nvmprov's metadata (None:
    a domain nvmprov did not make). Neither flag: wherever the region is. A managed guest's
    virtio-pmem is never in the config: its record is nvmprov's metadata (start re-plugs it).
    """
    name, alias = domain.parse(config_xml).name, f"ua-pmem-{region}"
    recorded = next((r for r in md.regions if r.name == region), None) if md else None
    problems = _recorded_problems(name, region, md, recorded)
    if problems:
        return DetachPlan(name, region, problems=tuple(problems))
    live_dev = domain.device_xml(live_xml, alias) if running else None
    config_dev = domain.device_xml(config_xml, alias)
    if not (live or config):
        live, config = live_dev is not None, config_dev is not None
    metadata_only = recorded is not None and recorded.model == "virtio-pmem"
    found = domain.parse(live_xml).device(alias) or domain.parse(config_xml).device(alias)
    model = found.model if found else recorded.model if recorded else None
    problems = _live_problems(name, region, running=running, model=model, found=live_dev is not None) if live else []
    if config and not metadata_only and config_dev is None:
        problems.append(f"the config of domain {name} has no region {region} (alias {alias}); "
                        f"`nvmprov show {name}` lists its regions")
    if not (live or config) and recorded is None:
        problems.append(f"domain {name} has no region {region} (alias {alias}); `nvmprov show {name}` lists them")
    if problems:
        return DetachPlan(name, region, problems=tuple(problems))

    steps: list[DetachStep] = []
    notes: list[str] = []
    if live:
        steps.append(Unplug(live_dev or "", region, managed=recorded is not None))
    if config and not metadata_only:
        steps.append(DropFromConfig(config_dev or ""))
        if running and not live:
            notes.append(f"{region} stays in the running guest until {name} is powered off")
    if recorded is not None and md is not None:
        steps.append(Unrecord(managed_spec_without(md.spec_json or "{}", recorded)))
        if metadata_only and running and not live:
            notes.append(f"{region} stays in the running guest until {name} is powered off; the next start "
                         "does not plug it")
    path = _path_of(live_xml if live else config_xml, alias) or ""
    volume = recorded.volume if recorded else (path.rsplit("/", 1)[-1] or None)
    if volume is not None and purge.volumes:
        made = tuple(v for v, _kind in md.volumes) if md else ()
        steps.append(PurgeVolume(md.pool if md else "nvmprov", volume, path, purge.adopted, made))
    elif volume is not None:
        notes.append(f"kept the backing volume {volume} (its data); `detach --purge --yes` or `nvmprov prune` "
                     "deletes it once no domain uses it")
    return DetachPlan(name, region, tuple(steps), notes=tuple(notes), volume=volume)


def _recorded_problems(name: str, region: str, md: Metadata | None, recorded: RegionPlan | None) -> list[str]:
    """A managed guest: the region must be in its record, and the last of its model there."""
    if md is None:
        return []
    if md.spec_json is None:  # a guest made before the metadata held its spec: no plan to rebuild
        return [f"the nvmprov metadata of guest {name} holds no spec; recreate it with this nvmprov"]
    if recorded is None:
        return [f"guest {name} has no region {region} ({', '.join(r.name for r in md.regions) or 'none'})"]
    if recorded.model == "cxl":  # its devices are QEMU arguments in <qemu:commandline>, set at start
        return [f"{region} is a CXL region and there is no CXL hot-unplug on this stack (libvirt 9.0 has no CXL "
                f"device, QEMU 7.2 builds the CXL topology at start only): take it out of {name}'s spec and "
                "recreate the guest"]
    if not _last_of_model(md, recorded):
        return [f"nvmprov places {recorded.model} regions by their order in the guest's spec; removing {region} "
                f"would move the later ones: detach the later {recorded.model} regions first (or destroy and "
                "re-create)"]
    return []


def _live_problems(name: str, region: str, *, running: bool, model: str | None, found: bool) -> list[str]:
    if not running:
        return [f"domain {name} is not running: drop --live (detach --config removes {region} from its config)"]
    if model == "nvdimm":
        return [nvdimm_unplug_problem(name, region)]
    if not found:
        return [f"the running domain {name} has no region {region} (alias ua-pmem-{region}); "
                f"`nvmprov show {name}` lists its regions"]
    return []


def detach_device(dom: libvirt.virDomain, device_xml: str, *, live: bool, config: bool) -> None:
    import libvirt

    flags = (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0) | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0)
    try:
        dom.detachDeviceFlags(device_xml, flags)
    except libvirt.libvirtError as exc:
        raise VirtError(f"detaching a device from {dom.name()}: {exc.get_error_message()}") from None



def _a(model: str) -> str:
    return f"an {model}" if model == "nvdimm" else f"a {model}"


def refuse(what: str, problems: list[str]) -> UsageError:
    return UsageError(f"{what}; nothing was changed:\n" + "\n".join(f"- {p}" for p in problems))


# ---------------------------------------------------------------------------------------------
# attach: side effects


def attach(conn: libvirt.virConnect, name: str, request: AttachRequest, progress: Progress) -> Report:
    """Attach one region to domain NAME; `request.live/config` as the user gave them (both False:
    the default for this domain, see targets())."""
    hv = identity.of(conn)  # once per command: a round trip over qemu+ssh
    with domain_lock(conn, name, hv):  # before reading what will change, foreign domains included
        dom = virt.require(conn, name)
        if not request.region:
            request = with_default_name(dom, request)
        md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
        if md is None:
            return _attach_foreign(conn, hv, dom, request, progress)
        return _attach_managed(conn, hv, dom, md, request, progress)


@contextlib.contextmanager
def domain_lock(conn: libvirt.virConnect, name: str, hv: identity.Hypervisor) -> Iterator[None]:
    """The lock of domain NAME on HV: a guest name's own lock (the one create and destroy take), or,
    for a name nvmprov would not give a guest, a lock under its escaped name."""
    if state.valid_name(name):
        with state.lock(name, hv=hv):
            yield
    else:
        with state.lock(naming.escape(name)[:200], what="domain", hv=hv):
            yield


def _resolve(dom: libvirt.virDomain, request: AttachRequest, conn: libvirt.virConnect) -> tuple[AttachRequest, bool]:
    running = virt.is_active(dom)
    live, config = targets(live=request.live, config=request.config, model=request.model, running=running)
    in_config = host.facts(conn, "").virtio_pmem_in_config
    return replace(request, live=live, config=config, virtio_pmem_in_config=in_config), running


def _problems(dom: libvirt.virDomain, request: AttachRequest, running: bool) -> list[str]:
    """Checked against each XML the request changes (live and/or persistent)."""
    problems: list[str] = []
    if request.live or running:
        problems += attach_problems(virt.xml_desc(dom), replace(request, config=False), running)
    if request.config or not request.live:
        more = attach_problems(virt.xml_desc(dom, inactive=True), replace(request, live=False), False)
        problems += [p for p in more if p not in problems]
    return problems


def _pool(conn: libvirt.virConnect, pool_name: str) -> tuple[libvirt.virStoragePool, str]:
    # with the URI: on qemu:///session a missing pool goes under the user's XDG dirs, not /var/lib
    pool = storage.ensure_pool(conn, pool_name, pool_dir_for(pool_name, conn.getURI()))
    return pool, storage.pool_path(pool)


def _check_volume_free(conn: libvirt.virConnect, path: str, volume: str) -> None:
    users = virt.path_users(conn, [path])[path]
    if users:
        raise HostError(f"backing volume {volume} is used by domain(s) {', '.join(users)}; choose another --name "
                        "or detach it there first")


def _make_backing(dom: libvirt.virDomain, hv: str, pool: libvirt.virStoragePool, region: RegionPlan,
                  progress: Progress) -> bool:
    """Create the region's volume (create's rules: full allocation, 0600, exclusive, recorded as made
    for this domain); True when this run made it. An existing one is used only when nvmprov made it
    for this domain (a region detached earlier, its data kept); anything else is refused. HV: the
    key of the hypervisor the domain is on."""
    owner = dom.name()
    if storage.make_backing(pool, region.volume, region.backing_bytes, allocation=region.allocation) is not None:
        ledger.record(pool, ledger.Entry(region.volume, owner, hv, "backing"))
        progress.line(f"region {region.name}: created backing volume {region.volume} ({region.backing_bytes} bytes)")
        return True
    if not ledger.may_delete(ledger.read(pool).get(region.volume), hv, owner):
        raise HostError(ledger.in_the_way(pool, region.volume, f"domain {owner}", region.name, attach=True))
    storage.check_reusable(pool, storage.volume(pool, region.volume), region.backing_bytes)
    progress.line(f"region {region.name}: reusing its own backing volume {region.volume} ({region.backing_bytes} "
                  "bytes)")
    return False


def _plug(dom: libvirt.virDomain, pool: libvirt.virStoragePool, region: RegionPlan, pool_dir: str, made: bool, *,
          hv: str, live: bool, config: bool, progress: Progress) -> None:
    """Attach the device; a failure removes the volume this run made (for HV's domain)."""
    if not (live or config):
        return
    try:
        with progress.phase("attach", f"{region.model} {region.name} ({'live' if live else ''}"
                                      f"{'+' if live and config else ''}{'config' if config else ''})"):
            virt.attach(dom, domain.region_device_xml(region, pool_dir), live=live, config=config)
    except BaseException:
        if made:
            storage.delete(pool, region.volume)
            ledger.forget(pool, hv, [region.volume])
            progress.line(f"rolled back: volume {region.volume}")
        raise


def _where(live: bool, config: bool) -> str:
    return "+".join(w for w, on in (("live", live), ("config", config)) if on) or "recorded"


def _attach_foreign(conn: libvirt.virConnect, hv: identity.Hypervisor, dom: libvirt.virDomain,
                    request: AttachRequest, progress: Progress) -> Report:
    name = dom.name()
    if request.filesystem not in (None, "none") or request.mount:
        raise UsageError(f"--filesystem/--mount need a guest nvmprov manages (it logs in with its own key); {name} "
                         "is not one: attach without them and format the device inside the guest")
    if request.mode is not None or request.align_bytes is not None:
        # The mode is the guest's: QEMU only plugs the NVDIMM, the guest's ndctl makes the namespace.
        raise UsageError(f"--mode/--align need a guest nvmprov manages (the namespace is made inside the guest, "
                         f"QEMU has no say in it); {name} is not one: attach without them and run "
                         f"`ndctl create-namespace -f -e namespaceN.0 -m {request.mode or 'MODE'}` in the guest")
    region_spec(request, managed=False)  # the spec's rules for name, size and label
    request, running = _resolve(dom, request, conn)
    problems = unplugged_problems(name, request) or _problems(dom, request, running)
    if problems:
        raise refuse(f"domain {name} cannot take {_a(request.model)} region this way", problems)
    pool, pool_dir = _pool(conn, "nvmprov")
    volume = volume_name(name, request.region)
    _check_volume_free(conn, f"{pool_dir}/{volume}", volume)
    facts = domain.parse(virt.xml_desc(dom, inactive=not request.live))
    region = foreign_region_plan(facts, request, volume)
    with state.pool_lock(hv.key, pool.name()):  # held against prune until a domain uses it
        made = _make_backing(dom, hv.key, pool, region, progress)
        _plug(dom, pool, region, pool_dir, made, hv=hv.key, live=request.live, config=request.config,
              progress=progress)
    g = GuestReport(name=name, timings_s=dict(progress.timings_s))
    g.regions.append({
        "name": region.name, "model": region.model, "size_bytes": region.size_bytes,
        "usable_bytes": region.expected_usable_bytes, "backing_path": f"{pool_dir}/{volume}",
        "alias": region.alias, "attached": _where(request.live, request.config), "guest_device": None,
        "numa_node": region.numa_node if region.model == "nvdimm" else None,
    })
    if request.live and not request.config:
        g.notes.append(f"attached live only: the region leaves {name} when it stops; attach it again after a start")
    if request.config and not request.live:
        g.notes.append(f"in the config only: the region appears after {name} is powered off and started")
    g.notes.append(f"{name} is not managed by nvmprov: format the device inside the guest (no agent ran)")
    g.settle()
    return Report(guests=[g])


def _managed_plan(conn: libvirt.virConnect, md: Metadata, request: AttachRequest) -> tuple[Plan, str]:
    if md.spec_json is None:
        raise HostError("the nvmprov metadata of this domain holds no spec; recreate it with this nvmprov")
    entry = region_spec(request, managed=True)
    spec_json = managed_spec_json(md.spec_json, entry, request.backing_bytes)
    try:
        return plan_from_metadata(conn, replace(md, spec_json=spec_json)), spec_json
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err.get("ctx", {}).get("error", err["msg"])).removeprefix("Value error, ")
        raise UsageError(f"region {request.region}: {msg}") from None


def _attach_managed(conn: libvirt.virConnect, hv: identity.Hypervisor, dom: libvirt.virDomain, md: Metadata,
                    request: AttachRequest, progress: Progress) -> Report:
    name = dom.name()
    if any(r.name == request.region for r in md.regions):
        raise UsageError(f"guest {name} already has a region named {request.region}; choose another --name")
    asked_config = request.config
    request, running = _resolve(dom, request, conn)
    notes = []
    if request.model == "virtio-pmem":
        # Recorded in nvmprov's metadata instead: `nvmprov start` hot-plugs it after every start.
        request = replace(request, config=False)
        if asked_config:
            notes.append("virtio-pmem is kept in nvmprov's metadata, not the libvirt config: nvmprov start "
                         "hot-plugs it after every start")
    # before the recorded spec's own rule, which would name the spec key instead of --numa-node
    node_problems = _node_problems(domain.parse(virt.xml_desc(dom, inactive=not request.live)), request)
    if node_problems:
        raise refuse(f"guest {name} cannot take {_a(request.model)} region this way", node_problems)
    new_plan, spec_json = _managed_plan(conn, md, request)
    region = new_plan.region(request.region)
    problems = _problems(dom, request, running)
    for xml in {virt.xml_desc(dom), virt.xml_desc(dom, inactive=True)}:
        problems += [p for p in placement_problems(domain.parse(xml), region) if p not in problems]
    if problems:
        raise refuse(f"guest {name} cannot take {_a(request.model)} region this way", problems)
    pool, pool_dir = _pool(conn, md.pool)
    _check_volume_free(conn, f"{pool_dir}/{region.volume}", region.volume)
    with state.pool_lock(hv.key, pool.name()):  # held against prune until a domain uses it
        made = _make_backing(dom, hv.key, pool, region, progress)
        _plug(dom, pool, region, pool_dir, made, hv=hv.key, live=request.live, config=request.config,
              progress=progress)
    new_md = replace(md, spec_json=spec_json, spec_digest=new_plan.spec_digest, regions=new_plan.regions)
    if made:
        new_md = new_md.with_volume(region.volume, "backing")
    virt.set_metadata(dom, domain.metadata_xml(new_md), key=domain.METADATA_PREFIX, uri=domain.METADATA_NS)
    files = state.adopt_legacy(name, hv, dom.UUIDString())
    state.write_private(files.spec_json, spec_json)
    progress.line(f"region {region.name}: recorded in {name}'s metadata (spec digest {new_plan.spec_digest[:12]})")
    g = GuestReport(name=name, accel=new_plan.accel, notes=notes,
                    ssh=ssh_coordinates(files, md.ssh_port, md.ssh_user))
    if request.live:  # the proof can only reach a region the running guest has
        _run_agent(proof.GuestRun(conn, new_plan, files, progress, g, dom=dom), region)
    elif running:
        g.notes.append(f"{region.name} is in {name}'s config only: it appears after `nvmprov stop {name}` and "
                       f"`nvmprov start {name}`; `nvmprov verify {name}` then formats and checks it")
    else:
        g.notes.append(f"{name} is not running: `nvmprov start {name}` then `nvmprov verify {name}` formats and "
                       "checks the region")
    g.timings_s = dict(progress.timings_s)
    g.settle()
    return Report(guests=[g])


def _run_agent(run: proof.GuestRun, region: RegionPlan) -> None:
    """The proof on the new region only (the others stay as they are); it is new: made=True."""
    try:
        proof.prove(run, only=(region,), made=True)
    except GuestError as exc:
        run.report.fail("agent", f"{exc} (the region stays attached and recorded; `nvmprov verify {run.plan.name}` "
                                 "retries)")


# ---------------------------------------------------------------------------------------------
# detach: side effects

DETACH_DEADLINE_S = 30.0   # the guest must release a virtio-pmem device (PCIe hot-unplug handshake)
DETACH_POLL_S = 0.5


def _wait_gone(dom: libvirt.virDomain, alias: str, deadline_s: float) -> bool:
    import time

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if domain.device_xml(virt.xml_desc(dom), alias) is None:
            return True
        time.sleep(DETACH_POLL_S)
    return domain.device_xml(virt.xml_desc(dom), alias) is None


def managed_spec_without(spec_json: str, region: RegionPlan) -> str:
    """The recorded spec without REGION, its slot and headroom given back to the hotplug reserve."""
    data = json.loads(spec_json)
    data["pmem"] = [r for r in data["pmem"] if r["name"] != region.name]
    hp = data.setdefault("hotplug", {})
    hp["slots"] = int(hp.get("slots", SUGGESTED_SLOTS)) + 1
    hp["headroom"] = format_size(parse_size(hp.get("headroom", "8GiB"), allow_zero=True) + region.backing_bytes)
    return json.dumps(data, separators=(",", ":"))


def _last_of_model(md: Metadata, region: RegionPlan) -> bool:
    same = [r.name for r in md.regions if r.model == region.model]
    return bool(same) and same[-1] == region.name


@dataclass
class DetachResult:
    domain: str
    region: str
    detached: list[str]          # "live", "config", "metadata"
    volume: str | None
    volume_deleted: bool
    notes: list[str]


def detach(conn: libvirt.virConnect, name: str, region: str, *, live: bool, config: bool, purge: ledger.Purge,
           progress: Progress) -> DetachResult:
    hv = identity.of(conn)
    with domain_lock(conn, name, hv):  # before reading what will change, foreign domains included
        dom = virt.require(conn, name)
        md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
        return _detach(conn, hv.key, dom, md, region, live=live, config=config,
                       purge=purge, progress=progress)


def _detach(conn: libvirt.virConnect, hv: str, dom: libvirt.virDomain, md: Metadata | None, region: str, *, live: bool,
            config: bool, purge: ledger.Purge, progress: Progress) -> DetachResult:
    """plan_detach, then its steps in order; a step that fails stops the rest."""
    running = virt.is_active(dom)
    the_plan = plan_detach(virt.xml_desc(dom), virt.xml_desc(dom, inactive=True), md, region, running=running,
                           live=live, config=config, purge=purge)
    if the_plan.problems:
        raise refuse(f"cannot detach {region} from {the_plan.domain}", list(the_plan.problems))
    notes = list(the_plan.notes)
    deleted = False
    for step in the_plan.steps:
        deleted = _carry_out(conn, hv, dom, md, step, notes, progress) or deleted
    progress.line(f"{region}: detached ({', '.join(the_plan.targets)})")
    return DetachResult(the_plan.domain, region, the_plan.targets, the_plan.volume, deleted, notes)


def _carry_out(conn: libvirt.virConnect, hv: str, dom: libvirt.virDomain, md: Metadata | None, step: DetachStep,
               notes: list[str], progress: Progress) -> bool:
    """One step of a detach plan; True when it deleted the backing volume."""
    name = dom.name()
    if isinstance(step, Unplug):
        with progress.phase("detach", f"{step.region} from the running domain"):
            _unplug_live(dom, step.device_xml, step.region, managed=step.managed)
            if not _wait_gone(dom, f"ua-pmem-{step.region}", DETACH_DEADLINE_S):
                raise VirtError(f"the guest of {name} did not release {step.region} within {DETACH_DEADLINE_S:.0f}s "
                                "(PCIe hot-unplug needs the guest's cooperation); nothing else was changed")
    elif isinstance(step, DropFromConfig):
        detach_device(dom, step.device_xml, live=False, config=True)
    elif isinstance(step, Unrecord) and md is not None:
        new_plan = _plan_for(conn, md, step.spec_json)
        new_md = replace(md, spec_json=step.spec_json, spec_digest=new_plan.spec_digest, regions=new_plan.regions)
        virt.set_metadata(dom, domain.metadata_xml(new_md), key=domain.METADATA_PREFIX, uri=domain.METADATA_NS)
    elif isinstance(step, PurgeVolume):
        return _maybe_purge(conn, step.pool, step.volume, step.path, ledger.Purge(volumes=True, adopted=step.adopted),
                            notes, owner=(hv, name, step.made))
    return False


def _unplug_live(dom: libvirt.virDomain, device_xml: str, region: str, *, managed: bool) -> None:
    try:
        detach_device(dom, device_xml, live=True, config=False)
    except VirtError as exc:
        if "cannot be unplugged" not in str(exc):
            raise
        # QEMU 7.2: "virtio based memory devices cannot be unplugged" (measured here).
        later = (f"`nvmprov detach {dom.name()} {region} --config` drops it from nvmprov's record, so the next "
                 "start does not plug it again" if managed else "it was attached live only, so it goes when the "
                 "domain stops")
        raise VirtError(f"QEMU refuses to hot-unplug virtio-pmem ({exc}); {region} stays in the running guest: "
                        f"{later}") from None


def _plan_for(conn: libvirt.virConnect, md: Metadata, spec_json: str) -> Plan:
    return plan_from_metadata(conn, replace(md, spec_json=spec_json))


def _path_of(domain_xml: str, alias: str) -> str | None:
    d = domain.parse(domain_xml).device(alias)
    return d.path if d else None


def _maybe_purge(conn: libvirt.virConnect, pool_name: str, volume: str | None, path: str, purge: ledger.Purge,
                 notes: list[str], *, owner: tuple[str, str, tuple[str, ...]]) -> bool:
    """Delete the region's volume when asked, no domain uses it and nvmprov made it for this domain
    (the ledger, or the guest's metadata for guests made before it); an adopted one only when asked."""
    if volume is None or not purge.volumes:
        return False
    users = virt.path_users(conn, [path])[path] if path else []
    if users:
        notes.append(f"kept {volume}: still used by {', '.join(users)} (until powered off); `nvmprov prune` "
                     "removes it later")
        return False
    pool = storage.pool_of(conn, pool_name)
    if path and not path.startswith(storage.pool_path(pool) + "/"):
        notes.append(f"kept {path}: it is not in nvmprov's pool {pool_name}")
        return False
    hv, name, made = owner  # hypervisor key, domain, volumes its metadata lists as made
    entry = ledger.read(pool).get(volume)
    ours = ledger.may_delete(entry, hv, name, adopted_too=purge.adopted) or (entry is None and volume in made)
    if not ours:
        why = ("the spec adopted it (volume:); --purge-adopted deletes it" if entry is not None and entry.adopted
               else f"nvmprov did not make it for {name}, and deletes only its own")
        notes.append(f"kept {volume}: {why}")
        return False
    deleted = storage.delete(pool, volume)
    ledger.forget(pool, hv, [volume])
    return deleted


def with_default_name(dom: libvirt.virDomain, request: AttachRequest) -> AttachRequest:
    """--name not given: hp0, hp1, ... the first not used by the domain (read under its lock)."""
    config_xml = virt.xml_desc(dom, inactive=True)
    d, live = domain.parse(config_xml), domain.parse(virt.xml_desc(dom))
    md = domain.parse_metadata(config_xml)
    # virtio-pmem regions of a stopped managed guest are only in its metadata
    taken = {x.alias for x in (*d.devices, *live.devices)} | {r.alias for r in (md.regions if md else ())}
    n = next(i for i in range(1000) if f"ua-pmem-hp{i}" not in taken)
    return replace(request, region=f"hp{n}")
