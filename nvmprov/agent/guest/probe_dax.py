"""Probe DAX and execute-in-place on one mounted region; leaves nothing behind.

argv: MOUNTPOINT SCRATCH_DIR PROGRAM
Copies PROGRAM onto the mount and into SCRATCH_DIR (on the root disk), runs both copies, then
reports `fincore` for both (page-cache pages: 0 expected on DAX, > 0 on the root disk) and the
raw `struct statx` of both (the host reads STATX_ATTR_DAX from it). Prints one JSON object.
"""

import ctypes
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


def main():
    mount, scratch, program = sys.argv[1:4]
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
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
