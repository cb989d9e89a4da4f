"""Volumes for tests: a backing volume made, or the existing one of that name and size.

nvmprov itself never reuses a volume by name alone (ownership: ledger.py); this helper is for tests
that need a volume to be there, whoever made it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nvmprov import storage

if TYPE_CHECKING:
    import libvirt


def create_backing(pool: libvirt.virStoragePool, name: str, capacity_bytes: int, *,
                   allocation: storage.Allocation = "full") -> libvirt.virStorageVol:
    """storage.make_backing; an existing volume of NAME is returned when its size matches
    (storage.check_reusable), refused otherwise, and never overwritten."""
    vol = storage.make_backing(pool, name, capacity_bytes, allocation=allocation)
    return vol if vol is not None else storage.check_reusable(pool, storage.volume(pool, name), capacity_bytes)
