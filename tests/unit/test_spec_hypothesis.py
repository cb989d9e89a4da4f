"""Random specs: every input gives a Plan with renderable XML, or a SpecError, never another exception."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmprov import domain, plan, spec
from nvmprov.errors import HostError, SpecError

FACTS = plan.HostFacts(kvm_domain_type=True)
CTX = domain.RenderContext(uuid="6f1d9c62-7d2a-4a4b-9a3e-0000000000bb", ssh_port=2222, pool_dir="/p")

def mostly(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values most of the time, so plans are built often, not just errors."""
    return st.one_of(valid, invalid)


good_sizes = st.sampled_from(["16MiB", "64MiB", "300MiB", "512MiB", "1GiB", "1G", "100001KiB", "2TiB"])
bad_sizes = st.one_of(
    st.sampled_from(["0", "1.5GiB", "1GB", "17TiB", "-1M", "1024", ""]),
    st.builds(lambda n, u: f"{n}{u}", st.integers(-3, 5000), st.sampled_from(["", "B", "K", "KiB", "M", "MiB", "G"])),
    st.integers(-5, 1 << 40),
)
sizes = mostly(good_sizes, bad_sizes)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 300), st.floats(allow_nan=False), st.text(max_size=12),
                    bad_sizes)
values: st.SearchStrategy[Any] = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def pick(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    return mostly(st.sampled_from(good), st.one_of(st.sampled_from(bad), values))


REGION_KEYS = {
    "name": mostly(st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True),
                   st.one_of(st.sampled_from(["Data", "../x", "a" * 40, "dаta", "a<b", "a\x00"]), st.text())),
    "size": sizes, "model": pick(["nvdimm", "virtio-pmem"], ["dimm"]), "label": pick(["128KiB", "1MiB"], ["64KiB"]),
    "allocation": pick(["full", "sparse"], ["thin"]), "readonly": pick([False, True], ["yes"]),
    "host_pmem": pick([False, True], [1]), "filesystem": pick(["ext4", "xfs", "none"], ["btrfs"]),
    "mount": pick([None, "/mnt/a", "/mnt/data", "/srv/pm", "/mnt/a/b"], ["/etc", "rel", "/x y", "/mnt/../x"]),
}
GUEST_KEYS = {
    "memory": sizes, "vcpus": pick([1, 2, 64], [0, 65, "2"]), "disk": sizes,
    "image": pick(["builtin", "/i/x.qcow2"], ["x.qcow2", "/i/x.iso"]),
    "firmware": pick(["auto", "direct", "bios", "efi"], ["uefi"]),
    "accel": pick(["auto", "tcg"], ["kvm", "hvf"]), "connect": pick(["qemu:///system", "test:///default"], ["x y"]),
    "pool": pick(["nvmprov", "p_1"], ["p 1"]),
    "ssh": st.fixed_dictionaries({}, optional={"user": pick(["ci", "nvmprov"], ["root", "A"])}),
    "network": st.fixed_dictionaries({}, optional={
        "mode": pick(["user", "network"], ["nat"]), "outbound": pick([False, True], [2]),
        "name": pick(["default"], [""])}),
    "hotplug": st.fixed_dictionaries({}, optional={"slots": pick([0, 4, 255], [-1, 300]), "headroom": sizes}),
    "timeouts": st.fixed_dictionaries({}, optional={"boot_s": pick([1, 600], [0, 10**6])}),
}


def region() -> st.SearchStrategy[dict[str, Any]]:
    base = st.fixed_dictionaries({"name": REGION_KEYS["name"], "size": REGION_KEYS["size"]},
                                 optional={k: v for k, v in REGION_KEYS.items() if k not in ("name", "size")})
    return mostly(base, st.dictionaries(st.sampled_from([*REGION_KEYS, "colour"]), values, max_size=4))


guests = st.fixed_dictionaries(
    {"name": mostly(st.sampled_from(["demo", "g-1", "x" * 63]), st.text(max_size=8)),
     "pmem": mostly(st.lists(region(), min_size=1, max_size=4), values)},
    optional={**GUEST_KEYS, "memroy": values, "version": pick([1], [2, "1"])},
)


def check(document: Any) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        loaded = spec.loads(text, "h.yaml")
    except SpecError as e:
        assert e.file == "h.yaml" and e.message
        return
    for g in loaded.guests:
        try:
            p = plan.build(g, FACTS)
        except HostError as e:      # the one host-dependent refusal: kvm asked on a host without vmx
            assert g.accel == "kvm" and "accel: kvm cannot work here" in str(e)
            continue
        ET.fromstring(domain.render(p, CTX))
        for r in p.regions:
            assert r.backing_bytes >= r.size_bytes and r.backing_bytes % (2 << 20) == 0
            assert 0 < r.expected_usable_bytes <= r.backing_bytes


GOOD_GUEST = {"memory": good_sizes, "vcpus": st.sampled_from([1, 2]), "disk": st.sampled_from(["8GiB", "1GiB"]),
              "firmware": st.sampled_from(["auto", "direct"]), "accel": st.sampled_from(["auto", "tcg"]),
              "hotplug": st.fixed_dictionaries({}, optional={"slots": st.integers(0, 12), "headroom": good_sizes})}
GOOD_REGION = {"model": st.sampled_from(["nvdimm", "virtio-pmem"]), "allocation": st.sampled_from(["full", "sparse"]),
               "filesystem": st.sampled_from(["ext4", "none"])}


@st.composite
def mutated_guest(draw: st.DrawFn) -> dict[str, Any]:
    """A valid skeleton with valid random choices, then zero to two random mutations."""
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=1, max_size=4, unique=True))
    regions = [{"name": n, "size": draw(good_sizes), **draw(st.fixed_dictionaries({}, optional=GOOD_REGION))}
               for n in names]
    g: dict[str, Any] = {"name": "demo", "pmem": regions, **draw(st.fixed_dictionaries({}, optional=GOOD_GUEST))}
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from([g, *regions]))
        keys = GUEST_KEYS if target is g else REGION_KEYS
        key = draw(st.sampled_from(sorted(keys)))
        target[key] = draw(st.one_of(keys[key], values))
    return g


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_guest())
def test_mutated_valid_guest_gives_plan_or_spec_error(document: dict[str, Any]) -> None:
    check(document)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(guests)
def test_random_guest_gives_plan_or_spec_error(document: dict[str, Any]) -> None:
    check(document)


@settings(max_examples=100, deadline=None)
@given(st.fixed_dictionaries({"guests": st.lists(guests, max_size=3)}, optional={"defaults": values}))
def test_random_fleet_gives_plans_or_spec_error(document: dict[str, Any]) -> None:
    check(document)


@settings(max_examples=200, deadline=None)
@given(values)
def test_random_yaml_values_give_spec_error(document: Any) -> None:
    check(document)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text_gives_spec_error_or_plan(text: str) -> None:
    try:
        loaded = spec.loads(text, "t.yaml")
    except SpecError as e:
        assert e.file == "t.yaml"
        return
    for g in loaded.guests:
        ET.fromstring(domain.render(plan.build(g, FACTS), CTX))
