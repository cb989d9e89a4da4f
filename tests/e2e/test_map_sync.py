"""map_sync on the shared e2e guest (issue 17): measured in the guest, true on the nvdimm regions'
DAX filesystems, false on virtio-pmem's (DAX, but flushes must go through fsync), and, once the
built-in image carries PMDK, the same verdict as libpmem's own is_pmem for the same filesystem.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from .conftest import REPO, Created, nvmprov

pytestmark = pytest.mark.e2e

# In the guest (python3 -, as root): libpmem's pmem_map_file on a new file under each directory,
# its is_pmem verdict, the file removed again.
PMDK_IS_PMEM = r'''
import ctypes, json, os, sys
lib = ctypes.CDLL("libpmem.so.1")
lib.pmem_map_file.restype = ctypes.c_void_p
lib.pmem_map_file.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint,
                              ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int)]
lib.pmem_unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PMEM_FILE_CREATE = 1
out = {}
for d in sys.argv[1:]:
    path = os.path.join(d, ".nvmprov-e2e-pmdk")
    mapped, is_pmem = ctypes.c_size_t(), ctypes.c_int()
    addr = lib.pmem_map_file(path.encode(), 4 << 20, PMEM_FILE_CREATE, 0o600, ctypes.byref(mapped),
                             ctypes.byref(is_pmem))
    out[d] = None if not addr else bool(is_pmem.value)
    if addr:
        lib.pmem_unmap(addr, mapped.value)
    os.unlink(path)
print(json.dumps(out))
'''


def image_has_pmdk() -> bool:
    return "pmdk-tools" in (REPO / "templates" / "image" / "packages.txt").read_text().split()


def test_map_sync_true_on_nvdimm_false_on_virtio_pmem(mixed_guest: Created) -> None:
    assert mixed_guest.proc.returncode == 0, mixed_guest.proc.stderr[-6000:]
    for region in mixed_guest.guest["regions"]:
        # an nvdimm's DAX filesystem grants MAP_SYNC: applications may flush from user space;
        # virtio-pmem gives DAX but no MAP_SYNC: they must fsync/msync
        assert region["map_sync"] is (region["model"] == "nvdimm"), region
        assert region["dax"] is True and region["persistence_domain"] is None, region


@pytest.mark.skipif(not image_has_pmdk(), reason="the built-in image's recipe (templates/image/packages.txt) "
                    "does not carry pmdk-tools yet (issue 14 adds it)")
def test_pmdk_agrees_with_map_sync(mixed_guest: Created) -> None:
    regions = mixed_guest.guest["regions"]
    mounts = [r["mountpoint"] for r in regions]
    proc = nvmprov("ssh", mixed_guest.name, "--", "sudo python3 - " + " ".join(shlex.quote(m) for m in mounts),
                   stdin=PMDK_IS_PMEM, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdict = json.loads(proc.stdout)
    assert {m: verdict[m] for m in mounts} == {r["mountpoint"]: r["map_sync"] for r in regions}
    # and PMDK's own tools work on the nvdimm region at once
    plain = next(r for r in regions if r["model"] == "nvdimm" and r["filesystem"] == "ext4")
    pool = str(Path(plain["mountpoint"]) / "e2e.obj")
    script = f"pmempool create obj --size=16M {shlex.quote(pool)} && pmempool check -v {shlex.quote(pool)}; " \
             f"rc=$?; rm -f {shlex.quote(pool)}; exit $rc"
    proc = nvmprov("ssh", mixed_guest.name, "--", "sudo sh -c " + shlex.quote(script), timeout_s=300)
    assert proc.returncode == 0 and "consistent" in proc.stdout, proc.stdout + proc.stderr[-2000:]
