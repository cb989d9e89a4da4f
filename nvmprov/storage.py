"""Host files as libvirt storage volumes: pool, backing volumes, overlays, uploads, downloads.

Everything goes through the libvirt storage API (volume XML, streams), so the same code works
against a remote hypervisor. The only local file system calls are the optional permission fix of
the pool's parent directory (local connections only) and reading a local file to upload.
"""

from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import libvirt

from nvmprov import diskimage
from nvmprov.errors import StorageError

DEFAULT_POOL = "nvmprov"
DEFAULT_POOL_PATH = "/var/lib/nvmprov/pool"
CHUNK_BYTES = 4 * 1024 * 1024  # stream chunk: big enough for throughput, small enough for memory
REFRESH_DEADLINE_S = 120.0      # a parallel create's 16 GiB fallocate or image upload can take this long
REFRESH_RETRY_S = 0.25

# The pool directory lets QEMU (running as libvirt-qemu) reach files it was chowned, and lists
# nothing; volumes holding guest data or keys are 0600 (libvirt's DAC driver chowns them to the
# QEMU user while the domain runs).
POOL_DIR_MODE = 0o711
PRIVATE_MODE = 0o600

Allocation = Literal["full", "sparse"]


def _parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - libvirt's own output, not untrusted input


def _err(what: str, e: libvirt.libvirtError) -> StorageError:
    return StorageError(f"{what}: {e.get_error_message()}")


def _no_such(e: libvirt.libvirtError, code: int) -> bool:
    return e.get_error_code() == code


# ---------------------------------------------------------------- pools


def _pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = path
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = f"0{POOL_DIR_MODE:o}"
    return ET.tostring(pool, encoding="unicode")


def _is_local(conn: libvirt.virConnect) -> bool:
    """The pool's files are on this machine (the test driver has no files at all)."""
    uri = urlparse(conn.getURI())
    return not uri.hostname and "+" not in uri.scheme and uri.scheme != "test"


def _prepare_parent(conn: libvirt.virConnect, path: str) -> None:
    """/var/lib/nvmprov: 0711 so QEMU can traverse it and nobody can list it (local hosts only;
    a remote pool's parent is the remote admin's business, libvirt creates it 0755)."""
    if not _is_local(conn):
        return
    parent = Path(path).parent
    parent.mkdir(mode=POOL_DIR_MODE, parents=True, exist_ok=True)
    if parent.stat().st_uid == os.getuid():
        parent.chmod(POOL_DIR_MODE)


def pool_of(conn: libvirt.virConnect, name: str = DEFAULT_POOL) -> libvirt.virStoragePool:
    """The existing, active pool NAME, or StorageError saying how to make it."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as e:
        if _no_such(e, libvirt.VIR_ERR_NO_STORAGE_POOL):
            raise StorageError(
                f"storage pool {name!r} does not exist; `nvmprov create` or `nvmprov image build` makes it"
            ) from None
        raise _err(f"looking up storage pool {name!r}", e) from None
    if not pool.isActive():
        try:
            pool.create(0)
        except libvirt.libvirtError as e:
            raise _err(f"starting storage pool {name!r}", e) from None
    return pool


def ensure_pool(
    conn: libvirt.virConnect, name: str = DEFAULT_POOL, path: str = DEFAULT_POOL_PATH
) -> libvirt.virStoragePool:
    """Pool NAME, defined as a `dir` pool at PATH if missing, built, started and autostarted."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as e:
        if not _no_such(e, libvirt.VIR_ERR_NO_STORAGE_POOL):
            raise _err(f"looking up storage pool {name!r}", e) from None
        _prepare_parent(conn, path)
        try:
            pool = conn.storagePoolDefineXML(_pool_xml(name, path), 0)
        except libvirt.libvirtError as e2:
            raise _err(f"defining storage pool {name!r} at {path}", e2) from None
    try:
        if not pool.isActive():
            pool.build(0)  # a dir pool: mkdir the target with its permissions; harmless when it exists
            pool.create(0)
        if not pool.autostart():
            pool.setAutostart(1)
    except libvirt.libvirtError as e:
        raise _err(f"starting storage pool {name!r} ({pool_path(pool)})", e) from None
    return pool


def pool_path(pool: libvirt.virStoragePool) -> str:
    path = _parse(pool.XMLDesc(0)).findtext("target/path")
    if not path:
        raise StorageError(f"storage pool {pool.name()!r} has no target path (not a dir pool?)")
    return path


