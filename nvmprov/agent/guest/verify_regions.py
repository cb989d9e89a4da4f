"""Verify the mounted regions: DAX and execute-in-place probe, then a durable payload.

verify_regions(request), REQUEST being
  {"scratch": DIR, "program": PATH,
   "regions": [{"name": str, "probe": MOUNTPOINT | null,
                "payload": {"path": str, "marker": str, "size_bytes": int} | null,
                "map_sync": {"path": DIR | DEVICE, "device": bool, "length": int} | null,
                "tail": {"device": str, "offset": int, "length": int, "devdax": bool,
                         "marker": str | null} | null}, ...]}
For each region in order: the probe (when asked) copies PROGRAM onto the mount and into a private
directory under SCRATCH (on the root disk), runs both copies, reports `fincore` for both
(page-cache pages: 0 expected on DAX, > 0 on the root disk) and the raw `struct statx` of both
(the host reads STATX_ATTR_DAX from it), and removes both copies. Then the payload (when asked):
MARKER + SIZE random bytes at offset 0 of PATH (so the marker starts a filesystem block and the
host can find it in the backing volume), fsync of the file and its directory, sync, read back.
map_sync (when asked): mmap with MAP_SHARED_VALIDATE | MAP_SYNC, read-write, of a fresh 4 KiB file
in DIR (removed after) or of the first LENGTH bytes of DEVICE (a devdax device; nothing is written),
then munmap: {"ok": bool, "errno": int} ("ok": null when the file or device could not be opened).
tail (when asked): the reserved tail of a region without a filesystem, LENGTH bytes at OFFSET of
DEVICE. With a marker it is written first (MARKER, newline, sha256 hex of the body, newline, random
body: self-describing, so a later run can check it without the host's help), through mmap on
devdax, pwrite + fsync on a block device. Then it is read back (the block device's cached pages
dropped first) and described: {"offset", "length", "marker", "sha256", "sha256_written", "self_ok"}.
Without a marker nothing is written. No other byte of the device is touched.
Finally one more sync of every filesystem. Returns
  {"regions": [{"name", "probe", "payload", "map_sync", "tail"}, ...], "synced": true}
sha256_files(paths): {path: sha256 hex, or null for a file it cannot read}; reads only.
"""

import ctypes
import hashlib
import mmap
import os
import re
import shutil
import tempfile

from proc import run

AT_FDCWD = -100
STATX_ALL_BASIC = 0xFFF  # STATX_BASIC_STATS | STATX_BTIME
STATX_STRUCT_BYTES = 256
SYS_STATX_X86_64 = 332  # only used when the C library has no statx() wrapper
CHUNK_BYTES = 1 << 20
PROT_READ_WRITE = 0x3
MAP_SHARED_VALIDATE = 0x03
MAP_SYNC = 0x80000
MARKER_RE = re.compile(rb"[A-Za-z0-9:._-]{8,200}")


# --- the DAX / execute-in-place probe


def statx(path):
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(STATX_STRUCT_BYTES)
    fn = getattr(libc, "statx", None)
    args = (ctypes.c_int(AT_FDCWD), os.fsencode(path), ctypes.c_int(0), ctypes.c_uint(STATX_ALL_BASIC), buf)
    rc = fn(*args) if fn is not None else libc.syscall(SYS_STATX_X86_64, *args)
    if rc != 0:
        return {"error": os.strerror(ctypes.get_errno())}
    return {"raw": buf.raw.hex()}


def place(program, directory):
    # A fresh private directory: root must not follow a symlink someone planted under a fixed name.
    path = os.path.join(tempfile.mkdtemp(prefix=".nvmprov-xip-", dir=directory), os.path.basename(program))
    shutil.copyfile(program, path)
    os.chmod(path, 0o755)  # noqa: S103 - a copy of a system program that must stay executable
    return path


def probe(mount, scratch, program):
    copies = {}
    out = {"copies": copies, "exec": {}, "statx": {}}
    try:
        for kind, directory in (("dax", mount), ("root", scratch)):
            copies[kind] = place(program, directory)
            out["exec"][kind] = run([copies[kind]])["rc"]
        out["fincore"] = run(["fincore", "--json", "-o", "PAGES,FILE", copies["dax"], copies["root"]])
        for kind, path in copies.items():
            out["statx"][kind] = statx(path)
    finally:
        for path in copies.values():
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return out


