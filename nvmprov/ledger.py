"""Which volumes of a pool nvmprov made, and for which guest: the ownership ledger.

libvirt 9.0 volumes carry no metadata, and a domain's metadata goes when it is undefined, so the
record of what nvmprov owns lives in the pool itself, as a small volume read and written through
the storage API: it works the same for a pool on a remote hypervisor (qemu+ssh).

Crash safety: two slots, `nvmprov-ledger-a.json` and `nvmprov-ledger-b.json`. Each holds a
generation number and the sha256 of its body. A write goes to the slot that does not hold the
newest generation: deleted, then made anew with the whole ledger. A crash in between leaves that
slot missing or failing its checksum, and the other slot (one generation older) is read.

Concurrency: every read-modify-write holds a local lock named by the hypervisor and the pool
(state.host_lock). It covers every nvmprov process of this machine; two controller machines
writing one remote pool are not covered (docs/reliability.md says so).

A volume is nvmprov's when the ledger holds it for (hypervisor, guest): `adopted` entries are
volumes the spec named (`volume:`) and nvmprov must never delete unasked.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace

import libvirt

from . import domain, naming, state, storage, virt
from .errors import StorageError, VirtError

SLOTS = ("nvmprov-ledger-a.json", "nvmprov-ledger-b.json")
FORMAT = 1
MAX_BYTES = 64 * 1024 * 1024   # about 300 000 entries; a slot bigger than this is not a ledger


@dataclass(frozen=True)
class Entry:
    volume: str
    guest: str            # the domain it was made for: an nvmprov guest, or a foreign domain (attach)
    hypervisor: str       # identity.Hypervisor.key
    kind: str             # backing, overlay, seed
    adopted: bool = False  # named by the spec, made elsewhere: never deleted unless asked

    def belongs_to(self, hypervisor: str, guest: str) -> bool:
        return self.hypervisor == hypervisor and self.guest == guest


@dataclass(frozen=True)
class Ledger:
    generation: int = 0
    entries: tuple[Entry, ...] = ()

    def get(self, volume: str) -> Entry | None:
        return next((e for e in self.entries if e.volume == volume), None)

    def of(self, hypervisor: str, guest: str) -> list[Entry]:
        return [e for e in self.entries if e.belongs_to(hypervisor, guest)]

    def with_entry(self, entry: Entry) -> Ledger:
        return replace(self, entries=(*(e for e in self.entries if e.volume != entry.volume), entry))

    def without(self, volumes: Iterable[str]) -> Ledger:
        gone = set(volumes)
        return replace(self, entries=tuple(e for e in self.entries if e.volume not in gone))


# ---------------------------------------------------------------------------------------------
# pure: the bytes of a slot


def encode(ledger: Ledger) -> bytes:
    body = json.dumps({"format": FORMAT, "generation": ledger.generation,
                       "entries": [asdict(e) for e in sorted(ledger.entries, key=lambda e: e.volume)]},
                      sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def decode(data: bytes) -> Ledger | None:
    """The ledger in DATA; None when it is cut short, altered or not a ledger."""
    digest, sep, body = data.partition(b"\n")
    if not sep or hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    try:
        raw = json.loads(body)
        if raw.get("format") != FORMAT:
            return None
        entries = tuple(Entry(volume=str(e["volume"]), guest=str(e["guest"]), hypervisor=str(e["hypervisor"]),
                              kind=str(e["kind"]), adopted=bool(e.get("adopted", False))) for e in raw["entries"])
        return Ledger(int(raw["generation"]), entries)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def newest(slots: Iterable[bytes | None]) -> Ledger | None:
    """The newest valid ledger of the slots' bytes (None: a slot that does not exist); an empty
    ledger when no slot exists; None when slots exist and none is valid."""
    present = [s for s in slots if s is not None]
    valid = [x for x in map(decode, present) if x is not None]
    if valid:
        return max(valid, key=lambda x: x.generation)
    return None if present else Ledger()


# ---------------------------------------------------------------------------------------------
# side effects: read and update through the storage API


def _slot_bytes(pool: libvirt.virStoragePool, name: str) -> bytes | None:
    """The bytes of slot NAME, None when it does not exist. Reads take no lock, so a writer may
    delete and re-make this slot (always the older one) while we read it: a read that fails while
    the slot is there again is tried anew, a few times, before the failure counts."""
    for attempt in range(_READ_ATTEMPTS):
        vol = storage.lookup(pool, name)
        if vol is None:
            return None
        try:
            if storage.vol_capacity_bytes(vol) > MAX_BYTES:
                return b""  # not a ledger: counts as present and invalid
            return storage.read_small(vol, MAX_BYTES)
        except (StorageError, libvirt.libvirtError) as exc:
            if storage.lookup(pool, name) is None:
                return None  # gone is gone: the newer slot is intact
            if attempt == _READ_ATTEMPTS - 1:
                raise StorageError(f"reading {name} in storage pool {pool.name()!r}: {exc}") from None
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


_READ_ATTEMPTS = 5  # a rewrite of a slot takes milliseconds; eight creates at once raced one read here


def _slots_lock(pool: libvirt.virStoragePool, *, exclusive: bool) -> AbstractContextManager[None]:
    """Readers share it, a writer replacing a slot holds it alone: libvirt refuses to delete a
    volume while a reader downloads it ("still in use"; eight creates at once hit it in CI)."""
    return state.shared_lock(f"ledger-slots-{pool.UUIDString()}", exclusive=exclusive)


def read(pool: libvirt.virStoragePool) -> Ledger:
    with _slots_lock(pool, exclusive=False):
        found = newest([_slot_bytes(pool, name) for name in SLOTS])
    if found is None:
        raise StorageError(
            f"the ownership ledger of storage pool {pool.name()!r} ({', '.join(SLOTS)}) is unreadable in both "
            "slots; nvmprov will not guess which volumes are its own: restore one slot from a backup, or delete "
            "both (nvmprov then owns nothing in this pool and deletes nothing there)"
        )
    return found


def update(pool: libvirt.virStoragePool, hypervisor: str, change: Callable[[Ledger], Ledger]) -> Ledger:
    """Read, CHANGE, write the next generation into the other slot, under the ledger's lock."""
    with state.host_lock(f"ledger-{hypervisor}-{pool.name()}"):
        current = read(pool)
        changed = change(current)
        if set(changed.entries) == set(current.entries):
            return current
        new = replace(changed, generation=current.generation + 1)
        slot = SLOTS[new.generation % 2]
        with _slots_lock(pool, exclusive=True):
            storage.delete(pool, slot)
            storage.write_small(pool, slot, encode(new))
        return new


