"""The guest file's valid forms: sizes, defaults, fleets, digest and diff, file handling."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nvmprov import spec
from nvmprov.errors import SpecError, UsageError

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(("text", "n"), [
    ("512MiB", 512 * MiB), ("512M", 512 * MiB), ("512m", 512 * MiB), ("1GiB", GiB), ("1G", GiB),
    ("2TiB", 2 * TiB), ("128KiB", 128 * KiB), ("128K", 128 * KiB), ("4096B", 4096), (" 1 GiB ", GiB),
    ("16TiB", 16 * TiB),
])
def test_parse_size_binary_units(text: str, n: int) -> None:
    assert spec.parse_size(text) == n


@pytest.mark.parametrize(("value", "fragment"), [
    (1024, "has no unit"), ("1024", "has no unit"), ("1.5GiB", "is fractional; write 1536MiB"),
    ("1.3B", "is fractional; give a whole number of bytes"), ("0MiB", "is zero"), ("-5MiB", "is negative"),
    ("1GB", "decimal unit"), ("17TiB", "larger than 16TiB"), ("five MiB", "not a size"), ("5parsecs", "unknown unit"),
    (True, "must be a size"), (None, "must be a size"), (1.5, "must be a size"),
])
def test_parse_size_refuses(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        spec.parse_size(value, what="--size")  # type: ignore[arg-type]


def test_parse_size_what_names_the_input() -> None:
    with pytest.raises(ValueError, match=r"^--size '1GB' uses a decimal unit; nvmprov sizes are binary: write 1GiB$"):
        spec.parse_size("1GB", what="--size")


def test_parse_size_zero_only_when_allowed() -> None:
    assert spec.parse_size("0", allow_zero=True) == 0
    assert spec.parse_size(0, allow_zero=True) == 0
    with pytest.raises(ValueError):
        spec.parse_size("0")


def test_format_size_round_trips() -> None:
    for n in (1, 4097, 128 * KiB, 1536 * MiB, GiB, 3 * TiB):
        assert spec.parse_size(spec.format_size(n)) == n
    assert spec.format_size(1536 * MiB) == "1536MiB"


def test_defaults_are_the_documented_ones() -> None:
    g = spec.loads("name: demo\npmem: [{name: data, size: 1GiB}]\n").guests[0]
    assert (g.memory_bytes, g.vcpus, g.disk_bytes) == (GiB, 1, 8 * GiB)
    assert (g.image, g.firmware, g.accel, g.connect, g.pool) == ("builtin", "auto", "auto", "qemu:///system", "nvmprov")
    assert g.ssh.user == "nvmprov"
    assert (g.network.mode, g.network.outbound, g.network.name) == ("user", False, None)
    assert (g.hotplug.slots, g.hotplug.headroom_bytes) == (4, 8 * GiB)
    assert (g.timeouts.boot_s, g.timeouts.ssh_s) == (600, 600)
    r = g.pmem[0]
    assert (r.model, r.label_bytes, r.allocation, r.readonly, r.host_pmem) == ("nvdimm", None, "full", False, False)
    assert (r.filesystem, r.mount) == ("ext4", "/mnt/data")


def test_the_full_issue_example_parses() -> None:
    text = """\
version: 1
name: demo
memory: 1GiB
vcpus: 2
disk: 8GiB
image: builtin
firmware: auto
accel: auto
connect: qemu:///system
pool: nvmprov
ssh: {user: nvmprov}
network: {mode: user, outbound: false}
hotplug: {slots: 4, headroom: 8GiB}
timeouts: {boot_s: 600, ssh_s: 600}
pmem:
  - name: data
    size: 1GiB
    model: nvdimm
    label: 128KiB
    allocation: full
    readonly: false
    host_pmem: false
    filesystem: ext4
    mount: /mnt/data
