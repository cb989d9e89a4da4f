"""Fixtures shared by the unit tests: libvirt's test:///default driver (no daemon, no files)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import libvirt
import pytest

from nvmprov import storage


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
