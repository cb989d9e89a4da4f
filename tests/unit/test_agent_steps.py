"""Facts -> commands, and apply() against a simulated guest kernel.

FakeGuest starts as the real guest program would (the loader, the bundle on stdin), answers its
requests with JSON in its format (ndctl list text included) and changes its state on the commands a
real guest would accept; it refuses
what the real kernel refuses (create-namespace on blank labels, init-labels on an active region,
mkfs on a mounted device). Every command apply() runs is recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
from dataclasses import dataclass, field

import pytest

from nvmprov import sizes
from nvmprov.agent import apply, steps
from nvmprov.agent.converge import gather
from nvmprov.agent.facts import parse_guest_facts
from nvmprov.agent.program import COMMAND, LOADER, bundle
from nvmprov.errors import GuestError, RemoteCommandError
from nvmprov.plan import Filesystem, Model, Plan, RegionPlan
from nvmprov.ssh import Result

MiB = 1024 * 1024
KiB = 1024
BUNDLE = bundle()
LABEL = 128 * KiB


def fsdax_bytes(region_bytes: int) -> int:
    # Roughly what the kernel leaves after the page map (64 B per 4 KiB page) and 16 MiB alignment.
    aligned = region_bytes // (16 * MiB) * (16 * MiB)
    return aligned - aligned // 64


@dataclass
class FakeNs:
    dev: str
    mode: str
    size: int
    blockdev: str | None
    uuid: str | None = None
    enabled: bool = True
    align: int | None = None  # devdax
    name: str | None = None  # `create-namespace -n` (a split region's namespaces)
    chardev: str | None = None  # devdax of a split region: ndctl's "chardev"
    allocated: int = 0  # of the region's capacity (a split region's namespaces)


@dataclass
class FakeRegion:
    dev: str
    size: int
    nmem: str | None = None  # nvdimm
    pci: str | None = None  # virtio-pmem, "0000:00:05.0"
    labelled: bool = False
    labels_initialised: bool = False
    enabled: bool = True
    namespaces: list[FakeNs] = field(default_factory=list)

    @property
    def path(self) -> str:
        if self.pci:
            return f"/sys/devices/pci0000:00/{self.pci}/0000:01:00.0/virtio3/ndbus1/{self.dev}"
        return f"/sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus0/{self.dev}"


class FakeProgram:
    """guest/serve.py as FakeGuest runs it: each request line answered at once, in order."""

    stderr = ""

    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest
        self.answers: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        assert not self.closed
        for line in data.splitlines():
            result = self.guest.answer(json.loads(line))
            self.answers.append(json.dumps({"ok": True, "result": result}).encode())

    def read_line(self, timeout_s: float) -> bytes | None:
        return self.answers.pop(0) if self.answers else None

    def close(self, timeout_s: float = 0) -> int | None:
        self.closed = True
        return 0


class FakeGuest:
    def __init__(self) -> None:
        self.modules = {"libvirt_dummy", "nfit", "nd_pmem", "virtio_pmem", "libnvdimm"}
        self.nmems: dict[str, int] = {}
        self.regions: dict[str, FakeRegion] = {}
        self.fs: dict[str, tuple[str, str, str]] = {}  # blockdev -> (type, uuid, label)
        self.mounts: list[tuple[str, str, str, str]] = []  # source, target, fstype, options
        self.dirs: set[str] = {"/", "/mnt"}
        self.fstab = "# /etc/fstab: static file system information.\nUUID=abcd / ext4 errors=remount-ro 0 1\n"
        self.commands: list[str] = []
        self.blkid_runs: dict[str, dict[str, object]] = {}  # blockdev -> what blkid "printed" instead
        self.gathers = 0  # facts read by the guest program
        self.execs = 0  # SSH execs of any kind (a started guest program is one)
        self.pythons = 0  # python3 starts in the guest
        self.modprobes: list[str] = []  # the collector's own module loading
        self.modprobe_fails = False
        self.files: dict[str, bytes] = {}  # payload files, by path
        self._uuids = 0

    # --- building the guest
    def add_nvdimm(self, slot: int, size: int, label: int | None = None, region: str | None = None) -> FakeRegion:
        nmem = f"nmem{len(self.nmems)}"
        self.nmems[nmem] = slot + 1
        dev = region or f"region{len(self.regions)}"
        n = dev.removeprefix("region")
        r = FakeRegion(dev, size - (label or 0), nmem=nmem, labelled=label is not None)
        r.namespaces.append(FakeNs(f"namespace{n}.0", "raw", r.size, f"pmem{n}"))
        self.regions[dev] = r
        return r

    def add_virtio(self, pci_slot: int, size: int) -> FakeRegion:
        dev = f"region{len(self.regions)}"
        n = dev.removeprefix("region")
        r = FakeRegion(dev, size, pci=f"0000:00:{pci_slot:02x}.0")
        r.namespaces.append(FakeNs(f"namespace{n}.0", "raw", size, f"pmem{n}"))
        self.regions[dev] = r
        return r

    # --- what the collector would print
    def _visible(self, r: FakeRegion) -> bool:
        need = "virtio_pmem" if r.pci else "nfit"
        return need in self.modules and "nd_pmem" in self.modules

    def facts_json(self) -> str:
        regions = [r for r in self.regions.values() if self._visible(r)]
        ndctl = {
            "dimms": [{"dev": n, "id": f"8680-5{h}341200", "handle": h, "phys_id": 0} for n, h in self.nmems.items()],
            "regions": [
                {
                    "dev": r.dev,
                    "size": r.size,
                    "align": 16777216,
                    "available_size": 0,
                    "type": "pmem",
                    **({} if r.enabled else {"state": "disabled"}),
                    "namespaces": [
                        {
                            "dev": ns.dev,
                            "mode": ns.mode,
                            "size": ns.size,
                            "sector_size": 512,
                            **({"uuid": ns.uuid} if ns.uuid else {}),
                            **({"align": ns.align} if ns.align else {}),
                            **({"blockdev": ns.blockdev} if ns.blockdev and ns.enabled else {}),
                            **({} if ns.enabled and r.enabled else {"state": "disabled"}),
                            **({"name": ns.name} if ns.name else {}),
                            **({"chardev": ns.chardev} if ns.chardev and ns.enabled else {}),
                        }
                        for ns in r.namespaces
                    ],
                }
                for r in regions
            ],
        }
        blockdevs = {}
        for r in regions:
            for ns in r.namespaces:
                if not (ns.blockdev and ns.enabled and r.enabled and ns.size):
                    continue
                parent = {"fsdax": "pfn0.1", "sector": "btt0.1"}.get(ns.mode, ns.dev)
                fs = self.fs.get(ns.blockdev)
                blkid = (
                    {
                        "rc": 0,
                        "stdout": f"DEVNAME=/dev/{ns.blockdev}\nLABEL={fs[2]}\nUUID={fs[1]}\nTYPE={fs[0]}\n",
                        "stderr": "",
                    }
                    if fs
                    else {"rc": 2, "stdout": "", "stderr": ""}
                )
                blockdevs[ns.blockdev] = {
                    "path": f"{r.path}/{parent}/block/{ns.blockdev}",
                    "size_sectors": str(ns.size // 512),
                    "ro": "0",
                    "dax": "1" if ns.mode == "fsdax" or r.pci else "0",
                    "blkid": self.blkid_runs.get(ns.blockdev, blkid),
                }
        return json.dumps(
            {
                "modules": sorted(
                    self.modules & {"libnvdimm", "nfit", "nd_pmem", "nd_btt", "dax_pmem", "device_dax", "virtio_pmem"}
                ),
                "ndctl": {"rc": 0, "stdout": json.dumps(ndctl, indent=2) if regions else "", "stderr": ""},
                "regions": {
                    r.dev: {
                        "path": r.path,
                        "size": str(r.size),
                        "read_only": "0",
                        "mappings": [f"{r.nmem},0,{r.size},0"] if r.nmem else [],
                    }
                    for r in regions
                },
                "nmems": {
                    n: {"path": f"/sys/devices/.../{n}", "handle": f"{h:#x}"}
                    for n, h in self.nmems.items()
                    if "nfit" in self.modules
                },
                "blockdevs": blockdevs,
                "daxdevs": {
                    ns.chardev or f"dax{r.dev.removeprefix('region')}.0": {
                        "path": f"{r.path}/dax{r.dev.removeprefix('region')}.0/"
                        + (ns.chardev or f"dax{r.dev.removeprefix('region')}.0"),
                        "size": str(ns.size),
                        "align": str(ns.align),
                    }
                    for r in regions
                    for ns in r.namespaces
                    if ns.mode == "devdax" and ns.enabled and r.enabled and "device_dax" in self.modules
                },
                "mounts": "/dev/vda1 / ext4 rw,relatime 0 0\n"
                + "".join(f"{s} {t.replace(' ', chr(92) + '040')} {f} {o} 0 0\n" for s, t, f, o in self.mounts),
                "fstab": self.fstab,
            }
        )

    # --- the Runner protocol
    def run(
        self,
        cmd: str,
        *args: object,
        sudo: bool = False,
        check: bool = True,
        timeout_s: float = 300,
        stdin: bytes | None = None,
    ) -> Result:
        command = cmd % tuple(shlex.quote(str(a)) for a in args) if args else cmd
        assert sudo, f"agent commands must run as root: {command}"
        self.execs += 1
        self.commands.append(command)
        rc, err = self._mutate(command, stdin)
        if check and rc != 0:
            raise RemoteCommandError(command, rc, err)
        return Result(rc, "", err, command)

    def start(self, cmd: str, *args: object, sudo: bool = False, stdin: bytes = b"") -> FakeProgram:
        assert sudo, f"the guest program must run as root: {cmd}"
        assert (cmd, args, stdin) == (COMMAND, (LOADER,), BUNDLE), "not the guest program's own start"
        self.execs += 1
        self.pythons += 1
        return FakeProgram(self)

    def answer(self, request: dict[str, object]) -> object:
        """What guest/serve.py answers, from this fake kernel."""
        if request["op"] == "facts":
            self.gathers += 1
            return json.loads(self.facts_json())
        if request["op"] == "run":
            return self._run(request)
        if request["op"] == "sha256":  # read-only
            paths = request["paths"]
            assert isinstance(paths, list)
            return {"sums": {p: hashlib.sha256(self.files[p]).hexdigest() if p in self.files else None for p in paths}}
        raise AssertionError(f"FakeGuest does not answer {request['op']!r}")

    def _run(self, wanted: dict[str, object]) -> dict[str, object]:
        """What run_steps.py does: load the missing modules, run the steps until one fails."""
        missing = [m for m in wanted.get("modules", ()) if m not in self.modules]  # type: ignore[attr-defined]
        modprobe = None
        if missing:
            modprobe = {"command": "modprobe -a " + " ".join(missing), "rc": 0, "stdout": "", "stderr": ""}
            self.modprobes.append(modprobe["command"])
            if self.modprobe_fails:
                modprobe.update(rc=1, stderr=f"modprobe: FATAL: Module {missing[0]} not found in directory")
                return {"modprobe": modprobe, "steps": []}
            self.modules |= set(missing)
        results = []
        for step in wanted.get("steps", ()):  # type: ignore[attr-defined]
            data = base64.b64decode(step["stdin_b64"]) if step["stdin_b64"] else None
            self.commands.append(step["command"])
            rc, err = self._mutate(step["command"], data)
            results.append({"command": step["command"], "rc": rc, "stderr": err})
            if rc != 0:
                break
        return {"modprobe": modprobe, "steps": results}

    def power_cycle(self, *, boot_modules: frozenset[str] = frozenset({"libnvdimm", "nfit", "nd_pmem"})) -> None:
        """Power cut and boot: nothing mounted or loaded but what boot brings. Boot loads the NFIT
        modules and mounts fstab's nvmprov entries of nvdimm regions (virtio-pmem is hot-plugged later)."""
        self.mounts = []
        self.modules = {"libvirt_dummy"} | set(boot_modules)
        for line in self.fstab.splitlines():
            fields = line.split()
            if not fields or not fields[0].startswith("UUID=") or fields[1] == "/":
                continue
            for r in self.regions.values():
                for ns in r.namespaces:
                    fs = self.fs.get(ns.blockdev or "")
                    if not r.pci and ns.mode != "devdax" and fs and fs[1] == fields[0].removeprefix("UUID="):
                        shown = "rw,relatime,dax=always" if ns.mode == "fsdax" else "rw,relatime"
                        self.mounts.append((f"/dev/{ns.blockdev}", fields[1], fields[2], shown))

    def _ns(self, dev: str) -> tuple[FakeRegion, FakeNs]:
        for r in self.regions.values():
            for ns in r.namespaces:
                if ns.dev == dev:
                    return r, ns
        raise AssertionError(dev)

    def _new_uuid(self) -> str:
        self._uuids += 1
        return f"00000000-0000-4000-8000-{self._uuids:012d}"

    def _create_named(self, r: FakeRegion, size: int, name: str, mode: str, rest: list[str]) -> tuple[int, str]:
        """create-namespace -r -s -n on labelled capacity: the idle seed becomes the namespace, a new seed follows."""
        if not (r.labelled and r.labels_initialised):
            return 1, f"failed to create namespace: align setting is 0x1000000 size {r.size:#x} is misaligned"
        if size % (16 * MiB):
            return 234, f"Error: create namespace: {r.dev}: align setting is 0x1000000 size {size:#x} is misaligned"
        if sum(ns.allocated for ns in r.namespaces) + size > r.size // (16 * MiB) * (16 * MiB):
            return 1, f"Error: create namespace: {r.dev}: insufficient capacity"
        seed = next(ns for ns in r.namespaces if not ns.enabled)
        n, k = r.dev.removeprefix("region"), int(seed.dev.rsplit(".", 1)[1])
        block = f"pmem{n}" if k == 0 else f"pmem{n}.{k}"
        made = FakeNs(seed.dev, mode, sizes.namespace_usable_bytes(size, mode), None, self._new_uuid(), name=name,
                      allocated=size)
        if mode == "devdax":
            assert rest in ([], ["-a", "4096"], ["-a", "2097152"]), rest
            made.align, made.chardev = int(rest[1]) if rest else 2 * MiB, f"dax{n}.{k}"
        else:
            made.blockdev = block + ("s" if mode == "sector" else "")
        r.namespaces.remove(seed)
        r.namespaces += [made, FakeNs(f"namespace{n}.{k + 1}", "raw", 0, None, "0" * 8, enabled=False)]
        return 0, ""

    def _mutate(self, command: str, stdin: bytes | None) -> tuple[int, str]:  # noqa: C901 - a dispatcher
        argv = shlex.split(command.split(" && ")[0])
        match argv:
            case ["modprobe", "-a", *mods]:
                self.modules |= set(mods)
            case ["ndctl", "create-namespace", "-f", "-e", dev, "-m", "fsdax"]:
                r, ns = self._ns(dev)
                if r.labelled and not r.labels_initialised:
                    return (
                        1,
                        f"failed to reconfigure namespace: align setting is 0x1000000 size {r.size:#x} is misaligned",
                    )
                ns.mode, ns.size, ns.uuid = "fsdax", fsdax_bytes(r.size), self._new_uuid()
                self.fs.pop(ns.blockdev or "", None)
            case ["ndctl", "create-namespace", "-f", "-e", dev, "-m", ("devdax" | "sector" | "raw") as mode, *rest]:
                r, ns = self._ns(dev)
                n = r.dev.removeprefix("region")
                self.fs.pop(ns.blockdev or "", None)
                if mode == "devdax":
                    assert rest in ([], ["-a", "4096"], ["-a", "2097152"]), rest
                    ns.align = int(rest[1]) if rest else 2 * MiB
                    ns.blockdev, ns.size = None, fsdax_bytes(r.size)
                elif mode == "sector":
                    ns.blockdev, ns.size, ns.align = f"pmem{n}s", r.size - r.size // 100, None
                else:
                    ns.blockdev, ns.size, ns.align = f"pmem{n}", r.size, None
                ns.mode, ns.uuid = mode, self._new_uuid() if mode != "raw" else None
            case ["ndctl", "disable-region", dev]:
                self.regions[dev].enabled = False
            case ["ndctl", "init-labels", "-f", nmem]:
                r = next(r for r in self.regions.values() if r.nmem == nmem)
                if r.enabled:
                    return 1, f"{nmem} is active, skipping...\nerror initializing 0 nmems"
                n = r.dev.removeprefix("region")
                r.labels_initialised = True
                r.namespaces = [
                    FakeNs(f"namespace{n}.0", "raw", 0, None, "00000000-0000-0000-0000-000000000000", enabled=False)
                ]
            case ["ndctl", "enable-region", dev]:
                self.regions[dev].enabled = True
            case ["ndctl", "create-namespace", "-r", dev, "-m", "fsdax"]:
                r = self.regions[dev]
                if r.labelled and not r.labels_initialised:
                    return 1, f"failed to create namespace: align setting is 0x1000000 size {r.size:#x} is misaligned"
                n = dev.removeprefix("region")
                r.namespaces = [FakeNs(f"namespace{n}.0", "fsdax", fsdax_bytes(r.size), f"pmem{n}", self._new_uuid())]
            case ["ndctl", "create-namespace", "-r", dev, "-s", size, "-n", name, "-m", mode, *rest]:
                return self._create_named(self.regions[dev], int(size), name, mode, rest)
            case ["mkfs.ext4" | "mkfs.xfs" as mkfs, *opts, "-L", label, device]:
                if mkfs == "mkfs.ext4":
                    assert opts[:4] == ["-q", "-F", "-b", "4096"] and opts[4] == "-U", opts
                    fs_uuid = opts[5]
                else:
                    assert opts[:3] == ["-q", "-f", "-m"] and opts[3].startswith("reflink=0,uuid="), opts
                    fs_uuid = opts[3].removeprefix("reflink=0,uuid=")
                if any(m[0] == device for m in self.mounts):
                    return 1, f"{device} contains a mounted filesystem"
                self.fs[device.removeprefix("/dev/")] = (mkfs.removeprefix("mkfs."), fs_uuid, label)
            case ["mkdir", "-p", path]:
                self.dirs.add(path)
            case ["mount", "-t", fstype, "-o", options, device, target]:
                fs = self.fs.get(device.removeprefix("/dev/"))
                if fs is None or fs[0] != fstype or target not in self.dirs:
                    return 32, f"mount: {target}: wrong fs type, bad option, bad superblock on {device}"
                shown = ",".join(["ro" if "ro" in options.split(",") else "rw", "relatime", "dax=always"])
                self.mounts.append((device, target, fstype, shown))
            case ["mount", "-t", fstype, device, target]:  # sector, raw: no DAX
                fs = self.fs.get(device.removeprefix("/dev/"))
                if fs is None or fs[0] != fstype or target not in self.dirs:
                    return 32, f"mount: {target}: wrong fs type, bad option, bad superblock on {device}"
                self.mounts.append((device, target, fstype, "rw,relatime"))
            case ["umount", target]:
                self.mounts = [m for m in self.mounts if m[1] != target]
            case ["cat", ">", "/etc/fstab.nvmprov-new"]:  # ... && chmod && mv into place
                assert stdin is not None and "/etc/fstab" in command
                self.fstab = stdin.decode()
            case _:
                raise AssertionError(f"the fake guest does not know: {command}")
        return 0, ""


