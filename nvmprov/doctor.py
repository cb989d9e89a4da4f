"""`nvmprov doctor` (is this host ready, and what to do where it is not) and `nvmprov prune`
(leftover volumes no domain uses).

Each check is a small function returning a Check; the verdicts on host facts are pure
(accel_check, nvdimm_check, leftover_names) and table-tested.
"""

from __future__ import annotations

import re
import shutil
import subprocess  # noqa: S404  (qemu-system-x86_64 -device help, a fixed argument list)
import xml.etree.ElementTree as ET  # noqa: S405  (libvirt's own XML)
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from typing import Literal

import libvirt

from . import host, identity, image, ledger, spec, state, storage, virt
from .errors import HostError, StorageError
from .plan import CXL_LSA_BYTES
from .sizes import backing_bytes_for, human_size

Status = Literal["ok", "warn", "fail"]
QEMU_HELP_TIMEOUT_S = 30.0
KERNEL_HEAD_BYTES = 128 * 1024   # a bzImage's version string sits in its first pages (0x42c0 in Debian 12's)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class Leftover:
    name: str
    path: str
    allocation_bytes: int


# ---------------------------------------------------------------------------------------------
# pure verdicts


def accel_check(offers_kvm: bool, has_virt_ext: bool) -> Check:
    if offers_kvm and has_virt_ext:
        return Check("acceleration", "ok", "kvm: libvirt offers it and the CPU has vmx/svm")
    if offers_kvm:
        return Check("acceleration", "warn",
                     "/dev/kvm is offered but the CPU has no vmx/svm (a paravirtual KVM, where guests hang in "
                     "firmware): TCG software emulation will be used (boot to SSH takes 10-40 s)",
                     "nothing to do with accel: auto; for kvm, run on a host with nested virtualisation (vmx/svm)")
    return Check("acceleration", "warn", "libvirt offers no kvm here: TCG software emulation will be used",
                 "load kvm_intel/kvm_amd (and give the user /dev/kvm) for kvm; accel: auto works as is")


def nvdimm_check(device_help: str | None) -> Check:
    """From `qemu-system-x86_64 -device help`; None when it could not be run (remote host)."""
    if device_help is None:
        return Check("qemu pmem devices", "warn", "could not ask QEMU (remote host or no emulator binary here)",
                     "create checks it when it starts a guest")
    have = [d for d in ("nvdimm", "virtio-pmem-pci") if re.search(rf'name "{d}"', device_help)]
    if "nvdimm" not in have:
        return Check("qemu pmem devices", "fail", "this QEMU has no nvdimm device",
                     "install a QEMU built with nvdimm support (Debian: qemu-system-x86 >= 1:5)")
    return Check("qemu pmem devices", "ok", "QEMU offers " + " and ".join(have))


CXL_DEVICES = ("pxb-cxl", "cxl-rp", "cxl-type3")
# What `model: cxl` was measured with (issue 20): guest kernel 6.1 (Debian 12) has CXL_ACPI, CXL_PCI,
# CXL_MEM, CXL_PORT, CXL_PMEM and CXL_REGION; pmem region creation came in 6.0.
CXL_MIN_GUEST_KERNEL = (6, 0)


def cxl_qemu_check(device_help: str | None) -> Check:
    """QEMU's CXL devices (model: cxl), from `-device help`; None when it could not be asked."""
    if device_help is None:
        return Check("qemu cxl devices", "warn", "could not ask QEMU (remote host or no emulator binary here)",
                     "create of a model: cxl guest fails at start if QEMU lacks them")
    missing = [d for d in CXL_DEVICES if not re.search(rf'name "{d}"', device_help)]
    if missing:
        return Check("qemu cxl devices", "warn", f"this QEMU has no {', '.join(missing)}: model: cxl cannot work",
                     "install QEMU >= 7.2 built with CXL (Debian 12's qemu-system-x86 has it), or use nvdimm")
    return Check("qemu cxl devices", "ok", "QEMU offers " + ", ".join(CXL_DEVICES) + " (model: cxl)")


def kernel_version(bzimage_head: bytes) -> str | None:
    """The version string of a bzImage (x86 boot protocol: header 'HdrS', a pointer at 0x20e to the
    string, relative to 0x200); None when these bytes do not hold one."""
    if len(bzimage_head) < 0x210 or bzimage_head[0x202:0x206] != b"HdrS":
        return None
    at = int.from_bytes(bzimage_head[0x20E:0x210], "little") + 0x200
    end = bzimage_head.find(b"\0", at)
    if at >= len(bzimage_head) or end < 0:
        return None
    text = bzimage_head[at:end].decode("ascii", "replace").split(" ")[0]
    return text or None


