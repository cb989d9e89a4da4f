"""Where QEMU's nvdimm start-up time goes: a standalone QEMU (no guest, no libvirt) preallocating
one memory-backend-file, against a Python loop touching the same file, per variant.

    .venv/bin/python bench/prealloc_probe.py [--gib 1] [--reps 2] [--dir /var/lib/nvmprov/bench]

Variants: how the file is prepared (fallocate like `allocation: full`, written zeros, sparse),
QEMU's mmap alignment (default 4 KiB vs align=2M, which libvirt's <alignsize> sets),
prealloc-threads 1 or 2, prealloc off. Before each run the file's page cache is dropped
(posix_fadvise DONTNEED on that file only: other guests on the machine keep theirs).
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import stats  # noqa: E402

GiB = 1024**3
PAGE = 4096
MADV_POPULATE_WRITE = 23  # Linux 5.14+; what QEMU 7.2 uses for prealloc
QEMU_TIMEOUT_S = 600.0

VARIANTS = [  # (label, file preparation, QEMU backend options)
    ("fallocate, 4 KiB-aligned (libvirt default)", "fallocate", "prealloc=on"),
    ("fallocate, align=2M (<alignsize>)", "fallocate", "prealloc=on,align=2M"),
    ("fallocate, align=2M, 2 threads", "fallocate", "prealloc=on,align=2M,prealloc-threads=2"),
    ("fallocate, 4 KiB-aligned, 2 threads", "fallocate", "prealloc=on,prealloc-threads=2"),
    ("zeros written, 4 KiB-aligned", "zeros", "prealloc=on"),
    ("zeros written, align=2M", "zeros", "prealloc=on,align=2M"),
    ("sparse, align=2M (blocks allocated by the faults)", "sparse", "prealloc=on,align=2M"),
    ("fallocate, prealloc off (<pmem/>: no guarantee from QEMU)", "fallocate", "prealloc=off"),
]


def prepare(path: Path, size: int, how: str) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        if how == "fallocate":
            os.posix_fallocate(f.fileno(), 0, size)
        elif how == "zeros":
            chunk = bytes(64 * 1024 * 1024)
            for _ in range(size // len(chunk)):
                f.write(chunk)
        else:
            f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def qemu_seconds(path: Path, size: int, opts: str) -> float:
    backend = f"memory-backend-file,id=m,size={size},mem-path={path},share=on,{opts}"
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-object", backend, "-monitor", "stdio"]
    began = time.monotonic()
    subprocess.run(argv, input=b"quit\n", capture_output=True, timeout=QEMU_TIMEOUT_S, check=True)
    return time.monotonic() - began


def python_seconds(path: Path, size: int, populate: bool) -> float:
    """The limit the issue names: one write per page of a shared mapping, then msync."""
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
        began = time.monotonic()
        if populate:
            m.madvise(MADV_POPULATE_WRITE, 0, size)
        else:
            for off in range(0, size, PAGE):
                m[off] = 0
        m.flush()
        took = time.monotonic() - began
        m.close()
        return took
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dir", default="/var/lib/nvmprov/bench", help="a directory on the pool's filesystem")
    args = p.parse_args(argv)
    size = args.gib * GiB
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "prealloc-probe.raw"
    rows = []
    try:
        for label, how, opts in VARIANTS:
            times = []
            for _ in range(args.reps):
                prepare(path, size, how)
                times.append(qemu_seconds(path, size, opts))
            rows.append((f"QEMU {label}", stats.summarize(times)))
        for label, populate in (("Python: write 1 byte per page + msync", False),
                                ("Python: MADV_POPULATE_WRITE + msync", True)):
            times = []
            for _ in range(args.reps):
                prepare(path, size, "fallocate")
                times.append(python_seconds(path, size, populate))
            rows.append((f"{label} (fallocated)", stats.summarize(times)))
    finally:
        path.unlink(missing_ok=True)
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{args.gib} GiB backing file on {work}, {args.reps} rep(s), load {load}\n")
    print(stats.render_table(
        ["variant", "s median (min-max)", "s/GiB"],
        [[label, stats.fmt_summary(s, 2), f"{stats.per_gib(s.median, size):.2f}"] for label, s in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