def region(
    name: str = "data",
    *,
    model: Model = "nvdimm",
    slot: int | None = 0,
    pci: int | None = None,
    size: int = 512 * MiB,
    label: int | None = None,
    fs: Filesystem = "ext4",
    mount: str | None = "/mnt/data",
    readonly: bool = False,
    mode: str | None = None,
    align: int | None = None,
) -> RegionPlan:
    return RegionPlan(
        name=name,
        model=model,
        size_bytes=size,
        backing_bytes=size,
        label_bytes=label,
        readonly=readonly,
        host_pmem=False,
        allocation="full",
        filesystem=fs,
        mount=mount,
        volume=f"g-{name}.raw",
        alias=f"ua-pmem-{name}",
        dimm_slot=slot if model == "nvdimm" else None,
        pci_slot=pci,
        expected_usable_bytes=size,
        mode=mode,  # type: ignore[arg-type]
        align_bytes=align if align is not None else (2 * MiB if mode == "devdax" else None),
        reserved_tail=fs == "none" and mode in ("devdax", "raw", "sector") and not readonly,
    )


def plan_of(*regions: RegionPlan) -> Plan:
    return Plan(
        name="g",
        spec_digest="0" * 64,
        connect="qemu:///system",
        pool="nvmprov",
        machine="q35",
        accel="tcg",
        accel_notice=None,
        cpu_model="qemu64",
        vcpus=1,
        memory_bytes=1024 * MiB,
        max_memory_bytes=8192 * MiB,
        memory_slots=8,
        numa_cells=1,
        boot="direct",
        image="builtin",
        disk_bytes=8192 * MiB,
        overlay_volume="g-root.qcow2",
        seed_volume="g-seed.iso",
        kernel_volume=None,
        initrd_volume=None,
        base_volume=None,
        kernel_cmdline=None,
        mac="52:54:00:00:00:01",
        network_mode="user",
        network_outbound=False,
        network_name=None,
        ssh_user="nvmprov",
        boot_timeout_s=600,
        ssh_timeout_s=600,
        regions=regions,
    )


