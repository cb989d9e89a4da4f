"""Read the guest's facts: what the agent plans from and show draws. Changes nothing.

read_facts(settle): every nvdimm bus is waited on first (reading its wait_probe attribute, as ndctl
does: the kernel registers regions and namespaces asynchronously, e.g. right after a modprobe or a
hot-plug); with SETTLE also udev's queue and systemd's running mount jobs (fstab's entries, mounted
as their devices appear early in a boot). Then, in one go (each round trip costs a second or more
under TCG): modules, `ndctl list`, the sysfs topology (regions with their physical range, NUMA
nodes, DIMM mappings and persistence domain, NFIT handles, block devices, device-dax character
devices), blkid of each pmem block device, /proc/self/mounts, /etc/fstab, the nvdimm lines of the
kernel log and the top-level System RAM ranges of /proc/iomem.
Values are raw text; the host parses them (nvmprov.agent.facts), so this stays dumb.
"""

import glob
import os
import re
import time

from proc import read, run

MODULES = ("libnvdimm", "nfit", "nd_pmem", "nd_btt", "dax_pmem", "device_dax", "virtio_pmem",
           "cxl_acpi", "cxl_pci", "cxl_port", "cxl_mem", "cxl_pmem")
ND = "/sys/bus/nd/devices/"
KERNEL_LOG_LINES = 40
# systemd mounts fstab's nofail entries as their devices appear; with sshd up early in the boot the
# agent can read the facts while such a mount is still running, plan the same mount and fail with
# "already mounted" (seen after a power cycle). Wait for those jobs, at most this long.
MOUNT_JOBS_DEADLINE_S = 30.0
MOUNT_JOBS_POLL_S = 0.5
UDEV_SETTLE_TIMEOUT_S = 10
# Why a namespace did not come up is only in the kernel log ("... misaligned, unable to map").
KERNEL_LOG_PATTERN = re.compile(r"nd_pmem|nd_pfn|nd_region|nd_btt|virtio_pmem|libnvdimm|nfit|misaligned")
SYSTEM_RAM = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) : System RAM$")


def wait_probe():
    # libndctl's path (ndctlN's device is the bus); /sys/bus/nd/devices/ndbusN on newer kernels.
    paths = glob.glob("/sys/class/nd/ndctl*/device/wait_probe") + glob.glob(ND + "ndbus*/wait_probe")
    for path in sorted({os.path.realpath(p) for p in paths}):
        read(path)


def mount_jobs():
    """systemd's queued .mount jobs that will finish soon ("UNIT STATE"); None without systemd."""
    jobs = run(["systemctl", "list-jobs", "--no-legend", "--plain"])
    if jobs["rc"] != 0:
        return None
    return pending_mounts(jobs["stdout"], mount_source)


def pending_mounts(list_jobs_text, source_of):
    """The .mount jobs of `systemctl list-jobs` output worth waiting for: running ones, and waiting
    ones whose device exists. A nofail mount waiting for a device that is not there (a region
    detached, a CXL region not made yet) waits for its device timeout (90 s), not for us."""
    found = []
    for line in list_jobs_text.splitlines():
        fields = line.split()  # JOB UNIT TYPE STATE
        if len(fields) < 4 or not fields[1].endswith(".mount"):
            continue
        unit, state = fields[1], fields[3]
        if state == "running" or os.path.exists(source_of(unit) or ""):
            found.append(unit + " " + state)
    return found


def mount_source(unit):
    """What= of a mount unit: the device it mounts."""
    shown = run(["systemctl", "show", "--property=What", "--value", unit])
    return shown["stdout"].strip() if shown["rc"] == 0 else None


def settle():
    """udev's queue drained, then no systemd mount job left (no systemd: nothing to wait for).

    Returns what it waited for, in seconds, for the host's timings.
    """
    began = time.monotonic()
    run(["udevadm", "settle", f"--timeout={UDEV_SETTLE_TIMEOUT_S}"])
    udev = time.monotonic()
    deadline = udev + MOUNT_JOBS_DEADLINE_S
    polls = 0
    jobs = mount_jobs()
    while jobs and time.monotonic() < deadline:
        polls += 1
        time.sleep(MOUNT_JOBS_POLL_S)
        jobs = mount_jobs()
    return {"udev_s": round(udev - began, 3), "mount_jobs_s": round(time.monotonic() - udev, 3),
            "polls": polls, "left": jobs or []}


