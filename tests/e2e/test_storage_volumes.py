"""nvmprov.storage against the real qemu:///system, in a throwaway pool under /var/tmp: what the
test driver cannot show (real files, fallocate, permissions, stream upload/download)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from nvmprov import storage
from nvmprov.errors import StorageError
from tests.volumes import create_backing

pytestmark = pytest.mark.e2e

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

MiB = 1 << 20


@pytest.fixture(scope="module")
def conn() -> Iterator[libvirt.virConnect]:
    if os.geteuid() != 0:
        pytest.fail("e2e tests need root (qemu:///system); run them through scripts/test.sh")
    c = libvirt.open("qemu:///system")
    yield c
    c.close()


@pytest.fixture
def pool(conn: libvirt.virConnect) -> Iterator[libvirt.virStoragePool]:
    parent = Path(tempfile.mkdtemp(prefix="nvmprov-e2e-pool-", dir="/var/tmp"))
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    p = storage.ensure_pool(conn, name, str(parent / "sub" / "pool"))
    yield p
    for vol in p.listAllVolumes(0):
        vol.delete(0)
    if p.isActive():
        p.destroy()
    p.undefine()
    shutil.rmtree(parent)
    assert name not in [q.name() for q in conn.listAllStoragePools(0)]


def test_pool_directory_and_parent_are_0711(pool):
    path = Path(storage.pool_path(pool))
    assert stat.S_IMODE(path.stat().st_mode) == 0o711
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o711
    assert pool.isActive() and pool.autostart()


def test_full_backing_is_fallocated_and_private(pool):
    vol = create_backing(pool, "full.raw", 64 * MiB, allocation="full")
    st = os.stat(vol.path())
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 >= 64 * MiB  # really allocated, not sparse
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_sparse_backing_has_no_blocks(pool):
    vol = create_backing(pool, "sparse.raw", 64 * MiB, allocation="sparse")
    st = os.stat(vol.path())
    assert st.st_size == 64 * MiB
    assert st.st_blocks == 0


def test_reused_backing_keeps_its_data(pool):
    vol = create_backing(pool, "keep.raw", 4 * MiB, allocation="full")
    with open(vol.path(), "r+b") as f:
        f.write(b"precious")
    again = create_backing(pool, "keep.raw", 4 * MiB, allocation="full")
    assert Path(again.path()).read_bytes()[:8] == b"precious"
    with pytest.raises(StorageError):
        create_backing(pool, "keep.raw", 8 * MiB, allocation="full")
    assert os.path.getsize(vol.path()) == 4 * MiB
    assert Path(vol.path()).read_bytes()[:8] == b"precious"


def test_upload_bytes_and_file_round_trip(pool, tmp_path):
    data = os.urandom(9 * MiB + 123)  # crosses chunk boundaries, odd size
    vol = storage.upload(pool, "blob.bin", data)
    assert stat.S_IMODE(os.stat(vol.path()).st_mode) == 0o600
    assert b"".join(storage.download(vol)) == data
    assert b"".join(storage.download(vol, offset=5 * MiB, length=100)) == data[5 * MiB : 5 * MiB + 100]

    local = tmp_path / "file.bin"
    local.write_bytes(data[::-1])
    vol2 = storage.upload(pool, "file.bin", local, mode=0o644)
    digest = hashlib.sha256()
    for chunk in storage.download(vol2):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data[::-1]).hexdigest()
    assert stat.S_IMODE(os.stat(vol2.path()).st_mode) == 0o644


def test_upload_refuses_existing_volume(pool):
    storage.upload(pool, "x.bin", b"first")
    with pytest.raises(StorageError, match="already exists"):
        storage.upload(pool, "x.bin", b"second")
    assert b"".join(storage.download(storage.volume(pool, "x.bin"))) == b"first"


def test_upload_qcow2_is_seen_as_qcow2(pool, tmp_path):
    img = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "32M"], check=True)
    vol = storage.upload(pool, "small.qcow2", img, "qcow2")
    assert storage.volume_format(vol) == "qcow2"
    assert storage.vol_capacity_bytes(vol) == 32 * MiB
    over = storage.create_overlay(pool, "over.qcow2", "small.qcow2", 64 * MiB)
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", over.path()], capture_output=True, check=True, text=True
    )
    meta = json.loads(info.stdout)
    assert meta["backing-filename"] == vol.path()
    assert meta["virtual-size"] == 64 * MiB


def test_find_marker_in_a_volume(pool):
    marker = b"nvmprov-marker-" + uuid.uuid4().hex.encode()
    offset = storage.CHUNK_BYTES - 7  # straddles the first chunk boundary
    data = bytearray(2 * storage.CHUNK_BYTES)
    data[offset : offset + len(marker)] = marker
    vol = storage.upload(pool, "marked.raw", bytes(data))
    assert storage.find_marker(vol, marker) == offset
    assert storage.find_marker(vol, b"not-there-" + uuid.uuid4().hex.encode()) is None


def test_delete_and_missing(pool):
    storage.upload(pool, "gone.bin", b"x")
    path = storage.volume(pool, "gone.bin").path()
    assert storage.delete(pool, "gone.bin")
    assert not os.path.exists(path)
    assert not storage.delete(pool, "gone.bin")
