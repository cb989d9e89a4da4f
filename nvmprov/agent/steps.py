"""Facts -> the commands still needed. Pure: no SSH, no clock, no randomness.

`plan_commands` looks at one region and returns the commands of its next phase only
(modules, then namespace, then filesystem and mount); `fstab_command` does the fstab for all
regions at once, including those whose filesystem is made in the same round: nvmprov gives each
filesystem it makes a UUID fixed by the plan (`fs_uuid`), so the entry can follow mkfs and mount
without reading the facts in between. nvmprov.agent.apply re-reads the facts after each round
until nothing is left, so a second run on a finished guest runs no mutating command at all.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from nvmprov.agent.facts import (
    BlockDevice,
    GuestFacts,
    Mount,
    NdNamespace,
    Region,
    blockdev_of,
    cxl_memdev,
    dimm_of,
    locate,
    namespace_of,
)
from nvmprov.errors import GuestError
from nvmprov.plan import RegionPlan, cxl_region
from nvmprov.ssh import render_command

Phase = Literal["modules", "region", "namespace", "filesystem", "mount", "fstab"]

NAMESPACE_TIMEOUT_S = 300.0  # create-namespace writes the page map; slow under TCG for big regions
MKFS_TIMEOUT_S = 600.0
FSTAB_TAG = "# nvmprov: region "
FSTAB_OPTIONS = "dax,nofail"
FSTAB_OPTIONS_NO_DAX = "nofail"  # sector (BTT) and raw: the block device has no DAX
# uuid5 namespace of the filesystem UUIDs nvmprov chooses (fs_uuid); fixed forever.
FS_UUID_NAMESPACE = uuid.UUID("a48cef69-2d87-4bf4-af42-69882d539ab4")


@dataclass(frozen=True)
class Command:
    """One mutating command for the guest, run as root. `template` has %s for quoted args."""

    template: str
    args: tuple[str, ...] = ()
    phase: Phase = "namespace"
    region: str | None = None
    stdin: bytes | None = None
    timeout_s: float = 120.0

    def render(self) -> str:
        return render_command(self.template, *self.args)

    @property
    def makes_filesystem(self) -> bool:
        return self.phase == "filesystem" and self.template.startswith("mkfs")


def needed_modules(region: RegionPlan) -> tuple[str, ...]:
    # nd_pmem gives /dev/pmemN for both models; devdax needs dax_pmem (the namespace's claim) and
    # device_dax (/dev/daxN.M), sector nd_btt (/dev/pmemNs). fsdax needs neither.
    if region.model == "virtio-pmem":
        return ("virtio_pmem", "nd_pmem")
    if region.model == "cxl":  # the CXL stack (they load by themselves on 6.1) and its pmem bridge to libnvdimm
        return ("cxl_acpi", "cxl_pci", "cxl_port", "cxl_mem", "cxl_pmem", "nd_pmem")
    extra = {"devdax": ("dax_pmem", "device_dax"), "sector": ("nd_btt",)}.get(region.effective_mode or "", ())
    return ("nfit", "nd_pmem", *extra)


def namespace_options(region: RegionPlan) -> tuple[str, ...]:
    """The `ndctl create-namespace` arguments that give the region its mode (and devdax's align)."""
    mode = region.effective_mode or "fsdax"
    if mode == "devdax" and region.align_bytes is not None:
        return ("-m", mode, "-a", str(region.align_bytes))
    return ("-m", mode)


def namespace_is_done(region: RegionPlan, mode: str, align: int | None) -> bool:
    """Is a namespace of MODE (and ALIGN) what the region asks for?"""
    if mode != (region.effective_mode or "fsdax"):
        return False
    return mode != "devdax" or align is None or region.align_bytes is None or align == region.align_bytes


def plan_commands(facts: GuestFacts, region: RegionPlan, *, reformat: bool) -> list[Command]:
    """The next commands this region needs, given the facts; [] when it is done."""
    missing = [m for m in needed_modules(region) if m not in facts.modules]
    if missing:
        return [Command("modprobe -a" + " %s" * len(missing), tuple(missing), phase="modules", region=region.name)]
    if region.model == "cxl" and not any(r.cxl for r in facts.regions.values()):
        return [_cxl_region_command(facts, region)]
    guest = locate(facts, region)
    if region.model in ("nvdimm", "cxl") and not region.readonly:
        namespace = _namespace_commands(facts, region, guest, reformat=reformat)
        if namespace:
            return namespace
    return _filesystem_commands(facts, region, guest, reformat=reformat)


def _cxl_region_command(facts: GuestFacts, region: RegionPlan) -> Command:
    """`cxl create-region` from the recorded parameters: no firmware programs the CXL decoders here, so
    the region is gone after every start. It writes no namespace and no filesystem: the labels in the
    device's label storage area bring the namespace back (given the device serial)."""
    template, args = cxl_region(region).command(cxl_memdev(facts, region))
    return Command(template, args, phase="region", region=region.name)


# --------------------------------------------------------------------------------------------
# namespace


def _namespace_commands(facts: GuestFacts, region: RegionPlan, guest: Region, *, reformat: bool) -> list[Command]:
    if facts.ndctl_error is not None:
        raise GuestError(
            f"`ndctl list` failed in the guest ({facts.ndctl_error}): the image lacks ndctl; set "
            "`network: {mode: user, outbound: true}` so cloud-init installs it, or bake ndctl into the image "
            "(the built-in image has it)"
        )
    if region.namespace_name is not None:
        return _split_namespace_commands(facts, region, guest, reformat=reformat)
    ns = guest.active_namespace
    want = region.effective_mode or "fsdax"
    options = namespace_options(region)
    template = " %s" * len(options)
    if ns is not None and namespace_is_done(region, ns.mode, ns.align):
        return []
    if ns is None and want == "raw" and region.label_bytes is None:
        return []  # a label-less region always shows its raw namespace; nothing to make
    if ns is not None:
        _refuse_to_destroy(facts, region, guest, ns, reformat=reformat)
    if ns is not None and (region.label_bytes is None or ns.mode != "raw" or ns.uuid is not None):
        # A label-less raw namespace (or, with --reformat, any other mode): reconfigure in place.
        return [_cmd("ndctl create-namespace -f -e %s" + template, ns.dev, *options, region=region,
                     timeout_s=NAMESPACE_TIMEOUT_S)]
    if ns is not None:
        # Labelled DIMM whose label area is blank: the kernel shows it raw and label-less, and
        # create-namespace fails ("... is misaligned") until the labels are initialised.
        nmem = dimm_of(guest)
        if nmem is None:
            raise GuestError(f"region {region.name}: {guest.dev} spans several DIMMs; cannot init its labels")
        return [
            _cmd("ndctl disable-region %s", guest.dev, region=region),
            _cmd("ndctl init-labels -f %s", nmem, region=region),
            _cmd("ndctl enable-region %s", guest.dev, region=region),
            _cmd("ndctl create-namespace -r %s" + template, guest.dev, *options, region=region,
                 timeout_s=NAMESPACE_TIMEOUT_S),
        ]
    # Labels initialised but no namespace yet (only the idle seed): create one.
    return [_cmd("ndctl create-namespace -r %s" + template, guest.dev, *options, region=region,
                 timeout_s=NAMESPACE_TIMEOUT_S)]


def _split_namespace_commands(facts: GuestFacts, region: RegionPlan, guest: Region, *,
                              reformat: bool) -> list[Command]:
    """One namespace of a split region, found by the name in its label: made when missing, never
    made again when it is there (only --reformat reconfigures one of another mode, name kept)."""
    assert region.namespace_name is not None and region.namespace_bytes is not None
    options = namespace_options(region)
    template = " %s" * len(options)
    ns = namespace_of(guest, region)
    if ns is not None and namespace_is_done(region, ns.mode, ns.align):
        return []
    if ns is not None:
        if not reformat:
            raise GuestError(
                f"region {region.name}: {ns.dev} ({region.namespace_name!r} in {guest.dev}) is already a "
                f"{ns.mode} namespace, not {_wanted(region)}; pass --reformat to reconfigure it (its contents "
                "are lost)")
        return [_cmd("ndctl create-namespace -f -e %s -n %s" + template, ns.dev, region.namespace_name, *options,
                     region=region, timeout_s=NAMESPACE_TIMEOUT_S)]
    create = _cmd("ndctl create-namespace -r %s -s %s -n %s" + template, guest.dev, str(region.namespace_bytes),
                  region.namespace_name, *options, region=region, timeout_s=NAMESPACE_TIMEOUT_S)
    blank = [n for n in guest.namespaces if n.active and n.uuid is None]
    if blank:
        # Labels never initialised: the kernel shows the whole region as one label-less raw namespace.
        # Only a raw one that blkid calls empty is written over (as for a region of one namespace).
        _refuse_to_destroy(facts, region, guest, blank[0], reformat=reformat)
        nmem = dimm_of(guest)
        if nmem is None:
            raise GuestError(f"region {region.name}: {guest.dev} spans several DIMMs; cannot init its labels")
        # The split's other units plan the same three commands; the round sends them once.
        return [_cmd("ndctl disable-region %s", guest.dev, region=region),
                _cmd("ndctl init-labels -f %s", nmem, region=region),
                _cmd("ndctl enable-region %s", guest.dev, region=region), create]
    unnamed = [n for n in guest.namespaces if n.active and n.name is None]
    if unnamed:
        raise GuestError(
            f"region {region.name}: {guest.dev} holds {unnamed[0].dev} ({unnamed[0].mode}, no name), which nvmprov "
            f"did not make for this split and will not destroy; remove it in the guest (ndctl destroy-namespace -f "
            f"{unnamed[0].dev}) if its data may go, or give the region no namespaces:")
    return [create]


def _refuse_to_destroy(facts: GuestFacts, region: RegionPlan, guest: Region, ns: NdNamespace, *,
                       reformat: bool) -> None:
    """Converting a namespace rewrites its start: never over a filesystem or a non-raw mode unless told.

    A raw namespace with a tail nvmprov does not own counts as data too: raw (and devdax) without a
    filesystem are where users keep data blkid cannot see, so only a namespace blkid calls empty
    and that is raw is converted.
    """
    if reformat:
        return
    want = region.effective_mode or "fsdax"
    what = f"{ns.mode}" + (f" (align {ns.align})" if ns.mode == "devdax" and ns.align else "")
    dev = blockdev_of(facts, guest) if region.namespace_name is None else _blockdev_of_namespace(facts, ns)
    if dev is not None:
        _refuse_unknown_contents(region, dev, f"make {guest.dev} {want}")
    if dev is not None and dev.fs is not None:
        raise GuestError(
            f"region {region.name}: {guest.dev} is a {ns.mode} namespace holding a {dev.fs.type} filesystem "
            f"(/dev/{dev.name}); making it {want} would destroy it. Pass --reformat to do so anyway"
        )
    if ns.mode != "raw":
        raise GuestError(
            f"region {region.name}: {guest.dev} is already a {what} namespace, not {_wanted(region)}; "
            "pass --reformat to reconfigure it (its contents are lost)"
        )


def _blockdev_of_namespace(facts: GuestFacts, ns: NdNamespace) -> BlockDevice | None:
    return facts.blockdevs.get(ns.blockdev) if ns.blockdev else None


def _wanted(region: RegionPlan) -> str:
    if region.mode == "devdax" and region.align_bytes:
        return f"devdax (align {region.align_bytes})"
    return region.effective_mode or "fsdax"


def _refuse_unknown_contents(region: RegionPlan, dev: BlockDevice, action: str) -> None:
    """Only blkid's "nothing found" (exit 2) lets nvmprov write over a device; a failed probe stops it."""
    failure = dev.blkid_failure
    if failure is None:
        return
    device = f"/dev/{dev.name}"
    tail = " | ".join(failure.stderr.strip().splitlines()[-3:]) or "no error output"
    if failure.rc == 127:
        fix = "install blkid (util-linux) in the guest image"
    elif failure.rc == 8:
        fix = (
            f"blkid found several signatures: list them with `wipefs {device}` (it erases nothing without -a) "
            f"and remove the stale one with `wipefs -o OFFSET {device}`"
        )
    else:
        fix = f"run `blkid -p -o export {device}` in the guest to see why"
    raise GuestError(
        f"region {region.name}: cannot tell whether {device} holds data: `blkid -p -o export {device}` exited "
        f"{failure.rc if failure.rc is not None else '(not run)'} ({tail}); nvmprov only formats a device blkid "
        f"reports empty (exit 2), so it will not {action} on it. Fix: {fix}; or pass --reformat to replace "
        "whatever is on it (its contents are lost)"
    )


def _cmd(
    template: str, *args: str, region: RegionPlan, phase: Phase = "namespace", timeout_s: float = 120.0
) -> Command:
    return Command(template, tuple(args), phase=phase, region=region.name, timeout_s=timeout_s)


# --------------------------------------------------------------------------------------------
# filesystem and mount


def _filesystem_commands(facts: GuestFacts, region: RegionPlan, guest: Region, *, reformat: bool) -> list[Command]:
    if region.filesystem == "none" or region.mount is None:
        return []
    dev = blockdev_of(facts, guest, region)
    if dev is None:
        raise GuestError(no_blockdev_message(facts, region, guest))
    device = f"/dev/{dev.name}"
    mounts = facts.mounts_of(device)
    at_target = facts.mount_at(region.mount)
    if region.readonly:
        return _readonly_mount(region, dev.fs.type if dev.fs else None, device, mounts)
    if dev.fs is None and not reformat:
        _refuse_unknown_contents(region, dev, "make a filesystem")
    make_fs = dev.fs is None or reformat
    if not make_fs and dev.fs is not None and dev.fs.type != region.filesystem:
        raise GuestError(
            f"region {region.name}: /dev/{dev.name} holds a {dev.fs.type} filesystem, the spec asks for "
            f"{region.filesystem}; pass --reformat to replace it (its contents are lost)"
        )
    commands: list[Command] = []
    if make_fs:
        commands += [_cmd("umount %s", m.target, region=region, phase="filesystem") for m in mounts]
        commands.append(_mkfs(region, device))
        mounts = ()
        if at_target is not None and at_target.source == device:
            at_target = None  # unmounted just above
    commands += _mount(region, device, mounts, at_target)
    return commands


def no_blockdev_message(facts: GuestFacts, region: RegionPlan, guest: Region) -> str:
    disabled = [ns.dev for ns in guest.namespaces if not ns.enabled]
    why = facts.kernel_lines(*disabled, guest.dev) if disabled else ()
    text = f"region {region.name}: guest {guest.dev} has no block device (/dev/pmemN)"
    if disabled:
        text += f"; the kernel left {', '.join(disabled)} disabled"
    if why:
        text += ": " + " | ".join(line.strip() for line in why[-3:])
    if any("misaligned" in line for line in why):
        text += (
            ". The device's guest-physical start is not 2 MiB aligned; this happens when a device follows an"
            " nvdimm whose label area leaves its mapped size off a 2 MiB multiple"
        )
    return text


def _mkfs(region: RegionPlan, device: str) -> Command:
    label = fs_label(region.name, region.filesystem)
    if region.filesystem == "ext4":
        # 4 KiB blocks: below 512 MiB mke2fs picks 1 KiB, and ext4 DAX needs block size == page size.
        return _cmd(
            "mkfs.ext4 -q -F -b 4096 -U %s -L %s %s",
            fs_uuid(region),
            label,
            device,
            region=region,
            phase="filesystem",
            timeout_s=MKFS_TIMEOUT_S,
        )
    # reflink=0: xfs refuses to mount -o dax with reflink on.
    return _cmd(
        "mkfs.xfs -q -f -m reflink=0,uuid=%s -L %s %s",
        fs_uuid(region),
        label,
        device,
        region=region,
        phase="filesystem",
        timeout_s=MKFS_TIMEOUT_S,
    )


def fs_uuid(region: RegionPlan) -> str:
    """The UUID of a filesystem nvmprov makes on this region, known before mkfs runs.

    uuid5 of the region's backing volume name ("GUEST-pmem-REGION.raw", unique in its pool; with
    "/NAMESPACE" for a namespace of a split region, so each of its filesystems has its own), so
    a --reformat keeps the fstab entry and the plan alone decides it: the Plan holds no domain UUID
    (libvirt's is random, chosen at define time). A filesystem nvmprov did not make keeps its own
    UUID; the fstab entry then comes from blkid.
    """
    if region.namespace_name is not None:  # one region, several filesystems: one UUID each
        return str(uuid.uuid5(FS_UUID_NAMESPACE, f"{region.volume}/{region.namespace_name}"))
    return str(uuid.uuid5(FS_UUID_NAMESPACE, region.volume))


def fs_label(name: str, filesystem: str) -> str:
    """Filesystem label from the region name; ext4 takes 16 bytes, xfs 12."""
    return name[: 16 if filesystem == "ext4" else 12]


def _mount(region: RegionPlan, device: str, mounts: tuple[Mount, ...], at_target: Mount | None) -> list[Command]:
    assert region.mount is not None
    target = region.mount
    for m in mounts:
        if m.target == target and (m.dax or not region.dax_mount):
            return []
        if m.target == target:
            raise GuestError(
                f"region {region.name}: {device} is mounted on {target} without dax ({','.join(m.options)}); "
                f"unmount it (umount {target}) and run again"
            )
        raise GuestError(f"region {region.name}: {device} is already mounted on {m.target}, the spec says {target}")
    if at_target is not None:
        raise GuestError(f"region {region.name}: {target} already has {at_target.source} mounted on it")
    if not region.dax_mount:  # sector and raw: the kernel refuses -o dax ("DAX unsupported by block device")
        return [
            _cmd("mkdir -p %s", target, region=region, phase="mount"),
            _cmd("mount -t %s %s %s", region.filesystem, device, target, region=region, phase="mount"),
        ]
    return [
        _cmd("mkdir -p %s", target, region=region, phase="mount"),
        _cmd("mount -t %s -o dax %s %s", region.filesystem, device, target, region=region, phase="mount"),
    ]


def _readonly_mount(region: RegionPlan, fs_type: str | None, device: str, mounts: tuple[Mount, ...]) -> list[Command]:
    """A read-only region is never written: mount what is there (ro), or leave it alone."""
    assert region.mount is not None
    if fs_type != region.filesystem or any(m.target == region.mount for m in mounts):
        return []
    options = "ro,dax" if region.dax_mount else "ro"
    return [
        _cmd("mkdir -p %s", region.mount, region=region, phase="mount"),
        _cmd("mount -t %s -o %s %s %s", region.filesystem, options, device, region.mount, region=region,
             phase="mount"),
    ]


# --------------------------------------------------------------------------------------------
# fstab


@dataclass(frozen=True)
class FstabEntry:
    region: str
    uuid: str
    mount: str
    fstype: str
    options: str

    def lines(self) -> list[str]:
        return [
            f"{FSTAB_TAG}{self.region} (managed by nvmprov; this line and the next are rewritten)",
            f"UUID={self.uuid} {_fstab_escape(self.mount)} {self.fstype} {self.options} 0 0",
        ]


def _fstab_escape(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def fstab_entries(
    facts: GuestFacts, regions: tuple[RegionPlan, ...], planned: Sequence[Command] = ()
) -> list[FstabEntry]:
    """One entry per region with a mount point whose filesystem exists, or is made by `planned`.

    A region with module, CXL region or namespace steps still `planned` gets none yet: its device is not
    known until they ran (the next round writes it).
    """
    entries = []
    for region in regions:
        if region.filesystem == "none" or region.mount is None:
            continue
        mine = [c for c in planned if c.region == region.name]
        if any(c.phase in ("modules", "region", "namespace") for c in mine):
            continue
        if any(c.makes_filesystem for c in mine):
            fs_id: str | None = fs_uuid(region)
        else:
            dev = blockdev_of(facts, locate(facts, region), region)
            if dev is None or dev.fs is None or dev.fs.type != region.filesystem:
                continue
            fs_id = dev.fs.uuid
        if fs_id is None:
            continue
        options = (FSTAB_OPTIONS if region.dax_mount else FSTAB_OPTIONS_NO_DAX) + (",ro" if region.readonly else "")
        entries.append(FstabEntry(region.name, fs_id, region.mount, region.filesystem, options))
    return entries


def rewrite_fstab(text: str, entries: list[FstabEntry]) -> str:
    """Drop our old lines for these regions, keep everything else, append the entries."""
    ours = {e.region for e in entries}
    mounts = {e.mount for e in entries}
    kept: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(re.escape(FSTAB_TAG) + r"(\S+)", lines[i])
        if m and m.group(1) in ours:
            i += 2  # the tag and the entry under it
            continue
        fields = lines[i].split()
        if fields and not fields[0].startswith("#") and len(fields) >= 2 and _unescape(fields[1]) in mounts:
            raise GuestError(
                f"/etc/fstab already mounts something on {_unescape(fields[1])} (line {lines[i]!r}) that "
                "nvmprov did not write; remove that line and run again"
            )
        kept.append(lines[i])
        i += 1
    for e in entries:
        kept += e.lines()
    return "\n".join(kept) + "\n"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fstab_command(
    facts: GuestFacts, regions: tuple[RegionPlan, ...], planned: Sequence[Command] = ()
) -> Command | None:
    """The fstab rewrite, to run after `planned` (this round's other commands); None if fstab is right."""
    entries = fstab_entries(facts, regions, planned)
    if not entries:
        return None
    new = rewrite_fstab(facts.fstab, entries)
    if new.rstrip("\n") == facts.fstab.rstrip("\n"):
        return None
    return Command(
        "cat > /etc/fstab.nvmprov-new && chmod 644 /etc/fstab.nvmprov-new && mv -f /etc/fstab.nvmprov-new /etc/fstab",
        phase="fstab",
        stdin=new.encode(),
    )