def first_phase(guest: FakeGuest, r: RegionPlan, reformat: bool = False) -> list[str]:
    return [c.render() for c in steps.plan_commands(gather(guest), r, reformat=reformat)]


# --- facts -> commands (one phase), as a table -----------------------------------------------------------


def _labelless() -> FakeGuest:
    g = FakeGuest()
    g.add_nvdimm(0, 512 * MiB)
    return g


def _labelled_blank() -> FakeGuest:
    g = FakeGuest()
    g.add_nvdimm(0, 512 * MiB, label=LABEL)
    return g


def _labelled_initialised() -> FakeGuest:
    g = _labelled_blank()
    r = g.regions["region0"]
    r.labels_initialised = True
    r.namespaces = [FakeNs("namespace0.0", "raw", 0, None, "0" * 8, enabled=False)]
    return g


def _no_modules() -> FakeGuest:
    g = _labelless()
    g.modules -= {"nfit", "nd_pmem"}
    return g


def _fsdax_blank() -> FakeGuest:
    g = _labelless()
    g.regions["region0"].namespaces[0] = FakeNs("namespace0.0", "fsdax", fsdax_bytes(512 * MiB), "pmem0", "u1")
    return g


def _fsdax_ext4() -> FakeGuest:
    g = _fsdax_blank()
    g.fs["pmem0"] = ("ext4", "uuid-1", "data")
    return g


