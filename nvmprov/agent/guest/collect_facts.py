"""Read-only: print one JSON object of raw nvdimm/pmem facts of this guest.

Everything the agent needs in one round trip (each costs a second or more under TCG):
modules, `ndctl list`, the sysfs topology (regions, their DIMM mappings, NFIT handles,
block devices), blkid of each pmem block device, /proc/self/mounts and /etc/fstab.
Values are raw text; the host parses them, so this stays dumb and old-python friendly.
"""

import glob
import json
import os
import re
import subprocess
import sys

MODULES = ("libnvdimm", "nfit", "nd_pmem", "nd_btt", "dax_pmem", "virtio_pmem")
ND = "/sys/bus/nd/devices/"
KERNEL_LOG_LINES = 40
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


def builtin_modules():
    text = read(f"/lib/modules/{os.uname().release}/modules.builtin") or ""
    return {os.path.basename(line)[: -len(".ko")].replace("-", "_") for line in text.splitlines() if line}


def modules():
    builtin = builtin_modules()
    return sorted(m for m in MODULES if m in builtin or os.path.isdir("/sys/module/" + m))


def regions():
    out = {}
    for path in sorted(glob.glob(ND + "region*")):
        count = int(read(path + "/mappings") or 0)
        out[os.path.basename(path)] = {
            "path": os.path.realpath(path),
            "size": read(path + "/size"),
            "read_only": read(path + "/read_only"),
            "mappings": [read(f"{path}/mapping{i}") for i in range(count)],
        }
    return out


def nmems():
    out = {}
    for path in sorted(glob.glob(ND + "nmem*")):
        out[os.path.basename(path)] = {"path": os.path.realpath(path), "handle": read(path + "/nfit/handle")}
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


def main():
    facts = {
        "modules": modules(),
        "ndctl": run(["ndctl", "list", "--regions", "--namespaces", "--dimms", "--idle"]),
        "regions": regions(),
        "nmems": nmems(),
        "blockdevs": blockdevs(),
        "mounts": read("/proc/self/mounts") or "",
        "fstab": read("/etc/fstab") or "",
        "kernel_log": kernel_log(),
    }
    json.dump(facts, sys.stdout)


if __name__ == "__main__":
    main()
