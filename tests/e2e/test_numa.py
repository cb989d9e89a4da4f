"""NUMA placement on a real guest (issue 19, part 1): two nodes, node 1 memory-only (vcpus: 1), an
nvdimm on node 1. The node is read from the guest's sysfs (regionN/target_node) and the report; then
`show` prints the topology and `attach --numa-node 1` hot-plugs a second nvdimm onto node 1.
Created with --no-power-cycle: the power cut is not what this proves (test_create does)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PREFIX, Created, _require_host, destroy_quietly, nvmprov, write_spec

pytestmark = pytest.mark.e2e

NAME = f"{PREFIX}numa"


@pytest.fixture(scope="module")
def numa_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Created]:
    _require_host()
    tmp = tmp_path_factory.mktemp("numa")
    destroy_quietly(NAME)
    spec = {"name": NAME, "memory": "1GiB", "vcpus": 1, "numa_nodes": 2,
            "pmem": [{"name": "far", "size": "256MiB", "numa_node": 1}]}
    path = write_spec(tmp, NAME, spec)
    proc = nvmprov("create", str(path), "--no-power-cycle", "--json")
    try:
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"create printed no JSON report (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        yield Created(NAME, path, proc, report)
    finally:
        destroy_quietly(NAME)


def sysfs(*paths: str) -> dict[str, str]:
    """PATH -> its first line, for each existing file the guest's shell glob finds (empty ones too)."""
    proc = nvmprov("ssh", NAME, "--", "grep -H '' " + " ".join(paths), timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(":", 1) for line in proc.stdout.splitlines())


def test_the_region_is_on_node_1_in_the_report(numa_guest: Created) -> None:
    assert numa_guest.proc.returncode == 0, numa_guest.proc.stderr[-6000:]
    g = numa_guest.guest
    assert g["ok"] is True and g["error"] is None
    (region,) = g["regions"]
    assert (region["numa_node"], region["target_node"], region["node_ok"]) == (1, 1, True), region
    assert region["dax"] is True and region["xip_ok"] is True and region["data_ok"] is True, region


def test_the_guest_kernel_shows_two_nodes_node_1_memory_only_and_the_region_on_it(numa_guest: Created) -> None:
    seen = sysfs("/sys/devices/system/node/node*/cpulist", "/sys/bus/nd/devices/region*/target_node",
                 "/sys/bus/nd/devices/region*/numa_node")
    cpus = {p: v for p, v in seen.items() if p.endswith("/cpulist")}
    assert cpus == {"/sys/devices/system/node/node0/cpulist": "0", "/sys/devices/system/node/node1/cpulist": ""}, seen
    targets = [v for p, v in seen.items() if p.endswith("/target_node")]
    assert targets == ["1"], seen   # the one region, placed on node 1 (regionN/numa_node: nearest online node)


def test_show_prints_the_topology(numa_guest: Created) -> None:
    proc = nvmprov("show", NAME, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(re.fullmatch(r"  NUMA node 0 +512 MiB  vCPUs 0 +regions: -", ln) for ln in lines), proc.stdout
    assert any(re.fullmatch(r"  NUMA node 1 +512 MiB  no vCPUs \(memory only\)  regions: far \(guest: node 1\)", ln)
               for ln in lines), proc.stdout
    data = json.loads(nvmprov("show", NAME, "--json", timeout_s=120).stdout)
    assert [(n["id"], n["cpus"], n["regions"]) for n in data["nodes"]] == [(0, "0", []), (1, None, ["far"])]


def test_attach_numa_node_hot_plugs_an_nvdimm_onto_node_1(numa_guest: Created, tmp_path: Path) -> None:
    proc = nvmprov("attach", NAME, "--size", "64MiB", "--name", "more", "--numa-node", "1", "--filesystem", "none",
                   "--json", timeout_s=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (g,) = json.loads(proc.stdout)["guests"]
    more = next(r for r in g["regions"] if r["name"] == "more")
    assert (more["numa_node"], more["target_node"], more["node_ok"]) == (1, 1, True), more
    refused = nvmprov("attach", NAME, "--size", "64MiB", "--name", "none", "--numa-node", "2", timeout_s=120)
    assert refused.returncode == 2 and "has no NUMA node 2 (its nodes: 0, 1)" in refused.stderr, refused.stderr