def cxl_kernel_check(version: str | None) -> Check:
    """The built-in image's guest kernel and model: cxl (VERSION None: not read)."""
    if version is None:
        return Check("guest kernel cxl", "warn", "could not read the built-in image's kernel version",
                     "`nvmprov image build`; model: cxl needs a guest kernel >= 6.0 with CXL_REGION and CXL_PMEM")
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) < CXL_MIN_GUEST_KERNEL:
        return Check("guest kernel cxl", "warn", f"the built-in image's kernel {version} is older than 6.0: no CXL "
                     "pmem regions", "model: cxl needs a guest kernel >= 6.0 with CXL_REGION and CXL_PMEM")
    return Check("guest kernel cxl", "ok", f"the built-in image's kernel {version} (6.1 was measured with model: cxl; "
                 "your own images need CXL_ACPI, CXL_PCI, CXL_MEM, CXL_PMEM, CXL_REGION and ndctl's cxl tool)")


def cxl_confinement_check(secmodels: Iterable[str], qemu_ids: tuple[int, int] | None) -> Check:
    """Can QEMU open files named only on its command line (CXL's)? libvirt neither chowns nor labels
    them: nvmprov makes them owned by QEMU's user (DAC); an AppArmor or SELinux driver would also need
    a rule for them, which libvirt does not add."""
    confining = [m for m in secmodels if m in ("apparmor", "selinux")]
    if confining:
        return Check("cxl confinement", "warn", f"libvirt confines QEMU with {', '.join(confining)}; it does not "
                     "allow files named only on QEMU's command line, as a CXL region's backing and label files",
                     "allow the pool's *.raw and *.lsa files for QEMU (AppArmor: a rule in "
                     "/etc/apparmor.d/local/abstractions/libvirt-qemu such as `/var/lib/nvmprov/pool/* rwk,`; "
                     "SELinux: label them svirt_image_t), or use model: nvdimm")
    who = f"uid {qemu_ids[0]}, gid {qemu_ids[1]}" if qemu_ids else "its user"
    drivers = ", ".join(secmodels) or "none"
    return Check("cxl confinement", "ok", f"no AppArmor or SELinux driver in libvirt ({drivers}): QEMU ({who}) opens "
                 "the CXL files nvmprov makes owned by it")


def leftover_names(owned: Iterable[str], existing: Iterable[str], referenced: set[str],
                   only: str | None = None) -> list[str]:
    """Volumes nvmprov made (OWNED, from the ledger) that exist and nothing references (by name),
    optionally matching ONLY. A volume's name says nothing about who made it: only the ledger does."""
    there = set(existing)
    return sorted(v for v in set(owned) if v in there and v not in referenced and (only is None or fnmatch(v, only)))


def space_check(pool_name: str, free_bytes: int, need_bytes: int, what: str) -> Check:
    if need_bytes <= free_bytes:
        return Check("pool space", "ok", f"pool {pool_name}: {human_size(free_bytes)} free, {what} need "
                     f"{human_size(need_bytes)} fully allocated")
    return Check("pool space", "fail", f"pool {pool_name}: {free_bytes} bytes free, {what} need {need_bytes} bytes",
                 "free space in the pool, ask for smaller regions, or use allocation: sparse")


# ---------------------------------------------------------------------------------------------
# side effects


def _version(n: int) -> str:
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


def _emulator(conn: libvirt.virConnect) -> str | None:
    try:
        caps = conn.getDomainCapabilities(None, "x86_64", "q35", "qemu", 0)
    except Exception:  # noqa: BLE001 - any failure means we cannot name the emulator
        return None
    return ET.fromstring(caps).findtext("path")  # noqa: S314 - libvirt's own XML