def refresh(pool: libvirt.virStoragePool, *, deadline_s: float = REFRESH_DEADLINE_S) -> None:
    """Rescan the pool. libvirt refuses while another client's volume is being built or uploaded
    ("has asynchronous jobs running"): parallel creates hit that, so wait for it to pass."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as e:
            busy = "asynchronous jobs running" in (e.get_error_message() or "")
            if not busy or time.monotonic() > deadline:
                raise _err(f"refreshing storage pool {pool.name()!r}", e) from None
        time.sleep(REFRESH_RETRY_S)


def pool_free_bytes(pool: libvirt.virStoragePool) -> int:
    refresh(pool)
    try:
        free = int(pool.info()[3])
    except libvirt.libvirtError as e:
        raise _err(f"reading free space of storage pool {pool.name()!r}", e) from None
    if _is_local(pool.connect()):
        # libvirt reports statvfs f_bfree; on this host f_bfree said 227 GiB while only f_bavail
        # (77 GiB) could be fallocated, so the pre-check passed and libvirt failed half-way.
        with contextlib.suppress(OSError):
            st = os.statvfs(pool_path(pool))
            free = min(free, st.f_bavail * st.f_frsize)
    return free


# ---------------------------------------------------------------- volumes


def lookup(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as e:
        if _no_such(e, libvirt.VIR_ERR_NO_STORAGE_VOL):
            return None
        raise _err(f"looking up volume {name!r} in pool {pool.name()!r}", e) from None


def volume_exists(pool: libvirt.virStoragePool, name: str) -> bool:
    return lookup(pool, name) is not None


def volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol:
    vol = lookup(pool, name)
    if vol is None:
        raise StorageError(f"volume {name!r} not found in storage pool {pool.name()!r} ({pool_path(pool)})")
    return vol


def vol_capacity_bytes(vol: libvirt.virStorageVol) -> int:
    return int(vol.info()[1])


def volume_format(vol: libvirt.virStorageVol) -> str | None:
    return _parse(vol.XMLDesc(0)).find("target/format").get("type")  # type: ignore[union-attr]


def backing_path(vol: libvirt.virStorageVol) -> str | None:
    """The backing file a volume's header names (an overlay's base); None without one or when the
    volume was deleted while we looked."""
    try:
        return _parse(vol.XMLDesc(0)).findtext("backingStore/path")
    except libvirt.libvirtError:
        return None


def _volume_xml(
    name: str,
    capacity: int,
    *,
    allocation: int,
    fmt: str,
    mode: int,
    backing: tuple[str, str] | None = None,
    owner: tuple[int, int] | None = None,
) -> str:
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(vol, "allocation", unit="bytes").text = str(allocation)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type=fmt)
    if fmt == "qcow2":
        ET.SubElement(target, "compat").text = "1.1"  # libvirt's default is 0.10: no zero clusters
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = f"0{mode:o}"
    if owner is not None:  # (uid, gid): libvirt chowns the new file
        ET.SubElement(perms, "owner").text = str(owner[0])
        ET.SubElement(perms, "group").text = str(owner[1])
    if backing is not None:
        path, backing_fmt = backing
        store = ET.SubElement(vol, "backingStore")
        ET.SubElement(store, "path").text = path
        ET.SubElement(store, "format", type=backing_fmt)
    return ET.tostring(vol, encoding="unicode")


class VolumeExists(StorageError):
    """createXML found a volume (or a file) of that name: nothing was made or changed."""


def _exists_error(e: libvirt.libvirtError) -> bool:
    # libvirt 9.0, measured on a dir pool: a volume it knows is VIR_ERR_STORAGE_VOL_EXIST; a file it
    # has not scanned yet is VIR_ERR_OPERATION_INVALID "volume target path '...' already exists".
    return e.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST or (
        e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and "already exists" in (e.get_error_message() or ""))


def _create(pool: libvirt.virStoragePool, xml: str, what: str) -> libvirt.virStorageVol:
    """createXML, which is exclusive: it never opens an existing file (checked on this libvirt, for
    volumes it knows and files it has not scanned yet). So a volume this returns is one this call
    made, and no separate existence check (a race) comes before it."""
    try:
        return pool.createXML(xml, 0)
    except libvirt.libvirtError as e:
        if _exists_error(e):
            name = _parse(xml).findtext("name") or "?"
            raise VolumeExists(
                f"volume {name!r} already exists in storage pool {pool.name()!r} ({pool_path(pool)}); nvmprov never "
                f"overwrites a volume: remove it first (virsh vol-delete --pool {pool.name()} {name})"
            ) from None
        raise _err(f"creating {what} in storage pool {pool.name()!r}", e) from None


def make_backing(
    pool: libvirt.virStoragePool,
    name: str,
    capacity_bytes: int,
    *,
    allocation: Allocation = "full",
    owner: tuple[int, int] | None = None,
) -> libvirt.virStorageVol | None:
    """A new raw backing volume (0600), fully allocated unless `sparse`; None when a volume of that
    name exists (nothing made, nothing changed). Only a volume this returns was made by this call.
    OWNER (uid, gid): who owns the file (None: the pool's default, root; libvirt chowns the files a
    domain's XML names while it runs, but not those named only on QEMU's command line, as CXL's)."""
    if lookup(pool, name) is not None:
        return None  # no free-space check for a volume that need not be made
    if allocation == "full":
        free = pool_free_bytes(pool)
        if capacity_bytes > free:
            raise StorageError(
                f"storage pool {pool.name()!r} ({pool_path(pool)}) has {free} bytes free; backing volume "
                f"{name!r} needs {capacity_bytes} bytes fully allocated: free space there, ask for a smaller "
                "region, or use `allocation: sparse` (the guest then gets SIGBUS if the host disk fills)"
            )
    xml = _volume_xml(
        name,
        capacity_bytes,
        allocation=capacity_bytes if allocation == "full" else 0,  # allocation == capacity: fallocate
        fmt="raw",
        mode=PRIVATE_MODE,
        owner=owner,
    )
    try:
        return _create(pool, xml, f"backing volume {name!r} ({capacity_bytes} bytes, {allocation})")
    except VolumeExists:
        return None  # made by someone else since the lookup


def loose_mode(volume_xml: str) -> int | None:
    """The permission bits of a volume's XML when group or others have any; None when private (or
    libvirt reports no mode: nothing to judge)."""
    text = _parse(volume_xml).findtext("target/permissions/mode")
    if not text or not text.strip():
        return None
    try:
        mode = int(text.strip(), 8)
    except ValueError:
        return None
    return mode if mode & 0o077 else None


def check_reusable(
    pool: libvirt.virStoragePool, vol: libvirt.virStorageVol, want_bytes: int
) -> libvirt.virStorageVol:
    """VOL when it can back a region of WANT_BYTES as it is (raw, that size, owner-only), else
    StorageError: nvmprov never truncates, converts or chmods an existing volume."""
    have = vol_capacity_bytes(vol)
    fmt = volume_format(vol)
    if have == want_bytes and fmt == "raw":
        mode = loose_mode(vol.XMLDesc(0))
        if mode is not None:
            raise StorageError(
                f"backing volume {vol.name()!r} already exists at {vol.path()} with mode 0{mode:o}: group or "
                "others can reach the guest's data, and nvmprov keeps backing volumes private; make it "
                f"owner-only and retry (chmod 600 {vol.path()} on the hypervisor)"
            )
        return vol
    raise StorageError(
        f"backing volume {vol.name()!r} already exists in storage pool {pool.name()!r} with {have} bytes "
        f"({fmt}), but {want_bytes} bytes raw are needed; nvmprov never truncates or overwrites it: "
        f"use the size it has, pick another region name, or delete it if its data is not needed "
        f"(virsh vol-delete --pool {pool.name()} {vol.name()})"
    )


def create_overlay(
    pool: libvirt.virStoragePool, name: str, base_vol_name: str, capacity_bytes: int
) -> libvirt.virStorageVol:
    """A qcow2 volume whose backing store is the qcow2 volume BASE_VOL_NAME of the same pool."""
    base = volume(pool, base_vol_name)
    base_fmt = volume_format(base) or "qcow2"
    return _overlay(pool, name, base.path(), base_fmt, capacity_bytes, vol_capacity_bytes(base))


def create_overlay_for_path(
    pool: libvirt.virStoragePool, name: str, image_path: str, capacity_bytes: int
) -> libvirt.virStorageVol:
    """A qcow2 overlay on an image file outside the pool (a user's own cloud image).

    The image is vetted (nvmprov.diskimage: a regular file holding a qcow2 or raw disk image, its
    backing chain too) and its format and virtual size read from its header, so the file must be
    readable here (a local hypervisor). The overlay names the file itself, links resolved.
    """
    try:
        image = diskimage.vet(image_path)
    except diskimage.ImageRefused as e:  # create vetted it already: this is the file changing since
        raise StorageError(str(e)) from None
    return _overlay(pool, name, image.path, image.format, capacity_bytes, image.virtual_bytes)


def _overlay(
    pool: libvirt.virStoragePool,
    name: str,
    base_path: str,
    base_fmt: str,
    capacity_bytes: int,
    base_bytes: int,
) -> libvirt.virStorageVol:
    if capacity_bytes < base_bytes:
        raise StorageError(
            f"disk size {capacity_bytes} bytes is smaller than its base image {base_path} "
            f"({base_bytes} bytes); ask for a disk of at least that size"
        )
    xml = _volume_xml(name, capacity_bytes, allocation=0, fmt="qcow2", mode=PRIVATE_MODE, backing=(base_path, base_fmt))
    return _create(pool, xml, f"overlay {name!r} on {base_path}")


def delete(pool: libvirt.virStoragePool, name: str) -> bool:
    """Delete volume NAME; False when it did not exist."""
    vol = lookup(pool, name)
    if vol is None:
        return False
    try:
        vol.delete(0)
    except libvirt.libvirtError as e:
        if _no_such(e, libvirt.VIR_ERR_NO_STORAGE_VOL):
            return False
        raise _err(f"deleting volume {name!r} from storage pool {pool.name()!r}", e) from None
    return True


# ---------------------------------------------------------------- streams


def _local_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _bytes_chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_BYTES):
        yield bytes(view[start : start + CHUNK_BYTES])