def _fsdax_ext4_mounted() -> FakeGuest:
    g = _fsdax_ext4()
    g.dirs.add("/mnt/data")
    g.mounts.append(("/dev/pmem0", "/mnt/data", "ext4", "rw,relatime,dax=always"))
    return g


def _virtio() -> FakeGuest:
    g = FakeGuest()
    g.add_nvdimm(0, 512 * MiB)
    g.add_virtio(0x0C, 256 * MiB)
    return g


VIRTIO = region("v", model="virtio-pmem", pci=0x0C, size=256 * MiB, mount="/mnt/v")
U_DATA = steps.fs_uuid(region())  # the UUID nvmprov gives the filesystem it makes on region "data" of guest "g"
U_V = steps.fs_uuid(VIRTIO)

PHASE_TABLE = [
    ("modules missing", _no_modules, region(), ["modprobe -a nfit nd_pmem"]),
    ("label-less raw", _labelless, region(), ["ndctl create-namespace -f -e namespace0.0 -m fsdax"]),
    (
        "labelled, blank labels",
        _labelled_blank,
        region(label=LABEL),
        [
            "ndctl disable-region region0",
            "ndctl init-labels -f nmem0",
            "ndctl enable-region region0",
            "ndctl create-namespace -r region0 -m fsdax",
        ],
    ),
    (
        "labelled, labels but only the seed",
        _labelled_initialised,
        region(label=LABEL),
        ["ndctl create-namespace -r region0 -m fsdax"],
    ),
    (
        "fsdax, no filesystem",
        _fsdax_blank,
        region(),
        [
            f"mkfs.ext4 -q -F -b 4096 -U {U_DATA} -L data /dev/pmem0",
            "mkdir -p /mnt/data",
            "mount -t ext4 -o dax /dev/pmem0 /mnt/data",
        ],
    ),
    (
        "fsdax, xfs wanted",
        _fsdax_blank,
        region(fs="xfs"),
        [
            f"mkfs.xfs -q -f -m reflink=0,uuid={U_DATA} -L data /dev/pmem0",
            "mkdir -p /mnt/data",
            "mount -t xfs -o dax /dev/pmem0 /mnt/data",
        ],
    ),
    (
        "ext4 present, not mounted",
        _fsdax_ext4,
        region(),
        ["mkdir -p /mnt/data", "mount -t ext4 -o dax /dev/pmem0 /mnt/data"],
    ),
    ("mounted with dax", _fsdax_ext4_mounted, region(), []),
    ("reformat a mounted one", _fsdax_ext4_mounted, region(), "reformat"),
    (
        "filesystem none: namespace only",
        _labelless,
        region(fs="none", mount=None),
        ["ndctl create-namespace -f -e namespace0.0 -m fsdax"],
    ),
    ("filesystem none, fsdax: nothing", _fsdax_blank, region(fs="none", mount=None), []),
    ("read-only raw: never written", _labelless, region(readonly=True), []),
    (
        "virtio-pmem: no namespace ops",
        _virtio,
        VIRTIO,
        [
            f"mkfs.ext4 -q -F -b 4096 -U {U_V} -L v /dev/pmem1",
            "mkdir -p /mnt/v",
            "mount -t ext4 -o dax /dev/pmem1 /mnt/v",
        ],
    ),
]


