"""One round of the agent: run the steps it was given, load modules, print the guest's facts as JSON.

argv: nothing (read facts only), or one JSON object {"steps": [...], "modules": [...]}:
  modules  kernel modules that must be loaded before facts mean anything (nfit, nd_pmem,
           virtio_pmem): the missing ones are loaded with `modprobe -a` (idempotent); the result
           comes back under "modprobe" (null when nothing was missing).
  steps    commands the host planned from the previous facts, run in order with `/bin/sh -c`, each
           {"command": str, "stdin_b64": str | null, "timeout_s": float}; the first failure stops
           the rest. Their results come back under "steps" ({"command", "rc", "stderr"}).
Every nvdimm bus is then waited on (reading its wait_probe attribute, as ndctl does: the kernel
registers regions and namespaces asynchronously, e.g. right after a modprobe or a hot-plug), and
so are udev and systemd's running mount jobs (fstab's entries, mounted as their devices appear).
Then everything the agent needs in the same round trip (each costs a second or more under TCG):
modules, `ndctl list`, the sysfs topology (regions with their NUMA nodes, DIMM mappings and
persistence domain, NFIT handles, CXL memdev serials, block devices, device-dax character devices), blkid of each pmem
block device, /proc/self/mounts and /etc/fstab.
Values are raw text; the host parses them, so this stays dumb and old-python friendly.
Nothing but the given steps and the module loading changes the guest.
"""

import base64
import glob
import json
import os
import re
import subprocess
import sys
import time

MODULES = ("libnvdimm", "nfit", "nd_pmem", "nd_btt", "dax_pmem", "device_dax", "virtio_pmem",
           "cxl_acpi", "cxl_pci", "cxl_port", "cxl_mem", "cxl_pmem")
ND = "/sys/bus/nd/devices/"
KERNEL_LOG_LINES = 40
# systemd mounts fstab's nofail entries as their devices appear; with sshd up early in the boot the
# agent can read the facts while such a mount is still running, plan the same mount and fail with
# "already mounted" (seen after a power cycle). Wait for those jobs, at most this long.
MOUNT_JOBS_DEADLINE_S = 30.0
MOUNT_JOBS_POLL_S = 0.5
# Why a namespace did not come up is only in the kernel log ("... misaligned, unable to map").
KERNEL_LOG_PATTERN = re.compile(r"nd_pmem|nd_pfn|nd_region|nd_btt|virtio_pmem|libnvdimm|nfit|misaligned")


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def run(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except OSError as e:  # the tool is not installed
        return {"rc": 127, "stdout": "", "stderr": str(e)}
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr[-4000:]}


def run_step(step):
    """One planned command; rc 124 (as timeout(1) says) when it overran its time."""
    data = base64.b64decode(step["stdin_b64"]) if step.get("stdin_b64") else b""
    out = {"command": step["command"]}
    try:
        p = subprocess.run(
            ["/bin/sh", "-c", step["command"]], input=data, capture_output=True, timeout=float(step["timeout_s"])
        )
    except subprocess.TimeoutExpired:
        out.update(rc=124, stderr=f"timed out after {float(step['timeout_s']):g} s")
        return out
    out.update(rc=p.returncode, stderr=p.stderr.decode("utf-8", "replace")[-4000:])
    return out


def run_steps(steps):
    results = []
    for step in steps:
        results.append(run_step(step))
        if results[-1]["rc"] != 0:
            break
    return results


def wait_probe():
    # libndctl's path (ndctlN's device is the bus); /sys/bus/nd/devices/ndbusN on newer kernels.
    paths = glob.glob("/sys/class/nd/ndctl*/device/wait_probe") + glob.glob(ND + "ndbus*/wait_probe")
    for path in sorted({os.path.realpath(p) for p in paths}):
        read(path)


def settle_mounts():
    """udev's queue drained, then no systemd mount job left running (no systemd: nothing to wait for)."""
    run(["udevadm", "settle", "--timeout=10"])
    deadline = time.monotonic() + MOUNT_JOBS_DEADLINE_S
    while time.monotonic() < deadline:
        jobs = run(["systemctl", "list-jobs", "--no-legend", "--plain"])
        if jobs["rc"] != 0 or ".mount " not in jobs["stdout"]:
            return
        time.sleep(MOUNT_JOBS_POLL_S)


def load_modules(wanted):
    missing = [m for m in wanted if m not in modules_present(wanted)]
    if not missing:
        return None
    result = run(["modprobe", "-a"] + missing)
    result["command"] = "modprobe -a " + " ".join(missing)
    return result


def builtin_modules():
    text = read(f"/lib/modules/{os.uname().release}/modules.builtin") or ""
    return {os.path.basename(line)[: -len(".ko")].replace("-", "_") for line in text.splitlines() if line}


def modules_present(names):
    builtin = builtin_modules()
    return sorted(m for m in names if m in builtin or os.path.isdir("/sys/module/" + m))


def modules():
    return modules_present(MODULES)


def regions():
    out = {}
    for path in sorted(glob.glob(ND + "region*")):
        count = int(read(path + "/mappings") or 0)
        out[os.path.basename(path)] = {
            "path": os.path.realpath(path),
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


def main(argv):
    request = json.loads(argv[0]) if argv else {}
    modprobe = load_modules(request.get("modules") or [])
    steps = run_steps(request.get("steps") or [])
    wait_probe()
    settle_mounts()
    facts = {
        "modules": modules(),
        "ndctl": run(["ndctl", "list", "--regions", "--namespaces", "--dimms", "--idle"]),
        "regions": regions(),
        "nmems": nmems(),
        "cxl_memdevs": cxl_memdevs(),
        "blockdevs": blockdevs(),
        "daxdevs": daxdevs(),
        "mounts": read("/proc/self/mounts") or "",
        "fstab": read("/etc/fstab") or "",
        "kernel_log": kernel_log(),
        "steps": steps,
        "modprobe": modprobe,
    }
    json.dump(facts, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
