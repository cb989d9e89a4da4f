"""Volume names that cannot collide (pure).

Names used to be `GUEST-pmem-REGION.raw`, and a foreign domain's name was folded into nvmprov's
alphabet first. Both were ambiguous: guest `a` with region `b-pmem-c` and guest `a-pmem-b` with
region `c` both got `a-pmem-b-pmem-c.raw`; domains `web_01` and `web-01` got one volume. The
functions here are injective, and they keep today's name wherever today's name was unambiguous,
so the volumes of existing guests are found where they are:

- a managed guest's region: `GUEST-pmem-REGION.raw` when the first `-pmem-` of that string is the
  separator (decoding it gives back GUEST and REGION), else `GUEST.pmem.REGION.raw`;
- a foreign domain's region: `DOMAIN.domain.REGION.raw`, DOMAIN escaped into `[a-z0-9-_]` (every
  other byte of its UTF-8 as `_xx`, `_` itself included).

Guest and region names hold only `[a-z0-9-]` (spec.py), so the dotted forms split at their dots
into exactly three parts, and the three forms never meet: the first has no dot, the other two
differ in their middle part.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SEPARATOR = "-pmem-"
MAX_VOLUME_NAME = 255  # a file name in the pool's directory
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def backing_volume(guest: str, region: str) -> str:
    """The backing volume of REGION of nvmprov guest GUEST (both spec names: [a-z0-9-])."""
    legacy = legacy_backing_volume(guest, region)
    if legacy.find(SEPARATOR) == len(guest):
        return legacy
    return f"{guest}.pmem.{region}.raw"


def legacy_backing_volume(guest: str, region: str) -> str:
    """The name nvmprov gave REGION of GUEST before names were injective (and before the ledger)."""
    return f"{guest}{SEPARATOR}{region}.raw"


def escape(name: str) -> str:
    """NAME in [a-z0-9-_], injectively: characters of [a-z0-9-] stay, every UTF-8 byte of any
    other character (and of `_`) becomes `_xx`."""
    out = []
    for ch in name:
        if ch in _PLAIN:
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def foreign_backing_volume(domain: str, region: str) -> str:
    """The backing volume of REGION attached to DOMAIN, a libvirt domain nvmprov did not make."""
    return f"{escape(domain)}.domain.{region}.raw"


def too_long(volume: str) -> bool:
    return len(volume.encode()) > MAX_VOLUME_NAME


@dataclass(frozen=True)
class SharedPath:
    path: str
    first: str    # "guest/region" that has it first
    second: str


def shared_paths(uses: Iterable[tuple[str, str]]) -> list[SharedPath]:
    """(owner, path) pairs -> every path named by two owners (validate refuses such a fleet)."""
    seen: dict[str, str] = {}
    shared = []
    for owner, path in uses:
        if path in seen and seen[path] != owner:
            shared.append(SharedPath(path, seen[path], owner))
        seen.setdefault(path, owner)
    return shared