@pytest.mark.parametrize(("case", "make", "plan_region", "expected"), PHASE_TABLE, ids=[c[0] for c in PHASE_TABLE])
def test_facts_to_next_commands(case: str, make: object, plan_region: RegionPlan, expected: list[str] | str) -> None:
    guest = make()  # type: ignore[operator]
    if expected == "reformat":
        assert first_phase(guest, plan_region, reformat=True) == [
            "umount /mnt/data",
            f"mkfs.ext4 -q -F -b 4096 -U {U_DATA} -L data /dev/pmem0",
            "mkdir -p /mnt/data",
            "mount -t ext4 -o dax /dev/pmem0 /mnt/data",
        ]
    else:
        assert first_phase(guest, plan_region) == expected


# --- refusals ----------------------------------------------------------------------------------------


def test_other_filesystem_needs_reformat() -> None:
    g = _fsdax_ext4()
    with pytest.raises(GuestError, match=r"holds a ext4 filesystem, the spec asks for xfs; pass --reformat"):
        steps.plan_commands(gather(g), region(fs="xfs"), reformat=False)


def test_raw_namespace_with_a_filesystem_is_not_converted_without_reformat() -> None:
    g = _labelless()
    g.fs["pmem0"] = ("ext4", "old", "old")
    with pytest.raises(GuestError, match="making it fsdax would destroy it. Pass --reformat"):
        steps.plan_commands(gather(g), region(), reformat=False)
    assert first_phase(g, region(), reformat=True) == ["ndctl create-namespace -f -e namespace0.0 -m fsdax"]


