"""Volume names that cannot collide: nvmprov.naming is injective (hypothesis), keeps today's names
where they were unambiguous, and validate refuses a fleet whose guests would share a file."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvmprov import naming, spec
from nvmprov.errors import SpecError

# spec.py's names: [a-z0-9-], not starting with '-'; '-pmem' pieces make the old ambiguity likely
_piece = st.sampled_from(["a", "b", "c", "-", "pmem", "-pmem", "pmem-", "-pmem-", "0", "p", "m", "e"])
guest_names = st.lists(_piece, min_size=1, max_size=8).map("".join).filter(
    lambda s: not s.startswith("-") and len(s) <= 63)
region_names = st.lists(_piece, min_size=1, max_size=6).map("".join).filter(
    lambda s: not s.startswith("-") and len(s) <= 32)
# libvirt domain names: anything printable without '/'; nvmprov's alphabet, look-alikes, escapes
domain_names = st.lists(st.sampled_from([*"abcAB-_.0 é%", "_5f", "_2e", "pmem", ".domain."]), min_size=1,
                        max_size=8).map("".join)

Owner = tuple[str, str, str]  # (kind, guest or domain, region)
owners = st.one_of(
    st.tuples(st.just("guest"), guest_names, region_names),
    st.tuples(st.just("domain"), domain_names, region_names),
)


def name_of(owner: Owner) -> str:
    kind, who, region = owner
    return naming.backing_volume(who, region) if kind == "guest" else naming.foreign_backing_volume(who, region)


@settings(max_examples=3000, deadline=None)
@given(owners, owners)
def test_two_distinct_owners_never_get_one_volume_name(a: Owner, b: Owner) -> None:
    if a != b:
        assert name_of(a) != name_of(b)


@given(domain_names)
def test_escape_is_reversible(name: str) -> None:
    escaped = naming.escape(name)
    assert set(escaped) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_")
    raw = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "_":
            raw.append(int(escaped[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += escaped[i].encode()
            i += 1
    assert raw.decode("utf-8", "surrogatepass") == name


@pytest.mark.parametrize(("guest", "region", "volume"), [
    ("demo", "data", "demo-pmem-data.raw"),              # today's name, kept: existing guests find their data
    ("a", "b-pmem-c", "a-pmem-b-pmem-c.raw"),            # the first -pmem- is the separator: kept
    ("a-pmem-b", "c", "a-pmem-b.pmem.c.raw"),             # was a-pmem-b-pmem-c.raw too: now its own
    ("x-pmem", "pmem-y", "x-pmem.pmem.pmem-y.raw"),
])
def test_backing_volume_keeps_unambiguous_names(guest: str, region: str, volume: str) -> None:
    assert naming.backing_volume(guest, region) == volume


def test_the_two_guests_of_the_issue_get_two_volumes() -> None:
    assert naming.backing_volume("a", "b-pmem-c") != naming.backing_volume("a-pmem-b", "c")
    assert naming.foreign_backing_volume("web_01", "d") != naming.foreign_backing_volume("web-01", "d")


FLEET = """
version: 1
guests:
  - name: a
    pmem: [{name: b-pmem-c, size: 16MiB}]
  - name: a-pmem-b
    pmem: [{name: c, size: 16MiB}]
"""


def test_the_issue_fleet_validates_with_two_paths() -> None:
    loaded = spec.loads(FLEET, "f.yaml")
    assert len({g.volume_of(g.pmem[0]) for g in loaded.guests}) == 2


def test_a_fleet_whose_guests_would_share_a_file_is_refused() -> None:
    text = FLEET.replace("{name: c, size: 16MiB}", "{name: c, size: 16MiB, volume: a-pmem-b-pmem-c.raw}")
    with pytest.raises(SpecError) as info:
        spec.loads(text, "f.yaml")
    message = str(info.value)
    assert "f.yaml:7:" in message
    assert "a-pmem-b/c would share /var/lib/nvmprov/pool/a-pmem-b-pmem-c.raw with region a/b-pmem-c" in message


def test_one_guest_cannot_back_two_regions_with_one_volume() -> None:
    text = """
name: g
pmem:
  - {name: one, size: 16MiB, volume: mine.raw}
  - {name: two, size: 16MiB, volume: mine.raw}
"""
    with pytest.raises(SpecError, match=r"pmem\[1\]\.volume: 'mine.raw' is also the backing of pmem\[0\]"):
        spec.loads(text, "g.yaml")


@pytest.mark.parametrize("bad", ["../x.raw", "a/b.raw", "nvmprov-ledger-a.json", ".hidden", ""])
def test_volume_key_takes_only_a_plain_volume_name(bad: str) -> None:
    with pytest.raises(SpecError, match="volume"):
        spec.loads(f"name: g\npmem: [{{name: d, size: 16MiB, volume: '{bad}'}}]\n", "g.yaml")


def test_volume_key_keeps_the_digest_of_specs_without_it() -> None:
    text = "name: g\npmem: [{name: d, size: 16MiB}]\n"
    g = spec.loads(text).guests[0]
    assert "volume" not in g.canonical()["pmem"][0]
    adopted = spec.loads(text.replace("16MiB}", "16MiB, volume: old.raw}")).guests[0]
    assert adopted.digest() != g.digest()


def test_an_adopted_volume_cannot_be_another_guests_root_disk() -> None:
    text = FLEET.replace("{name: c, size: 16MiB}", "{name: c, size: 16MiB, volume: a-root.qcow2}")
    with pytest.raises(SpecError, match="would share /var/lib/nvmprov/pool/a-root.qcow2"):
        spec.loads(text, "f.yaml")
    with pytest.raises(SpecError, match="own root disk or seed"):
        spec.loads("name: g\npmem: [{name: d, size: 16MiB, volume: g-seed.iso}]\n", "g.yaml")