def builtin_modules():
    text = read(f"/lib/modules/{os.uname().release}/modules.builtin") or ""
    return {os.path.basename(line)[: -len(".ko")].replace("-", "_") for line in text.splitlines() if line}


def modules_present(names):
    builtin = builtin_modules()
    return sorted(m for m in names if m in builtin or os.path.isdir("/sys/module/" + m))


def regions():
    out = {}
    for path in sorted(glob.glob(ND + "region*")):
        count = int(read(path + "/mappings") or 0)
        out[os.path.basename(path)] = {
            "path": os.path.realpath(path),
            "resource": read(path + "/resource"),  # the guest physical start (root only)
            "size": read(path + "/size"),
            "read_only": read(path + "/read_only"),
            # the node the firmware (NFIT proximity domain) put the region on; numa_node is only the
            # nearest online node, so it need not be the placement
            "target_node": read(path + "/target_node"),
            "numa_node": read(path + "/numa_node"),
            "mappings": [read(f"{path}/mapping{i}") for i in range(count)],
            "persistence_domain": read(path + "/persistence_domain"),  # absent: the kernel shows none
        }
    return out


def daxdevs():
    out = {}
    for path in sorted(glob.glob("/sys/bus/dax/devices/dax*")):
        out[os.path.basename(path)] = {
            "path": os.path.realpath(path),
            "size": read(path + "/size"),
            "align": read(path + "/align"),
        }
    return out


def nmems():
    out = {}
    for path in sorted(glob.glob(ND + "nmem*")):
        out[os.path.basename(path)] = {"path": os.path.realpath(path), "handle": read(path + "/nfit/handle")}
    return out


def cxl_memdevs():
    """CXL memory devices and their serials (how a CXL region's device is found, not by enumeration)."""
    out = {}
    for path in sorted(glob.glob("/sys/bus/cxl/devices/mem*")):
        out[os.path.basename(path)] = {"serial": read(path + "/serial")}
    return out


def cxl_windows():
    """The CXL fixed memory windows: root decoders (decoder0.N) with their guest physical start and size."""
    out = {}
    for path in sorted(glob.glob("/sys/bus/cxl/devices/decoder0.*")):
        out[os.path.basename(path)] = {"start": read(path + "/start"), "size": read(path + "/size")}
    return out


def blockdevs():
    out = {}
    for path in sorted(glob.glob("/sys/class/block/pmem*")):
        name = os.path.basename(path)
        out[name] = {
            "path": os.path.realpath(path),
            "size_sectors": read(path + "/size"),
            "ro": read(path + "/ro"),
            "dax": read(path + "/queue/dax"),
            "blkid": run(["blkid", "-p", "-o", "export", "/dev/" + name]),
        }
    return out


def kernel_log():
    out = run(["dmesg"])
    lines = [line for line in out["stdout"].splitlines() if KERNEL_LOG_PATTERN.search(line)]
    return lines[-KERNEL_LOG_LINES:]


def system_ram():
    """The top-level System RAM ranges of /proc/iomem, as "start-end" hex (root sees real addresses)."""
    return [m.group(1) + "-" + m.group(2)
            for m in (SYSTEM_RAM.match(line) for line in (read("/proc/iomem") or "").splitlines()) if m]


def read_facts(settle_first=False):
    began = time.monotonic()
    wait_probe()
    waited = {"probe_s": round(time.monotonic() - began, 3)}
    if settle_first:
        waited.update(settle())
    return {
        "modules": modules_present(MODULES),
        "ndctl": run(["ndctl", "list", "--regions", "--namespaces", "--dimms", "--idle"]),
        "regions": regions(),
        "nmems": nmems(),
        "cxl_memdevs": cxl_memdevs(),
        "cxl_windows": cxl_windows(),
        "blockdevs": blockdevs(),
        "daxdevs": daxdevs(),
        "mounts": read("/proc/self/mounts") or "",
        "fstab": read("/etc/fstab") or "",
        "kernel_log": kernel_log(),
        "system_ram": system_ram(),
        "waited": waited,
    }
