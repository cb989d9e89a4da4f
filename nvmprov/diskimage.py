"""A user's `image:` is untrusted input: vet it before a volume is made on it.

nvmprov runs as root, and the guest reads whatever file its disk is built on. A spec file could
name a host file (`x.raw` linked to a root-only file), a qcow2 whose backing file is one, or a FIFO
that blocks whoever opens it. The rule (docs/spec.md, "image"):

- links are followed first; the file they end at must be a regular file (no FIFO, device,
  socket or directory: these are refused from a stat, before anything opens them);
- it holds a disk image: qcow2 by its magic (`QFI\\xfb`, version 2 or 3), or raw by a partition
  table (the MBR boot signature 55 AA at byte 510, or a GPT header `EFI PART` at byte 512 or 4096)
  or a filesystem signature (ext2/3/4 magic 53 EF at byte 1080, xfs `XFSB` at 0, btrfs
  `_BHRfS_M` at 65600);
- a qcow2 with a backing file is accepted only when every file of its chain passes these same
  rules: backing names are plain paths (no `json:`, `nbd:` or other protocol; relative names are
  taken from the directory of the file naming them, as QEMU does), a recorded backing format is
  qcow2 or raw and matches the file, at most MAX_CHAIN files, no loops; a qcow2 with an external
  data file is refused (it names another file the guest would read).

Every read is bounded (HEAD_BYTES from the start, the backing name) and made on a descriptor
opened with O_NONBLOCK after the stat, so nothing here can hang.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from .textsafe import clean

HEAD_BYTES = 65608           # up to the end of the btrfs magic; the qcow2 header and its extensions
MAX_CHAIN = 8                # files in a backing chain (a cloud image has one or two)
MAX_BACKING_NAME = 1023      # QEMU's own limit on a backing file name
QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_RAW_SIGNATURES = (
    (510, b"\x55\xaa", "an MBR partition table"),
    (512, b"EFI PART", "a GPT partition table"),
    (4096, b"EFI PART", "a GPT partition table (4 KiB sectors)"),
    (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
    (0, b"XFSB", "an xfs filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
)
_FIX = "give the path of a qcow2 or raw disk image (a cloud image, e.g. debian-12-genericcloud-amd64.qcow2)"


class ImageRefused(ValueError):
    """The image breaks the rule; the message names the file, what is wrong and the fix."""


@dataclass(frozen=True)
class DiskImage:
    path: str             # the file itself, links resolved: what the overlay's backing store names
    format: str           # "qcow2" or "raw"
    virtual_bytes: int    # the disk size the guest sees
    chain: tuple[str, ...] = ()   # the backing files below it (resolved paths), nearest first


def vet(path: str) -> DiskImage:
    """The image at PATH when it passes the rule above, else ImageRefused."""
    return _vet(path, shown=path, want=None, seen=())


def _vet(path: str, *, shown: str, want: str | None, seen: tuple[str, ...]) -> DiskImage:
    real = os.path.realpath(path)
    if real in seen:
        raise ImageRefused(f"image {shown}: its backing chain loops back to a file of the chain; {_FIX}")
    if len(seen) >= MAX_CHAIN:
        raise ImageRefused(f"image {shown}: its backing chain is longer than {MAX_CHAIN} files; "
                           "flatten it (qemu-img convert -O qcow2 IN OUT)")
    head, size = _read_head(real, shown)
    if head[:4] == QCOW2_MAGIC:
        if want not in (None, "qcow2"):
            raise ImageRefused(f"image {shown}: recorded as raw but it is a qcow2 (its own backing file would be "
                               f"read as data); {_FIX}")
        return _qcow2(real, shown, head, seen)
    if want == "qcow2":
        raise ImageRefused(f"image {shown}: recorded as qcow2 but it is not one; {_FIX}")
    if not any(head[at:at + len(magic)] == magic for at, magic, _ in _RAW_SIGNATURES):
        raise ImageRefused(f"image {shown}: not a disk image (no qcow2 magic, no partition table, no ext4, xfs "
                           f"or btrfs signature); {_FIX}")
    return DiskImage(real, "raw", size)


def _read_head(real: str, shown: str) -> tuple[bytes, int]:
    try:
        before = os.stat(real)
    except OSError as e:
        raise ImageRefused(f"image {shown}: {e.strerror}; {_FIX}") from None
    if not stat.S_ISREG(before.st_mode):
        raise ImageRefused(f"image {shown}: {file_kind(before.st_mode)}, not a regular file; {_FIX}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageRefused(f"image {shown}: {e.strerror}; {_FIX}") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise ImageRefused(f"image {shown}: changed while being checked; {_FIX}")
        return os.pread(fd, HEAD_BYTES, 0), now.st_size
    except OSError as e:
        raise ImageRefused(f"image {shown}: {e.strerror}; {_FIX}") from None
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message ("a FIFO (named pipe)", ...)."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


@dataclass(frozen=True)
class _Qcow2Header:
    version: int
    backing_offset: int
    backing_size: int
    virtual_bytes: int
    incompatible: int
    backing_format: str | None
    data_file: bool


def parse_qcow2_header(head: bytes) -> _Qcow2Header:
    """The fields of a qcow2 header that name other files (pure; HEAD may be cut short)."""
    if len(head) < 32 or head[:4] != QCOW2_MAGIC:
        raise ValueError("not a qcow2 header")
    version, backing_offset, backing_size, _cluster_bits, virtual_bytes = struct.unpack_from(">IQIIQ", head, 4)
    incompatible, header_length = 0, 72
    if version >= 3 and len(head) >= 104:
        incompatible = struct.unpack_from(">Q", head, 72)[0]
        header_length = max(104, struct.unpack_from(">I", head, 100)[0])
    backing_format, data_file = None, False
    at = header_length
    while at + 8 <= len(head):  # header extensions: (type, length, data padded to 8), type 0 ends them
        ext_type, length = struct.unpack_from(">II", head, at)
        if ext_type == 0:
            break
        data = head[at + 8: at + 8 + length]
        if ext_type == _QCOW2_EXT_BACKING_FORMAT:
            backing_format = data.decode("ascii", "replace")
        elif ext_type == _QCOW2_EXT_DATA_FILE:
            data_file = True
        at += 8 + (length + 7) // 8 * 8
    return _Qcow2Header(version, backing_offset, backing_size, virtual_bytes, incompatible, backing_format,
                        data_file or bool(incompatible & _QCOW2_INCOMPAT_DATA_FILE))


def _qcow2(real: str, shown: str, head: bytes, seen: tuple[str, ...]) -> DiskImage:
    try:
        h = parse_qcow2_header(head)
    except (ValueError, struct.error):
        raise ImageRefused(f"image {shown}: a damaged qcow2 header; {_FIX}") from None
    if h.version not in (2, 3):
        raise ImageRefused(f"image {shown}: qcow2 version {h.version}; nvmprov takes versions 2 and 3")
    if h.data_file:
        raise ImageRefused(f"image {shown}: a qcow2 with an external data file (another file the guest would "
                           "read); convert it: qemu-img convert -O qcow2 IN OUT")
    if h.backing_offset == 0 or h.backing_size == 0:
        return DiskImage(real, "qcow2", h.virtual_bytes)
    if h.backing_size > MAX_BACKING_NAME:
        raise ImageRefused(f"image {shown}: its backing file name is {h.backing_size} bytes long; {_FIX}")
    name = _backing_name(real, shown, h.backing_offset, h.backing_size)
    if "\x00" in name or ":" in name or not name.strip():
        raise ImageRefused(f"image {shown}: its backing file {name[:80]!r} is not a plain path (a protocol such "
                           "as json: or nbd: could name anything); flatten it: qemu-img convert -O qcow2 IN OUT")
    below = os.path.join(os.path.dirname(real), name)  # a relative name is relative to this file
    fmt = h.backing_format
    if fmt not in (None, "qcow2", "raw"):
        raise ImageRefused(f"image {shown}: its backing file is recorded as {fmt[:20]!r}; nvmprov takes qcow2 "
                           "and raw: flatten it (qemu-img convert -O qcow2 IN OUT)")
    # the name comes from the file: shown without its escape sequences and control characters
    base = _vet(below, shown=f"{shown} -> backing file {clean(below)}", want=fmt, seen=(*seen, real))
    return DiskImage(real, "qcow2", h.virtual_bytes, (base.path, *base.chain))


def _backing_name(real: str, shown: str, offset: int, size: int) -> str:
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, size, offset)
        finally:
            os.close(fd)
    except OSError as e:
        raise ImageRefused(f"image {shown}: {e.strerror}; {_FIX}") from None
    if len(raw) != size:
        raise ImageRefused(f"image {shown}: its backing file name lies past its end; {_FIX}")
    return raw.decode("utf-8", "replace")