def test_devdax_namespace_is_not_reconfigured_without_reformat() -> None:
    g = _labelless()
    g.regions["region0"].namespaces[0] = FakeNs("namespace0.0", "devdax", 500 * MiB, None, "u")
    with pytest.raises(GuestError, match="already a devdax namespace"):
        steps.plan_commands(gather(g), region(), reformat=False)


def test_mounted_elsewhere_is_an_error() -> None:
    g = _fsdax_ext4()
    g.mounts.append(("/dev/pmem0", "/srv/other", "ext4", "rw,dax=always"))
    with pytest.raises(GuestError, match="already mounted on /srv/other, the spec says /mnt/data"):
        steps.plan_commands(gather(g), region(), reformat=False)


def test_mounted_without_dax_is_an_error() -> None:
    g = _fsdax_ext4()
    g.mounts.append(("/dev/pmem0", "/mnt/data", "ext4", "rw,relatime"))
    with pytest.raises(GuestError, match="mounted on /mnt/data without dax"):
        steps.plan_commands(gather(g), region(), reformat=False)


def test_mountpoint_taken_by_another_device() -> None:
    g = _fsdax_ext4()
    g.mounts.append(("/dev/vdb1", "/mnt/data", "ext4", "rw"))
    with pytest.raises(GuestError, match="/mnt/data already has /dev/vdb1 mounted"):
        steps.plan_commands(gather(g), region(), reformat=False)


def test_ndctl_missing_says_install_it() -> None:
    raw = json.loads(_labelless().facts_json())
    raw["ndctl"] = {"rc": 127, "stdout": "", "stderr": "[Errno 2] No such file or directory: 'ndctl'"}
    with pytest.raises(GuestError, match="lacks ndctl.*outbound: true.*bake ndctl"):
        steps.plan_commands(parse_guest_facts(json.dumps(raw)), region(), reformat=False)


AMBIVALENT = {
    "rc": 8,
    "stdout": "",
    "stderr": "/dev/pmem0: ambivalent result (probably more filesystems on the device, use wipefs(8) to see more "
    "details)\n",
}
NO_BLKID = {"rc": 127, "stdout": "", "stderr": "[Errno 2] No such file or directory: 'blkid'"}


@pytest.mark.parametrize(
    ("make", "blkid", "match"),
    [
        (_fsdax_blank, AMBIVALENT, r"exited 8 \(/dev/pmem0: ambivalent .*not make a filesystem.*wipefs /dev/pmem0"),
        (_fsdax_blank, NO_BLKID, r"exited 127 \(\[Errno 2\] No such file.*install blkid \(util-linux\)"),
        (_labelless, AMBIVALENT, r"exited 8 .*will not make region0 fsdax on it"),
        (_labelless, NO_BLKID, r"exited 127 .*will not make region0 fsdax on it"),
    ],
    ids=["mkfs-rc8", "mkfs-rc127", "namespace-rc8", "namespace-rc127"],
)
def test_blkid_failure_refuses_to_format(make: object, blkid: dict[str, object], match: str) -> None:
    g = make()  # type: ignore[operator]
    g.blkid_runs["pmem0"] = blkid
    prefix = "region data: cannot tell whether /dev/pmem0 holds data: `blkid -p -o export /dev/pmem0` "
    with pytest.raises(GuestError, match=prefix + match) as e:
        apply(g, plan_of(region()))
    assert "pass --reformat to replace whatever is on it" in str(e.value)
    assert not any(c.startswith(("mkfs", "ndctl")) for c in g.commands)  # nothing written over it


