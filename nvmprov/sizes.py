"""Byte units, rounding, and the size arithmetic of persistent-memory regions (pure).

The usable-size estimate reproduces what was measured on this machine (Debian 12 guest kernel,
ndctl 76, QEMU 7.2): see expected_usable_bytes.
"""

from __future__ import annotations

from typing import Literal

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

DIMM_ALIGN_BYTES = 2 * MiB            # x86 memory devices are placed and sized in 2 MiB steps
LABELLED_NS_ALIGN_BYTES = 16 * MiB    # ndctl aligns a labelled fsdax namespace down to 16 MiB
PAGE_BYTES = 4 * KiB
STRUCT_PAGE_BYTES = 64                # fsdax keeps one struct page per 4 KiB page on the device
PFN_INFO_BYTES = 8 * KiB              # the pfn info block at the start of an fsdax namespace
PFN_ALIGN_BYTES = 2 * MiB             # ... and its reserve is rounded up to the namespace alignment


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def align_down(n: int, multiple: int) -> int:
    return n // multiple * multiple


def format_size(n_bytes: int) -> str:
    """The exact size in the largest binary unit that divides it: 1GiB, 1536MiB, 4097B."""
    if n_bytes == 0:
        return "0"
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n_bytes % unit == 0:
            return f"{n_bytes // unit}{name}"
    return f"{n_bytes}B"


def human_size(n_bytes: object) -> str:
    """A size for people to read (show, report, doctor, prune): "512 MiB", "1.50 GiB" (two decimals
    unless exact), "-" when unknown (None, or not a number of bytes: a report read back from JSON).
    format_size writes the spec's exact unit syntax instead."""
    if not isinstance(n_bytes, int) or isinstance(n_bytes, bool):
        return "-"
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n_bytes >= unit:
            return f"{n_bytes // unit} {name}" if n_bytes % unit == 0 else f"{n_bytes / unit:.2f} {name}"
    return f"{n_bytes} B"


def backing_bytes_for(size_bytes: int) -> int:
    """Backing volume size for a region the user asked `size_bytes` of: whole 2 MiB blocks.

    libvirt rounds a memory device up to 2 MiB itself, and QEMU refuses a backing file whose
    size differs from the device, so the volume must already have the rounded size."""
    return round_up(size_bytes, DIMM_ALIGN_BYTES)


def fsdax_usable_bytes(namespace_bytes: int) -> int:
    """Data bytes of an fsdax namespace: the struct-page map plus the info block come off the
    front, rounded up to 2 MiB. Measured: 1 GiB -> 1054867456, 496 MiB -> 511705088."""
    reserve = round_up(namespace_bytes // PAGE_BYTES * STRUCT_PAGE_BYTES + PFN_INFO_BYTES, PFN_ALIGN_BYTES)
    return max(namespace_bytes - reserve, 0)


# Regions without a filesystem that nvmprov still proves (devdax, and raw or sector with
# `filesystem: none`): its payload and marker live in this reserved tail of the device, written once
# at create and only re-read after; it is not part of usable_bytes. 2 MiB: one devdax page at the
# default alignment, so the tail maps on its own.
RESERVED_TAIL_BYTES = 2 * MiB
# BTT (sector mode), as drivers/nvdimm/btt.c lays out one arena (regions here stay far below its
# 512 GiB arena limit): two info blocks, the free-block log, then map entries and data blocks.
BTT_PAGE_BYTES = 4 * KiB
BTT_NFREE = 256
BTT_LOG_GROUP_BYTES = 64
BTT_MAP_ENTRY_BYTES = 4
BTT_SECTOR_BYTES = 4 * KiB            # ndctl's default sector size for a pmem namespace
BTT_INITIAL_OFFSET_BYTES = 4 * KiB    # the first 4 KiB of the namespace are left alone


def btt_usable_bytes(namespace_bytes: int, sector_bytes: int = BTT_SECTOR_BYTES) -> int:
    """Bytes of the /dev/pmemNs a sector-mode namespace of NAMESPACE_BYTES gives (one arena)."""
    available = namespace_bytes - BTT_INITIAL_OFFSET_BYTES - 2 * BTT_PAGE_BYTES
    available -= round_up(BTT_NFREE * BTT_LOG_GROUP_BYTES, BTT_PAGE_BYTES)
    internal_nlba = (available - BTT_PAGE_BYTES) // (round_up(sector_bytes, 64) + BTT_MAP_ENTRY_BYTES)
    return max(internal_nlba - BTT_NFREE, 0) * sector_bytes


def labelled_available_bytes(backing_bytes: int, label_bytes: int) -> int:
    """What a labelled region offers its namespaces: the backing minus the label area, aligned down to
    the region's 16 MiB namespace alignment (measured: 512 MiB with a 2 MiB label -> 510 MiB region,
    available_size 496 MiB; `ndctl create-namespace -s` refuses sizes off a 16 MiB multiple)."""
    return align_down(backing_bytes - label_bytes, LABELLED_NS_ALIGN_BYTES)


def namespace_usable_bytes(namespace_bytes: int, mode: str) -> int:
    """What one namespace of NAMESPACE_BYTES gives in MODE (measured on a split region: fsdax 192 MiB
    -> 197132288, devdax 304 MiB -> 312475648, sector 160 MiB -> 166526976, raw 144 MiB -> 144 MiB)."""
    if mode == "raw":
        return namespace_bytes
    if mode == "sector":
        return btt_usable_bytes(namespace_bytes)
    return fsdax_usable_bytes(namespace_bytes)


def reserves_tail(model: str, mode: str | None, filesystem: str, readonly: bool) -> bool:
    """Does nvmprov keep a reserved tail on this region (see RESERVED_TAIL_BYTES)?"""
    return model == "nvdimm" and not readonly and filesystem == "none" and mode in ("devdax", "raw", "sector")


def expected_usable_bytes(
    model: Literal["nvdimm", "virtio-pmem", "cxl"],
    backing_bytes: int,
    label_bytes: int | None,
    *,
    readonly: bool = False,
    mode: str | None = None,
    tail: bool = False,
) -> int:
    """What the guest will be able to use of a region (an estimate the report compares against).

    nvdimm: the region is the backing minus the label area (QEMU puts the label at the end);
    a labelled namespace is aligned down to 16 MiB, a label-less one spans the region (so does
    the raw namespace a region shows before it has labels, which is what raw mode keeps). Then the
    mode (None: fsdax, raw when readonly): fsdax and devdax take their page map
    (fsdax_usable_bytes), sector its BTT metadata (btt_usable_bytes), raw nothing. `tail`: minus
    the reserved tail of a region nvmprov proves without a filesystem.
    virtio-pmem: the whole device is one pmem disk. cxl: as a label-less nvdimm (the region spans
    the device; its labels live in the device's own label storage area).
    """
    if model == "virtio-pmem":
        return backing_bytes
    mode = mode or ("raw" if readonly else "fsdax")
    namespace = backing_bytes
    if label_bytes:
        namespace = align_down(backing_bytes - label_bytes, LABELLED_NS_ALIGN_BYTES)
    if mode == "raw":
        # the label-less raw namespace the kernel shows spans the whole region (measured: a 128MiB
        # region with a 2MiB label -> 132120576 bytes), labels or not: nvmprov makes no namespace
        usable = backing_bytes - (label_bytes or 0)
    elif mode == "sector":
        usable = btt_usable_bytes(namespace)
    else:
        usable = fsdax_usable_bytes(namespace)
    return max(usable - RESERVED_TAIL_BYTES, 0) if tail else usable