def _device_help(conn: libvirt.virConnect) -> str | None:
    emulator = _emulator(conn) if storage._is_local(conn) else None
    binary = emulator or shutil.which("qemu-system-x86_64")
    if not storage._is_local(conn) or binary is None:
        return None
    try:
        proc = subprocess.run([binary, "-device", "help"], capture_output=True, text=True,  # noqa: S603 - fixed argv, no shell
                              timeout=QEMU_HELP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout + proc.stderr


def run(uri: str, *, spec_path: str | None = None) -> list[Check]:
    """Every check against the hypervisor at URI; stops early only when libvirt is unreachable."""
    try:
        conn = virt.connect(uri)
    except HostError as exc:
        return [Check("libvirt", "fail", str(exc).split(";")[0],
                      "start the daemons (virtlogd -d; libvirtd -d) or run scripts/setup.sh; check --connect")]
    try:
        checks = [Check("libvirt", "ok", f"{uri}: libvirt {_version(conn.getLibVersion())}, "
                        f"QEMU {_version(conn.getVersion())}")]
        device_help = _device_help(conn)
        checks.append(nvdimm_check(device_help))
        caps = conn.getCapabilities()
        checks.append(accel_check(*host.kvm_facts(caps)))
        checks.append(cxl_qemu_check(device_help))
        checks.append(cxl_confinement_check(host.security_models(caps), host.qemu_ids(caps)))
        checks += _pool_checks(conn, spec_path)
        return checks
    finally:
        conn.close()


def _pool_checks(conn: libvirt.virConnect, spec_path: str | None) -> list[Check]:
    try:
        pool = storage.pool_of(conn, storage.DEFAULT_POOL)
    except StorageError as exc:
        return [Check("pool", "fail", str(exc).split(";")[0],
                      "`nvmprov image build` makes the pool and the image (a first create does too)")]
    checks = [Check("pool", "ok", f"pool {pool.name()} at {storage.pool_path(pool)}")]
    free = storage.pool_free_bytes(pool)
    if spec_path is not None:
        need, what = _spec_need(spec_path)
        checks.append(space_check(pool.name(), free, need, what))
    else:
        checks.append(Check("pool space", "ok", f"pool {pool.name()}: {human_size(free)} free "
                            "(-f FILE checks it against a spec)"))
    names = image.builtin_volume_names()
    if image.is_built(pool):
        checks.append(Check("built-in image", "ok", f"{names[0]} and its kernel/initrd are in the pool"))
        checks.append(cxl_kernel_check(_kernel_version(pool, names[1])))
    else:
        checks.append(Check("built-in image", "fail", f"{names[0]} is not in pool {pool.name()}",
                            "`nvmprov image build` (2-4 minutes; create also builds it on first use)"))
    left = leftovers(conn, pool)
    if left:
        total = sum(v.allocation_bytes for v in left)
        shown = ", ".join(v.name for v in left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        checks.append(Check("leftover volumes", "warn", f"{len(left)} volume(s) no domain uses, "
                            f"{human_size(total)} on disk: {shown}",
                            "`nvmprov prune` lists them and removes them after confirmation"))
    else:
        checks.append(Check("leftover volumes", "ok", "every nvmprov volume in the pool is in use"))
    return checks


def _kernel_version(pool: libvirt.virStoragePool, volume: str) -> str | None:
    try:
        head = b"".join(storage.download(storage.volume(pool, volume), length=KERNEL_HEAD_BYTES))
    except (StorageError, libvirt.libvirtError):
        return None
    return kernel_version(head)


def _spec_need(spec_path: str) -> tuple[int, str]:
    loaded = spec.load(spec_path)
    need = sum(backing_bytes_for(r.size_bytes) for g in loaded.guests for r in g.pmem if r.allocation == "full")
    need += sum(CXL_LSA_BYTES for g in loaded.guests for r in g.pmem if r.model == "cxl")  # its label area
    return need, f"the regions of {spec_path}"


def _referenced(conn: libvirt.virConnect, pool: libvirt.virStoragePool) -> set[str]:
    """Names of the pool's volumes some domain uses (virt.path_users) or some volume's backing
    chain names."""
    storage.refresh(pool)
    vols = pool.listAllVolumes(0)
    by_path = {v.path(): v.name() for v in vols}
    used = {by_path[p] for p, users in virt.path_users(conn, by_path).items() if users}
    return used | {p.rsplit("/", 1)[-1] for p in map(storage.backing_path, vols) if p}


def leftovers(conn: libvirt.virConnect, pool: libvirt.virStoragePool, only: str | None = None,
              hv: str | None = None) -> list[Leftover]:
    """The volumes nvmprov made on this hypervisor (ledger.py) that no domain uses, and built-in
    images of earlier recipes that no overlay or domain uses. Adopted volumes (the spec named them)
    only when ONLY names one exactly: nvmprov did not make them. HV: the hypervisor's key, when the
    caller already asked."""
    hv = hv or identity.of(conn).key
    vols = {v.name(): v for v in pool.listAllVolumes(0)}
    owned = [e.volume for e in ledger.read(pool).entries
             if e.hypervisor == hv and (not e.adopted or e.volume == only)] + image.stale_volume_names(vols)
    names = leftover_names(owned, vols, _referenced(conn, pool), only=only)
    return [Leftover(n, vols[n].path(), int(vols[n].info()[2])) for n in names]


def candidates(conn: libvirt.virConnect, pool: libvirt.virStoragePool, only: str | None = None) -> list[Leftover]:
    """What `prune` lists: leftovers, after the volumes of guests made before the ledger were
    recorded (ledger.migrate; the pool held shared, as a create holds it)."""
    hv = identity.of(conn).key
    with state.pool_lock(hv, pool.name()):
        ledger.migrate(conn, pool, hv)
    return leftovers(conn, pool, only=only, hv=hv)


def prune(conn: libvirt.virConnect, pool_name: str, names: list[str], only: str | None = None) -> list[str]:
    """Delete NAMES after checking again, with the pool held exclusively (no create or attach runs),
    that nvmprov made them and nothing references them; forget ledger entries whose volume is gone."""
    pool = storage.pool_of(conn, pool_name)
    hv = identity.of(conn).key
    with state.pool_lock(hv, pool_name, exclusive=True):
        ledger.migrate(conn, pool, hv)  # guests made before the ledger: their volumes are recorded first
        still = {v.name for v in leftovers(conn, pool, only=only, hv=hv)}
        deleted = [name for name in names if name in still and storage.delete(pool, name)]
        gone = [e.volume for e in ledger.read(pool).entries
                if e.hypervisor == hv and storage.lookup(pool, e.volume) is None]
        ledger.forget(pool, hv, set(deleted) | set(gone))
    return deleted


def as_dicts(items: Iterable[Check | Leftover]) -> list[dict[str, object]]:
    return [asdict(i) for i in items]