@pytest.mark.parametrize(
    ("blkid", "expected"),
    [
        ({"rc": 2, "stdout": "", "stderr": ""}, "mkfs.ext4"),  # exit 2: nothing there, format it
        ({"rc": 0, "stdout": "DEVNAME=/dev/pmem0\nUUID=u-7\nTYPE=ext4\n", "stderr": ""}, "mkdir"),  # keep it, mount it
    ],
    ids=["rc2", "rc0"],
)
def test_blkid_verdicts_that_allow_the_next_step(blkid: dict[str, object], expected: str) -> None:
    g = _fsdax_blank()
    g.blkid_runs["pmem0"] = blkid
    assert first_phase(g, region())[0].startswith(expected)


def test_blkid_failure_with_reformat_formats_once() -> None:
    g = _fsdax_blank()
    g.blkid_runs["pmem0"] = AMBIVALENT  # stays ambivalent: the fake's blkid never learns
    with pytest.raises(GuestError, match="cannot tell whether /dev/pmem0 holds data"):
        apply(g, plan_of(region()), reformat=True)  # formatted once, then refuses again rather than loop
    assert sum(c.startswith("mkfs") for c in g.commands) == 1


# --- fstab ---------------------------------------------------------------------------------------------


def test_fstab_keeps_user_lines_and_replaces_ours() -> None:
    e1 = steps.FstabEntry("data", "u-1", "/mnt/data", "ext4", "dax,nofail")
    original = "# comment\nUUID=abcd / ext4 defaults 0 1\n"
    once = steps.rewrite_fstab(original, [e1])
    assert once == original + (
        "# nvmprov: region data (managed by nvmprov; this line and the next are rewritten)\n"
        "UUID=u-1 /mnt/data ext4 dax,nofail 0 0\n"
    )
    assert steps.rewrite_fstab(once, [e1]) == once  # idempotent
    e2 = steps.FstabEntry("data", "u-2", "/mnt/data", "ext4", "dax,nofail")
    twice = steps.rewrite_fstab(once, [e2])
    assert twice.count("/mnt/data") == 1 and "UUID=u-2" in twice and "u-1" not in twice


def test_fstab_escapes_spaces_and_refuses_foreign_line_for_our_mount() -> None:
    e = steps.FstabEntry("d", "u", "/mnt/a b", "xfs", "dax,nofail")
    assert "UUID=u /mnt/a\\040b xfs dax,nofail 0 0" in steps.rewrite_fstab("", [e])
    with pytest.raises(GuestError, match="already mounts something on /mnt/a b"):
        steps.rewrite_fstab("/dev/sdb1 /mnt/a\\040b ext4 defaults 0 2\n", [e])


def test_fstab_leaves_other_nvmprov_regions_alone() -> None:
    other = steps.FstabEntry("other", "u-9", "/mnt/other", "ext4", "dax,nofail")
    mine = steps.FstabEntry("data", "u-1", "/mnt/data", "ext4", "dax,nofail")
    text = steps.rewrite_fstab("", [other])
    assert steps.rewrite_fstab(text, [mine]).count("UUID=u-9") == 1


# --- apply() end to end on the fake guest ------------------------------------------------------------------

MUTATING_PREFIXES = ("modprobe", "ndctl", "mkfs", "mkdir", "mount", "umount", "cat ")


def test_apply_labelless_ext4_then_nothing_the_second_time() -> None:
    g = _no_modules()
    plan = plan_of(region())
    states = apply(g, plan)
    assert g.modprobes == ["modprobe -a nfit nd_pmem"]  # by the fact collector, before its first read
    assert g.commands[:-1] == [
        "ndctl create-namespace -f -e namespace0.0 -m fsdax",
        f"mkfs.ext4 -q -F -b 4096 -U {U_DATA} -L data /dev/pmem0",
        "mkdir -p /mnt/data",
        "mount -t ext4 -o dax /dev/pmem0 /mnt/data",
    ]
    assert g.commands[-1].startswith("cat > /etc/fstab.nvmprov-new")  # in the same round as mkfs and mount
    assert f"UUID={U_DATA} /mnt/data ext4 dax,nofail 0 0" in g.fstab
    assert g.fstab.startswith("# /etc/fstab: static file system information.\nUUID=abcd / ext4")
    (s,) = states
    assert (s.guest_region, s.namespace, s.namespace_mode, s.guest_device) == (
        "region0",
        "namespace0.0",
        "fsdax",
        "/dev/pmem0",
    )
    assert (s.filesystem, s.mountpoint, s.mount_dax, s.usable_bytes) == (
        "ext4",
        "/mnt/data",
        True,
        fsdax_bytes(512 * MiB),
    )
    assert len(s.commands_run) == 6  # modprobe, its own four and the guest-wide fstab rewrite
    assert s.commands_run[0] == "modprobe -a nfit nd_pmem" and s.fs_uuid == U_DATA

    before, gathers = list(g.commands), g.gathers
    again = apply(g, plan)
    assert g.commands == before  # zero mutating commands
    assert g.gathers == gathers + 1  # one round trip
    assert [dataclass_without_commands(x) for x in again] == [dataclass_without_commands(x) for x in states]


