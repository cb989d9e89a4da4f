"""Fixtures shared by the unit tests: libvirt's test:///default driver (no daemon, no files)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import libvirt
import pytest

from nvmprov import storage

# The test driver has no volume streams (virStorageVolUpload/Download): the small volumes nvmprov
# writes itself (the ownership ledger, storage.write_small/read_small) are kept here by path instead.
_SMALL_VOLUMES: dict[str, bytes] = {}


@pytest.fixture(autouse=True)
def _small_volumes_without_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    send, read_small = storage._send, storage.read_small

    def fake_send(vol: libvirt.virStorageVol, size: int, chunks: Iterator[bytes]) -> None:
        if not vol.connect().getURI().startswith("test:"):
            return send(vol, size, chunks)
        _SMALL_VOLUMES[vol.path()] = b"".join(chunks)
        return None

    def fake_read(vol: libvirt.virStorageVol, max_bytes: int) -> bytes:
        if not vol.connect().getURI().startswith("test:"):
            return read_small(vol, max_bytes)
        return _SMALL_VOLUMES.get(vol.path(), b"")[:max_bytes]

    monkeypatch.setattr(storage, "_send", fake_send)
    monkeypatch.setattr(storage, "read_small", fake_read)


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = libvirt.open("test:///default")
    yield c
    c.close()


@pytest.fixture
def pool(conn: libvirt.virConnect) -> Iterator[libvirt.virStoragePool]:
    """A fresh dir pool of its own (the test driver keeps pools in memory only)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    p = storage.ensure_pool(conn, name, f"/nonexistent/{name}/pool")
    yield p
    for vol in p.listAllVolumes(0):
        vol.delete(0)
    p.destroy()
    p.undefine()