def upload(
    pool: libvirt.virStoragePool,
    name: str,
    data_or_path: bytes | str | os.PathLike[str],
    fmt: str = "raw",
    *,
    mode: int = PRIVATE_MODE,
) -> libvirt.virStorageVol:
    """A new volume NAME holding DATA (bytes) or the local file at PATH, sent over a libvirt stream.

    The volume is made raw with the exact byte count, so nothing of an empty qcow2 header stays
    behind the uploaded bytes; FMT is what the bytes are (libvirt re-probes on refresh). Refuses
    an existing volume; on failure the partial volume is removed.
    """
    if isinstance(data_or_path, bytes):
        size = len(data_or_path)
        chunks: Iterable[bytes] = _bytes_chunks(data_or_path)
    else:
        path = os.fspath(data_or_path)
        size = os.path.getsize(path)
        chunks = _local_chunks(path)
    vol = _create(pool, _volume_xml(name, size, allocation=0, fmt="raw", mode=mode), f"volume {name!r}")
    try:
        _send(vol, size, chunks)
        refresh(pool)
    except BaseException:
        delete(pool, name)
        raise
    if fmt != "raw" and volume_format(volume(pool, name)) != fmt:
        delete(pool, name)
        raise StorageError(f"uploaded volume {name!r} is not {fmt} as announced")
    return volume(pool, name)


