"""Verify the mounted regions in one run: DAX and execute-in-place probe, then a durable payload.

argv: one JSON object
  {"scratch": DIR, "program": PATH,
   "regions": [{"name": str, "probe": MOUNTPOINT | null,
                "payload": {"path": str, "marker": str, "size_bytes": int} | null}, ...]}
For each region in order: the probe (when asked) copies PROGRAM onto the mount and into a private
directory under SCRATCH (on the root disk), runs both copies, reports `fincore` for both
(page-cache pages: 0 expected on DAX, > 0 on the root disk) and the raw `struct statx` of both
(the host reads STATX_ATTR_DAX from it), and removes both copies. Then the payload (when asked):
MARKER + SIZE random bytes at offset 0 of PATH (so the marker starts a filesystem block and the
host can find it in the backing volume), fsync of the file and its directory, sync, read back.
Finally one more sync of every filesystem. Prints one JSON object:
  {"regions": [{"name", "probe": {...} | null, "payload": {...} | null}, ...], "synced": true}
"""

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

AT_FDCWD = -100
STATX_ALL_BASIC = 0xFFF  # STATX_BASIC_STATS | STATX_BTIME
STATX_STRUCT_BYTES = 256
SYS_STATX_X86_64 = 332  # only used when the C library has no statx() wrapper
CHUNK_BYTES = 1 << 20


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


def run(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True)
    except OSError as e:
        return {"rc": 127, "stdout": "", "stderr": str(e)}
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr[-4000:]}


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


def main(argv):
    request = json.loads(argv[0])
    results = []
    for region in request["regions"]:
        result = {"name": region["name"], "probe": None, "payload": None}
        if region.get("probe"):
            result["probe"] = probe(region["probe"], request["scratch"], request["program"])
        if region.get("payload"):
            p = region["payload"]
            result["payload"] = payload(p["path"], p["marker"], int(p["size_bytes"]))
        results.append(result)
    os.sync()
    json.dump({"regions": results, "synced": True}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