def record(pool: libvirt.virStoragePool, entry: Entry) -> None:
    update(pool, entry.hypervisor, lambda ledger: ledger.with_entry(entry))


def forget(pool: libvirt.virStoragePool, hypervisor: str, volumes: Iterable[str]) -> None:
    names = list(volumes)
    if names:
        update(pool, hypervisor, lambda ledger: ledger.without(names))


# ---------------------------------------------------------------------------------------------
# the rules, for create, attach, destroy, detach and prune


def in_the_way(pool: libvirt.virStoragePool, volume: str, owner: str, region: str, *, attach: bool = False,
               guest: str | None = None) -> str:
    """The one-line refusal for a volume nvmprov did not make for OWNER, with both ways out. GUEST:
    the nvmprov guest OWNER is, whose region's name before the ledger gets a hint."""
    path = f"{storage.pool_path(pool)}/{volume}"
    adopt = ("choose another --name for the region" if attach
             else f"adopt it on purpose with `volume: {volume}` under region {region} in the spec")
    legacy = ""
    if guest is not None and volume == naming.legacy_backing_volume(guest, region):
        legacy = (f"; if an nvmprov before the ownership ledger kept it for this guest, adopt it with "
                  f"`volume: {volume}`")
    return (f"volume {volume} ({path}) is in the way of region {region} of {owner}: nvmprov did not make it for "
            f"{owner}, so it neither uses nor deletes it; either {adopt}, or move it out of the way yourself "
            f"(virsh vol-delete --pool {pool.name()} {volume}, after saving its data){legacy}")


# Volumes that hold region data, kept unless purged: backings, and a CXL device's label storage area
# (its namespace labels: without them the kept backing's namespace is gone).
DATA_KINDS = ("backing", "label")


@dataclass(frozen=True)
class Purge:
    """What destroy and detach may delete beyond overlays and seeds. --purge-adopted implies
    --purge: `asked` is the one place that says so."""

    volumes: bool = False   # --purge: backing volumes nvmprov made
    adopted: bool = False   # --purge-adopted: also the volumes the spec adopted (volume:)

    @classmethod
    def asked(cls, purge: bool, purge_adopted: bool) -> Purge:
        return cls(volumes=purge or purge_adopted, adopted=purge_adopted)

    def deletes(self, entry: Entry) -> bool:
        """Whether this purge deletes ENTRY (one nvmprov holds for the guest being destroyed)."""
        return entry.kind not in DATA_KINDS or (self.adopted if entry.adopted else self.volumes)


def may_delete(entry: Entry | None, hypervisor: str, owner: str, *, adopted_too: bool = False) -> bool:
    """Only what nvmprov made for OWNER on this hypervisor; an adopted volume only when asked."""
    if entry is None or not entry.belongs_to(hypervisor, owner):
        return False
    return adopted_too or not entry.adopted


def from_metadata(ledger: Ledger, hypervisor: str, owner: str, volumes: Iterable[tuple[str, str]]) -> Ledger:
    """Volumes a domain's nvmprov metadata says this tool made (nvmprov before the ledger recorded
    only there) join the ledger, unless it already names them."""
    for volume, kind in volumes:
        if ledger.get(volume) is None:
            ledger = ledger.with_entry(Entry(volume, owner, hypervisor, kind))
    return ledger


def migrate(conn: libvirt.virConnect, pool: libvirt.virStoragePool, hypervisor: str) -> list[str]:
    """First contact with guests made before the ledger: the volumes each nvmprov domain of CONN
    whose metadata names POOL lists as made join the ledger as made for that guest (from_metadata),
    those that exist when recorded. Callers hold the pool lock (create shared, prune exclusive).
    Returns the volumes recorded now. Volumes of guests already destroyed stay unrecorded: no
    domain says they were nvmprov's."""
    made: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for dom in virt.all_domains(conn):
        try:
            md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
        except VirtError:
            continue  # undefined while we looked: nothing of it to record
        if md is not None and md.pool == pool.name() and md.volumes:
            made.append((dom.name(), md.volumes))
    if not made:
        return []
    recorded: list[str] = []

    def change(book: Ledger) -> Ledger:
        # under the ledger's lock: a rollback that deletes a volume forgets it under the same lock
        there = {v.name() for v in pool.listAllVolumes(0)}
        recorded.clear()
        for guest, volumes in made:
            present = [(v, kind) for v, kind in volumes if v in there and book.get(v) is None]
            book = from_metadata(book, hypervisor, guest, present)
            recorded.extend(v for v, _kind in present)
        return book

    storage.refresh(pool)
    update(pool, hypervisor, change)
    return recorded