def write_small(pool: libvirt.virStoragePool, name: str, data: bytes) -> libvirt.virStorageVol:
    """A new volume NAME holding DATA, without upload()'s pool refresh (which waits out other
    clients' fallocates): for nvmprov's own small records (ledger.py). Exclusive like upload()."""
    vol = _create(pool, _volume_xml(name, len(data), allocation=0, fmt="raw", mode=PRIVATE_MODE), f"volume {name!r}")
    try:
        _send(vol, len(data), _bytes_chunks(data))
    except BaseException:
        delete(pool, name)
        raise
    return vol


def read_small(vol: libvirt.virStorageVol, max_bytes: int) -> bytes:
    """The bytes of a small volume (at most MAX_BYTES are read)."""
    length = min(vol_capacity_bytes(vol), max_bytes)
    return b"".join(download(vol, length=length))[:length] if length else b""


def _send(vol: libvirt.virStorageVol, size: int, chunks: Iterable[bytes]) -> None:
    stream = vol.connect().newStream(0)
    try:
        vol.upload(stream, 0, size, 0)
        sent = 0
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = stream.send(bytes(view))
                view = view[n:]
                sent += n
        if sent != size:
            raise StorageError(f"upload of volume {vol.name()!r}: sent {sent} bytes, expected {size}")
        stream.finish()
    except libvirt.libvirtError as e:
        _abort(stream)
        raise _err(f"uploading volume {vol.name()!r}", e) from None
    except BaseException:
        _abort(stream)
        raise


def _abort(stream: libvirt.virStream) -> None:
    with contextlib.suppress(libvirt.libvirtError):  # already finished or broken: nothing to abort
        stream.abort()


def download(vol: libvirt.virStorageVol, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
    """The volume's bytes from OFFSET (all of them, or LENGTH), in chunks, over a libvirt stream."""
    stream = vol.connect().newStream(0)
    done = False
    try:
        vol.download(stream, offset, length or 0, 0)
        while True:
            chunk = stream.recv(CHUNK_BYTES)
            if not chunk:
                break
            yield chunk
        stream.finish()
        done = True
    except libvirt.libvirtError as e:
        raise _err(f"downloading volume {vol.name()!r}", e) from None
    finally:
        if not done:
            _abort(stream)


def find_in_chunks(chunks: Iterable[bytes], marker: bytes) -> int | None:
    """Offset of the first MARKER in the concatenation of CHUNKS, keeping an overlap so a marker
    split across two chunks is found."""
    if not marker:
        raise ValueError("empty marker")
    keep = len(marker) - 1
    tail = b""
    base = 0  # offset of tail[0] in the whole stream
    for chunk in chunks:
        window = tail + chunk
        hit = window.find(marker)
        if hit >= 0:
            return base + hit
        tail = window[-keep:] if keep else b""
        base += len(window) - len(tail)
    return None


def find_marker(vol: libvirt.virStorageVol, marker: bytes) -> int | None:
    return find_in_chunks(download(vol), marker)