def dataclass_without_commands(state: object) -> dict[str, object]:
    from dataclasses import asdict

    d = asdict(state)  # type: ignore[call-overload]
    d.pop("commands_run")
    return d


def test_apply_mixed_guest_maps_by_handle_and_pci_not_order() -> None:
    g = FakeGuest()
    # The guest enumerates the slot-1 DIMM first: region0 is the labelled one in slot 1.
    g.add_nvdimm(1, 512 * MiB, label=LABEL, region="region0")
    g.add_nvdimm(0, 1024 * MiB, region="region1")
    g.add_virtio(0x0C, 256 * MiB)
    plan = plan_of(
        region("fast", slot=0, size=1024 * MiB, mount="/mnt/fast"),
        region("labelled", slot=1, label=LABEL, fs="xfs", mount="/mnt/labelled"),
        region("v", model="virtio-pmem", pci=0x0C, size=256 * MiB, mount="/mnt/v"),
    )
    states = {s.name: s for s in apply(g, plan)}
    assert (states["fast"].guest_region, states["fast"].guest_device) == ("region1", "/dev/pmem1")
    assert (states["labelled"].guest_region, states["labelled"].filesystem) == ("region0", "xfs")
    assert (states["v"].guest_device, states["v"].namespace_mode) == ("/dev/pmem2", "raw")
    assert all(s.mount_dax for s in states.values())
    assert "ndctl init-labels -f nmem0" in g.commands
    assert not any("namespace2" in c or "region2" in c for c in g.commands)  # virtio-pmem: no namespace ops
    assert g.fstab.count("# nvmprov: region") == 3
    n = len(g.commands)
    apply(g, plan)
    assert len(g.commands) == n


def test_apply_reformat_replaces_once_and_settles() -> None:
    g = _fsdax_ext4_mounted()
    plan = plan_of(region(fs="xfs"))
    with pytest.raises(GuestError, match="--reformat"):
        apply(g, plan)
    assert g.commands == []
    (s,) = apply(g, plan, reformat=True)
    assert s.filesystem == "xfs" and s.mount_dax
    assert sum(c.startswith("mkfs") for c in g.commands) == 1
    assert g.commands[0] == "umount /mnt/data"
    n = len(g.commands)
    apply(g, plan)
    assert len(g.commands) == n
    assert g.fstab.count("/mnt/data") == 1 and "xfs" in g.fstab


def test_apply_filesystem_none_and_readonly() -> None:
    g = FakeGuest()
    g.add_nvdimm(0, 512 * MiB)
    g.add_nvdimm(1, 512 * MiB)
    plan = plan_of(region("raw", slot=0, fs="none", mount=None), region("ro", slot=1, readonly=True, mount="/mnt/ro"))
    states = {s.name: s for s in apply(g, plan)}
    assert g.commands == ["ndctl create-namespace -f -e namespace0.0 -m fsdax"]
    assert states["raw"].namespace_mode == "fsdax" and states["raw"].mountpoint is None
    assert states["ro"].namespace_mode == "raw" and states["ro"].mountpoint is None


def test_apply_that_cannot_settle_says_so() -> None:
    class Stubborn(FakeGuest):
        def _mutate(self, command: str, stdin: bytes | None) -> tuple[int, str]:
            return 0, ""  # claims success, changes nothing

    g = Stubborn()
    g.add_nvdimm(0, 512 * MiB)
    with pytest.raises(GuestError, match="did not settle after 6 rounds; still wanted: ndctl create-namespace"):
        apply(g, plan_of(region()))


def test_apply_failing_command_raises_with_its_stderr() -> None:
    g = _labelled_blank()
    # The plan forgot the label: the agent tries the label-less path and the kernel refuses.
    wrong = region()  # label_bytes None, but the guest region is 128 KiB smaller
    with pytest.raises(GuestError, match="measures 536739840 bytes, expected 536870912"):
        apply(g, plan_of(wrong))
    g2 = _labelled_blank()
    r = region(label=LABEL)
    g2.regions["region0"].labelled = True
    with pytest.raises(RemoteCommandError, match="misaligned"):
        g2.run("ndctl create-namespace -f -e %s -m fsdax", "namespace0.0", sudo=True)
    assert apply(g2, plan_of(r))[0].namespace_mode == "fsdax"


def test_every_agent_command_is_a_known_mutation() -> None:
    g = FakeGuest()
    g.add_nvdimm(0, 512 * MiB, label=LABEL)
    apply(g, plan_of(region(label=LABEL, fs="xfs")))
    assert g.commands and all(c.startswith(MUTATING_PREFIXES) for c in g.commands)