"""
    g = spec.loads(text).guests[0]
    assert g.vcpus == 2 and g.pmem[0].label_bytes == 128 * KiB
    # every key written equals the default except vcpus and label: the digest says so too
    plain = spec.loads("name: demo\nvcpus: 2\npmem: [{name: data, size: 1GiB, label: 128KiB}]\n").guests[0]
    assert g.digest() == plain.digest()


def test_no_filesystem_means_no_mount() -> None:
    g = spec.loads("name: d\npmem: [{name: raw, size: 64MiB, filesystem: none}]\n").guests[0]
    assert g.pmem[0].mount is None


def test_network_mode_network() -> None:
    g = spec.loads("name: d\nnetwork: {mode: network, name: default}\npmem: [{name: a, size: 64MiB}]\n").guests[0]
    assert (g.network.mode, g.network.name) == ("network", "default")


def test_fleet_defaults_merge_recursively_and_lists_replace() -> None:
    text = """\
defaults:
  memory: 2GiB
  hotplug: {slots: 2, headroom: 4GiB}
  pmem: [{name: data, size: 512MiB}]
guests:
  - name: a
  - name: b
    hotplug: {slots: 7}
    pmem: [{name: other, size: 64MiB}]
"""
    a, b = spec.loads(text).guests
    assert a.memory_bytes == b.memory_bytes == 2 * GiB
    assert (a.hotplug.slots, a.hotplug.headroom_bytes) == (2, 4 * GiB)
    assert (b.hotplug.slots, b.hotplug.headroom_bytes) == (7, 4 * GiB)      # merged key by key
    assert [r.name for r in a.pmem] == ["data"] and [r.name for r in b.pmem] == ["other"]   # replaced


def test_fleet_error_in_a_default_points_into_defaults() -> None:
    text = "defaults:\n  pmem: [{name: data, size: 512MiB, label: 1MiB, model: virtio-pmem}]\nguests:\n  - name: a\n"
    with pytest.raises(SpecError) as info:
        spec.loads(text, "f.yaml")
    assert (info.value.line, info.value.col, info.value.field) == (2, 44, "defaults.pmem[0].label")


def test_fleet_error_in_a_guest_names_the_guest() -> None:
    text = "defaults:\n  pmem: [{name: d, size: 64MiB}]\nguests:\n  - {name: a}\n  - {name: b, vcpus: 0}\n"
    with pytest.raises(SpecError) as info:
        spec.loads(text, "f.yaml")
    assert str(info.value) == "f.yaml:5:22: guests[1].vcpus: 0 is too small; use at least 1"


def test_fleet_defaults_cannot_name() -> None:
    with pytest.raises(SpecError, match=r"f.yaml:2:3: defaults.name: defaults cannot set name"):
        spec.loads("defaults:\n  name: x\nguests:\n  - {name: a, pmem: [{name: d, size: 64MiB}]}\n", "f.yaml")


def test_digest_ignores_formatting_and_key_order() -> None:
    one = spec.loads("name: demo\nmemory: 1GiB\npmem: [{name: d, size: 512MiB, filesystem: ext4}]\n").guests[0]
    two = spec.loads("pmem:\n  - size: 524288KiB\n    name: d\nmemory: 1024M   # same\nname: demo\n").guests[0]
    assert one.digest() == two.digest()
    assert len(one.digest()) == 64
    three = spec.loads("name: demo\nmemory: 2GiB\npmem: [{name: d, size: 512MiB}]\n").guests[0]
    assert three.digest() != one.digest()


def test_diff_lists_changed_paths() -> None:
    a = spec.loads("name: demo\npmem: [{name: d, size: 512MiB}]\n").guests[0]
    text = "name: demo\nvcpus: 2\nhotplug: {slots: 1}\npmem: [{name: d, size: 1GiB}, {name: e, size: 64MiB}]\n"
    b = spec.loads(text).guests[0]
    assert a.diff(a) == []
    changed = a.diff(b)
    assert changed[:3] == ["hotplug.slots", "pmem[0].size", "pmem[1].allocation"]
    assert "vcpus" in changed and "pmem[1].name" in changed


def test_dumped_spec_validates_again() -> None:
    # workflow stores model_dump_json(by_alias=True) and re-reads it for `diff`
    g = spec.loads((EXAMPLES / "mixed.yaml").read_text()).guests[0]
    again = spec.GuestSpec.model_validate_json(g.model_dump_json(by_alias=True))
    assert again == g and again.digest() == g.digest()


def test_specfile_guest_lookup() -> None:
    sf = spec.load(EXAMPLES / "fleet.yaml")
    assert sf.guest("ci-2").memory_bytes == 2 * GiB
    with pytest.raises(UsageError, match=r"no guest 'nope' in .*fleet.yaml; it holds: ci-1, ci-2, ci-3"):
        sf.guest("nope")
    with pytest.raises(UsageError, match=r"holds 3 guests \(ci-1, ci-2, ci-3\); pick one with --guest NAME"):
        sf.guest()
    assert spec.load(EXAMPLES / "guest.yaml").guest().name == "demo"


def test_every_example_loads() -> None:
    names = {p.name: [g.name for g in spec.load(p).guests] for p in EXAMPLES.glob("*.yaml")}
    assert names == {"guest.yaml": ["demo"], "mixed.yaml": ["mixed"], "fleet.yaml": ["ci-1", "ci-2", "ci-3"],
                     "numa.yaml": ["numa"], "namespaces.yaml": ["split"], "cxl.yaml": ["cxl"]}


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        spec.load(missing)
    assert str(info.value) == f"{missing}: no such file; check the path"


def test_directory_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        spec.load(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_bytes(b"name: demo\nmemory: \xff\n")
    with pytest.raises(SpecError) as info:
        spec.load(f)
    assert str(info.value) == f"{f}:2:9: is not UTF-8 text (byte 0xff); save it as UTF-8"


def test_not_utf8_column_counts_characters_not_bytes(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_bytes("name: démo\nx: éé".encode() + b"\xc3(\n")  # two 2-byte characters before the bad byte
    with pytest.raises(SpecError) as info:
        spec.load(f)
    assert str(info.value) == f"{f}:2:6: is not UTF-8 text (byte 0xc3); save it as UTF-8"


def test_huge_file(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text("#" * (2 * MiB))
    with pytest.raises(SpecError, match="a guest file is at most"):
        spec.load(f)


def test_billion_laughs_is_refused_at_once() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    start = time.monotonic()
    with pytest.raises(SpecError, match=r"^x.yaml:1:4: a: YAML anchors \(&a\) are not allowed"):
        spec.loads("\n".join(lines) + "\n", "x.yaml")
    assert time.monotonic() - start < 1


def test_yaml_nul_character_is_a_clean_error() -> None:
    with pytest.raises(SpecError) as info:
        spec.loads("name: de\x00mo\n", "x.yaml")
    assert str(info.value) == "x.yaml:1:9: character '\\x00' (U+0000) is not allowed in YAML; remove it"


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\npmem: []\n"
    with pytest.raises(SpecError):
        spec.loads(text)
    assert not marker.exists()


def test_many_nodes_are_capped() -> None:
    text = "name: d\npmem: [" + ",".join(["1"] * (spec.MAX_YAML_NODES + 10)) + "]\n"
    with pytest.raises(SpecError, match="YAML values; a guest file is far smaller"):
        spec.loads(text)


def test_human_size_is_the_one_size_for_people() -> None:
    from nvmprov.sizes import human_size

    assert [human_size(n) for n in (512 * MiB, 1536 * MiB, 1 << 30, (1 << 30) + 4096, 3 << 40, 1000, 4096)] == [
        "512 MiB", "1.50 GiB", "1 GiB", "1.00 GiB", "3 TiB", "1000 B", "4 KiB"]
    assert human_size(None) == human_size("12") == human_size(True) == "-"   # unknown, or not bytes (report JSON)