# --- the payload


def durable_write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    os.sync()


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def payload(path, marker, size):
    data = marker.encode() + os.urandom(size)
    durable_write(path, data)
    written = hashlib.sha256(data).hexdigest()
    return {"path": path, "bytes": len(data), "sha256": written, "sha256_read": sha256_of(path)}


# --- MAP_SYNC


def map_sync(path, device, length):
    """Does the kernel grant a MAP_SYNC mapping here? Measured, as PMDK's libpmem decides is_pmem."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    try:
        if device:
            fd, name = os.open(path, os.O_RDWR), None
        else:
            fd, name = tempfile.mkstemp(prefix=".nvmprov-map-sync-", dir=path)
            os.write(fd, bytes(length))
    except OSError as e:  # not measured (not a refusal of MAP_SYNC)
        return {"ok": None, "errno": e.errno, "error": str(e)}
    try:
        addr = libc.mmap(None, length, PROT_READ_WRITE, MAP_SHARED_VALIDATE | MAP_SYNC, fd, 0)
        err = ctypes.get_errno()
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return {"ok": False, "errno": err, "error": os.strerror(err)}
        libc.munmap(addr, length)
        return {"ok": True, "errno": 0}
    finally:
        os.close(fd)
        if name is not None:
            os.unlink(name)


# --- the reserved tail of a region without a filesystem


def tail_bytes(marker, length):
    body_len = length - len(marker) - 66
    body = os.urandom(body_len)
    return marker + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def tail_io(device, offset, length, devdax, data=None):
    """Write DATA (when given) at OFFSET of DEVICE, then read LENGTH bytes there."""
    fd = os.open(device, os.O_RDWR if data is not None else os.O_RDONLY)
    try:
        if devdax:  # a character device: only mmap reaches it (msync is refused, stores go straight through)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if data is not None else 0)
            m = mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset)
            try:
                if data is not None:
                    m[:] = data
                return bytes(m[:])
            finally:
                m.close()
        if data is not None:
            view = memoryview(data)
            at = offset
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            os.fsync(fd)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)  # read the media, not the cache
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def describe_tail(raw):
    marker, _, rest = raw.partition(b"\n")
    digest, _, body = rest.partition(b"\n")
    ok = bool(MARKER_RE.fullmatch(marker)) and hashlib.sha256(body).hexdigest().encode() == digest
    return {"marker": marker.decode() if MARKER_RE.fullmatch(marker) else None, "self_ok": ok,
            "sha256": hashlib.sha256(raw).hexdigest()}


def tail(job):
    written = None
    data = None
    if job.get("marker"):
        data = tail_bytes(job["marker"].encode(), int(job["length"]))
        written = hashlib.sha256(data).hexdigest()
    raw = tail_io(job["device"], int(job["offset"]), int(job["length"]), bool(job.get("devdax")), data)
    out = {"offset": int(job["offset"]), "length": int(job["length"]), "sha256_written": written}
    out.update(describe_tail(raw))
    return out


def sha256_files(paths):
    out = {}
    for path in paths:
        try:
            out[path] = sha256_of(path)
        except OSError:
            out[path] = None
    return out


def verify_regions(request):
    results = []
    for region in request["regions"]:
        result = {"name": region["name"], "probe": None, "payload": None, "map_sync": None, "tail": None}
        if region.get("tail"):
            result["tail"] = tail(region["tail"])
        if region.get("map_sync"):
            m = region["map_sync"]
            result["map_sync"] = map_sync(m["path"], bool(m.get("device")), int(m["length"]))
        if region.get("probe"):
            result["probe"] = probe(region["probe"], request["scratch"], request["program"])
        if region.get("payload"):
            p = region["payload"]
            result["payload"] = payload(p["path"], p["marker"], int(p["size_bytes"]))
        results.append(result)
    os.sync()
    return {"regions": results, "synced": True}
