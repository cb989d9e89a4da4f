"""Every nvdimm namespace mode on one real guest (issue 17): devdax, sector (BTT) and raw, with the
power cycle. devdax and raw without a filesystem are proved through a reserved tail of the device:
its marker sits there in the host backing file, and data a user writes outside it is never touched
by `verify`. One guest (e2e-modes), created once for this module.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nvmprov.sizes import RESERVED_TAIL_BYTES

from .conftest import _require_host, destroy_quietly, nvmprov, write_spec

pytestmark = pytest.mark.e2e

NAME = "e2e-modes"
MiB = 1024 * 1024
SPEC = {
    "version": 1,
    "name": NAME,
    "memory": "1GiB",
    "pmem": [
        {"name": "dd", "size": "128MiB", "mode": "devdax"},            # align 2MiB, no filesystem
        {"name": "sec", "size": "128MiB", "mode": "sector", "filesystem": "ext4"},
        {"name": "raw", "size": "64MiB", "mode": "raw", "filesystem": "none"},
    ],
}
# Measured on this stack: a 128MiB devdax namespace gives a 124MiB /dev/daxN.M (the page map),
# a 128MiB sector namespace 133005312 bytes of BTT blocks.
DEVDAX_BYTES = 130023424
SECTOR_BYTES = 133005312
USER_BYTES = 1 * MiB  # what the test writes, at the start of the device and right before the tail

# Runs in the guest (python3 -, as root): write (or, without "write", only hash) USER_BYTES at
# offset 0 and at usable - USER_BYTES of a device, through mmap for devdax, pwrite+fsync otherwise.
USER_DATA = r'''
import hashlib, json, mmap, os, sys
device, usable, n, write = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "write"
out = {}
fd = os.open(device, os.O_RDWR)
for off in (0, usable - n):
    if device.startswith("/dev/dax"):
        page = 2 * 1024 * 1024
        base = off // page * page
        m = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        lo = off - base
        if write:
            m[lo:lo + n] = os.urandom(n)
        data = bytes(m[lo:lo + n])
        m.close()
    else:
        if write:
            os.pwrite(fd, os.urandom(n), off)
            os.fsync(fd)
        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        data = os.pread(fd, n, off)
    out[str(off)] = hashlib.sha256(data).hexdigest()
os.close(fd)
print(json.dumps(out))
'''


@dataclass
class Modes:
    spec_path: Path
    report: dict

    @property
    def regions(self) -> dict[str, dict]:
        return {r["name"]: r for r in self.report["guests"][0]["regions"]}


@pytest.fixture(scope="module")
def modes(e2e_tmp: Path) -> Iterator[Modes]:
    _require_host()
    destroy_quietly(NAME)
    path = write_spec(e2e_tmp, NAME, SPEC)
    proc = nvmprov("create", str(path), "--json")
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"create printed no JSON (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    yield Modes(path, report)
    destroy_quietly(NAME)


def user_data(device: str, usable: int, *, write: bool) -> dict[str, str]:
    cmd = "sudo python3 - " + " ".join(shlex.quote(a) for a in (device, str(usable), str(USER_BYTES),
                                                                 "write" if write else "read"))
    proc = nvmprov("ssh", NAME, "--", cmd, stdin=USER_DATA, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_create_proves_devdax_sector_and_raw_through_a_power_cycle(modes: Modes) -> None:
    g = modes.report["guests"][0]
    assert g["ok"] is True and g["error"] is None, g
    dd, sec, raw = modes.regions["dd"], modes.regions["sec"], modes.regions["raw"]

    assert dd["namespace_mode"] == "devdax" and re.fullmatch(r"/dev/dax\d+\.\d+", dd["guest_device"]), dd
    assert (dd["dax"], dd["map_sync"], dd["xip_ok"], dd["data_ok"], dd["persisted"]) == (True, True, None, True, True)
    assert dd["usable_bytes"] == DEVDAX_BYTES - RESERVED_TAIL_BYTES == dd["payload_offset"], dd
    assert dd["filesystem"] == "none" and dd["mountpoint"] is None

    assert sec["namespace_mode"] == "sector" and re.fullmatch(r"/dev/pmem\d+s", sec["guest_device"]), sec
    # BTT is not DAX by design: dax does not apply (None, never False), MAP_SYNC is refused
    assert (sec["dax"], sec["map_sync"], sec["xip_ok"], sec["data_ok"], sec["persisted"]) == (
        None, False, None, True, True)
    assert sec["usable_bytes"] == SECTOR_BYTES and sec["filesystem"] == "ext4" and sec["mountpoint"] == "/mnt/sec"

    assert raw["namespace_mode"] == "raw" and re.fullmatch(r"/dev/pmem\d+", raw["guest_device"]), raw
    assert (raw["dax"], raw["map_sync"], raw["xip_ok"], raw["data_ok"], raw["persisted"]) == (
        None, None, None, True, True)
    assert raw["usable_bytes"] == 64 * MiB - RESERVED_TAIL_BYTES == raw["payload_offset"]

    for r in (dd, raw):
        # the marker starts the reserved tail, which is the last RESERVED_TAIL_BYTES of the backing
        # file (a label-less devdax namespace keeps its page map at the front, so its device ends there too)
        assert r["marker"].startswith(f"NVMPROV-MARKER:{NAME}:{r['name']}:"), r
        assert r["marker_offset"] == r["size_bytes"] - RESERVED_TAIL_BYTES, r
        assert r["payload_path"] == r["guest_device"]
    assert sec["marker_offset"] is not None and sec["payload_path"] == "/mnt/sec/.nvmprov-payload"
    for r in modes.regions.values():
        assert r["persistence_domain"] is None  # QEMU's NFIT declares none; the kernel shows none


def test_verify_only_reads_the_tail_and_leaves_user_data_alone(modes: Modes) -> None:
    dd, raw = modes.regions["dd"], modes.regions["raw"]
    before = {name: user_data(r["guest_device"], r["usable_bytes"], write=True)
              for name, r in (("dd", dd), ("raw", raw))}
    proc = nvmprov("verify", NAME, "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = {r["name"]: r for r in json.loads(proc.stdout)["guests"][0]["regions"]}
    for name, r in (("dd", dd), ("raw", raw)):
        assert user_data(r["guest_device"], r["usable_bytes"], write=False) == before[name]
        # the tail was re-read, not re-written: same content, same offset, data_ok from its own checksum
        assert again[name]["payload_sha256"] == r["payload_sha256"], again[name]
        assert again[name]["payload_offset"] == r["payload_offset"] and again[name]["data_ok"] is True
        assert again[name]["marker"] == r["marker"]


def test_text_report_shows_mode_device_and_map_sync(modes: Modes) -> None:
    proc = nvmprov("verify", NAME)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.strip().startswith("region"))
    assert "map_sync" in header.split()
    row = next(line.split() for line in lines if line.strip().startswith("dd "))
    assert "devdax" in row and modes.regions["dd"]["guest_device"] in row


def test_daxctl_in_the_image_sees_the_devdax_device(modes: Modes) -> None:
    dd = modes.regions["dd"]
    proc = nvmprov("ssh", NAME, "--", "sudo daxctl list", timeout_s=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = json.loads(proc.stdout)
    devices = {d["chardev"]: d for d in (listed if isinstance(listed, list) else [listed])}
    chardev = dd["guest_device"].removeprefix("/dev/")
    assert devices[chardev]["size"] == DEVDAX_BYTES and devices[chardev]["mode"] == "devdax", devices


def test_rerun_changes_nothing(modes: Modes) -> None:
    proc = nvmprov("create", str(modes.spec_path), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = {r["name"]: r for r in json.loads(proc.stdout)["guests"][0]["regions"]}
    for name, r in modes.regions.items():
        assert again[name]["namespace_mode"] == r["namespace_mode"]
        assert again[name]["usable_bytes"] == r["usable_bytes"]
    for name in ("dd", "raw"):
        assert again[name]["payload_sha256"] == modes.regions[name]["payload_sha256"]
