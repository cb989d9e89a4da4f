"""nvmprov.storage against libvirt's test:///default driver (no daemon, no files).

The test driver has no streams (upload/download): those are covered by the pure chunk scanner
here and by tests/e2e/test_image_boot.py against qemu:///system.
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import libvirt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmprov import storage
from nvmprov.errors import StorageError
from tests.volumes import create_backing

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # keep libvirt's own stderr lines out

MiB = 1 << 20


def _vol_xml(vol) -> ET.Element:
    return ET.fromstring(vol.XMLDesc(0))


def test_ensure_pool_defines_dir_pool_active_autostart(conn, pool):
    assert pool.isActive() and pool.autostart()
    xml = ET.fromstring(pool.XMLDesc(0))
    assert xml.get("type") == "dir"
    assert xml.findtext("target/permissions/mode") == "0711"
    assert storage.pool_path(pool) == f"/nonexistent/{pool.name()}/pool"


def test_ensure_pool_is_idempotent_and_restarts_inactive(conn, pool):
    pool.destroy()
    again = storage.ensure_pool(conn, pool.name(), "/ignored/when/it/exists")
    assert again.UUIDString() == pool.UUIDString()
    assert again.isActive()
    assert storage.pool_path(again) == f"/nonexistent/{pool.name()}/pool"


def test_pool_of_missing_pool_says_how(conn):
    with pytest.raises(StorageError, match="does not exist.*nvmprov create"):
        storage.pool_of(conn, "no-such-pool-here")


def test_pool_free_bytes(pool):
    assert storage.pool_free_bytes(pool) == pool.info()[3] > 0


def test_full_backing_is_raw_private_and_allocated(pool):
    vol = create_backing(pool, "full.raw", 64 * MiB, allocation="full")
    xml = _vol_xml(vol)
    assert xml.find("target/format").get("type") == "raw"
    assert xml.findtext("target/permissions/mode") == "0600"
    assert int(xml.findtext("capacity")) == 64 * MiB
    assert int(xml.findtext("allocation")) == 64 * MiB


def test_sparse_backing_allocates_nothing(pool):
    vol = create_backing(pool, "sparse.raw", 64 * MiB, allocation="sparse")
    assert int(_vol_xml(vol).findtext("allocation")) == 0


def test_existing_backing_same_size_is_reused_not_recreated(pool):
    first = create_backing(pool, "data.raw", 32 * MiB, allocation="full")
    again = create_backing(pool, "data.raw", 32 * MiB, allocation="full")
    assert again.key() == first.key()
    assert len(pool.listAllVolumes(0)) == 1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_existing_backing_readable_by_others_is_refused_not_reused(pool, mode):
    xml = storage._volume_xml("data.raw", 32 * MiB, allocation=32 * MiB, fmt="raw", mode=mode)
    vol = pool.createXML(xml, 0)
    assert _vol_xml(vol).findtext("target/permissions/mode") == f"0{mode:o}"  # the test driver keeps it
    with pytest.raises(StorageError) as exc:
        create_backing(pool, "data.raw", 32 * MiB, allocation="full")
    msg = str(exc.value)
    assert f"with mode 0{mode:o}" in msg and f"chmod 600 {vol.path()}" in msg
    assert storage.volume_exists(pool, "data.raw") and len(pool.listAllVolumes(0)) == 1  # left as it was


@pytest.mark.parametrize(("text", "loose"), [
    ("0600", None), ("0400", None), ("0700", None), ("0644", 0o644), ("0601", 0o601), ("0660", 0o660),
    ("", None), (None, None), ("bogus", None),
])
def test_loose_mode(text, loose):
    perms = "" if text is None else f"<permissions><mode>{text}</mode></permissions>"
    assert storage.loose_mode(f"<volume><name>v</name><target>{perms}</target></volume>") == loose


def test_existing_backing_other_size_is_refused_with_both_sizes(pool):
    create_backing(pool, "data.raw", 32 * MiB, allocation="full")
    with pytest.raises(StorageError) as exc:
        create_backing(pool, "data.raw", 64 * MiB, allocation="full")
    msg = str(exc.value)
    assert str(32 * MiB) in msg and str(64 * MiB) in msg
    assert "never truncates" in msg
    assert storage.vol_capacity_bytes(storage.volume(pool, "data.raw")) == 32 * MiB


def test_full_backing_beyond_free_space_is_refused_and_nothing_made(pool):
    free = storage.pool_free_bytes(pool)
    with pytest.raises(StorageError, match=f"has {free} bytes free.*needs {free + 1} bytes"):
        create_backing(pool, "huge.raw", free + 1, allocation="full")
    assert not storage.volume_exists(pool, "huge.raw")


def test_sparse_backing_beyond_free_space_is_allowed(pool):
    free = storage.pool_free_bytes(pool)
    create_backing(pool, "huge.raw", free + MiB, allocation="sparse")
    assert storage.volume_exists(pool, "huge.raw")


def test_overlay_on_base_volume(pool):
    base = create_backing(pool, "base.qcow2", 16 * MiB, allocation="sparse")
    over = storage.create_overlay(pool, "root.qcow2", "base.qcow2", 64 * MiB)
    xml = _vol_xml(over)
    assert xml.find("target/format").get("type") == "qcow2"
    assert xml.findtext("backingStore/path") == base.path()
    assert xml.findtext("target/permissions/mode") == "0600"
    assert int(xml.findtext("capacity")) == 64 * MiB


def test_overlay_smaller_than_base_refused(pool):
    create_backing(pool, "base.qcow2", 64 * MiB, allocation="sparse")
    with pytest.raises(StorageError, match="smaller than its base image"):
        storage.create_overlay(pool, "root.qcow2", "base.qcow2", 16 * MiB)


def test_overlay_never_overwrites(pool):
    create_backing(pool, "base.qcow2", 16 * MiB, allocation="sparse")
    storage.create_overlay(pool, "root.qcow2", "base.qcow2", 64 * MiB)
    with pytest.raises(StorageError, match="already exists"):
        storage.create_overlay(pool, "root.qcow2", "base.qcow2", 64 * MiB)


def test_overlay_missing_base(pool):
    with pytest.raises(StorageError, match="'nope.qcow2' not found"):
        storage.create_overlay(pool, "root.qcow2", "nope.qcow2", 64 * MiB)


def test_overlay_for_local_qcow2_path_reads_its_header(pool, tmp_path):
    image = tmp_path / "cloud.qcow2"
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(16) + (32 * MiB).to_bytes(8, "big")
    image.write_bytes(header + bytes(1000))
    with pytest.raises(StorageError, match=f"smaller than its base image {image} \\({32 * MiB} bytes"):
        storage.create_overlay_for_path(pool, "root.qcow2", str(image), 16 * MiB)
    vol = storage.create_overlay_for_path(pool, "root.qcow2", str(image), 64 * MiB)
    xml = _vol_xml(vol)
    assert xml.findtext("backingStore/path") == str(image)
    assert xml.find("backingStore/format").get("type") == "qcow2"


def test_overlay_for_missing_path(pool, tmp_path):
    with pytest.raises(StorageError, match="No such file"):
        storage.create_overlay_for_path(pool, "root.qcow2", str(tmp_path / "none.qcow2"), 64 * MiB)


def test_delete(pool):
    create_backing(pool, "x.raw", MiB, allocation="sparse")
    assert storage.delete(pool, "x.raw") is True
    assert not storage.volume_exists(pool, "x.raw")
    assert storage.delete(pool, "x.raw") is False


# ---------------------------------------------------------------- the chunk scanner


def _chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_marker_found_across_every_chunk_boundary(chunk):
    marker = b"NVMPROV"
    for pos in range(0, 20):
        data = b"x" * pos + marker + b"y" * 9
        assert storage.find_in_chunks(_chunked(data, chunk), marker) == pos


def test_marker_first_occurrence_and_absence():
    assert storage.find_in_chunks([b"abMab", b"Mab"], b"Mab") == 2
    assert storage.find_in_chunks([b"abc", b"def"], b"cdx") is None
    assert storage.find_in_chunks([], b"m") is None


def test_empty_marker_rejected():
    with pytest.raises(ValueError):
        storage.find_in_chunks([b"abc"], b"")


@given(
    prefix=st.binary(max_size=200),
    marker=st.binary(min_size=1, max_size=16),
    suffix=st.binary(max_size=50),
    chunk=st.integers(min_value=1, max_value=40),
)
def test_scanner_agrees_with_bytes_find(prefix, marker, suffix, chunk):
    data = prefix + marker + suffix
    assert storage.find_in_chunks(_chunked(data, chunk), marker) == data.find(marker)


def test_scanner_on_generator_consumes_lazily():
    """A hit stops the download: later chunks are never pulled."""
    pulled = []

    def gen():
        for i in itertools.count():
            pulled.append(i)
            yield b"MARK" if i == 2 else b"...."

    assert storage.find_in_chunks(gen(), b"MARK") == 8
    assert pulled == [0, 1, 2]
