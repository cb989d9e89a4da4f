"""NUMA placement and split regions on one real guest (issue 19): two nodes, node 1 memory-only
(vcpus: 1), an nvdimm on node 1, and a labelled nvdimm on node 0 split into two namespaces of different
modes (fsdax + ext4, devdax). Created WITH the power cycle: both namespaces must be made, verified and
come back after the cut. Asserted from the guest's sysfs, ndctl and /proc/mounts and the report; then
`show` prints the topology and `attach --numa-node 1` hot-plugs another nvdimm onto node 1.
One guest for both parts of the issue: a boot under TCG is the suite's dearest step."""

from __future__ import annotations

import json
import re
import time
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
            "pmem": [{"name": "far", "size": "256MiB", "numa_node": 1},
                     {"name": "split", "size": "512MiB", "label": "128KiB", "namespaces": [
                         {"name": "files", "size": "192MiB", "mode": "fsdax", "filesystem": "ext4"},
                         {"name": "db", "size": "304MiB", "mode": "devdax"}]}]}
    path = write_spec(tmp, NAME, spec)
    started = time.monotonic()
    proc = nvmprov("create", str(path), "--json")  # with the power cycle: the namespaces must survive it
    print(f"create with the power cycle: {time.monotonic() - started:.0f} s")
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
    region = next(r for r in g["regions"] if r["name"] == "far")
    assert (region["numa_node"], region["target_node"], region["node_ok"]) == (1, 1, True), region
    assert region["dax"] is True and region["xip_ok"] is True and region["data_ok"] is True, region
    assert region["persisted"] is True, region


def test_each_namespace_of_the_split_region_is_made_proven_and_reported(numa_guest: Created) -> None:
    assert numa_guest.proc.returncode == 0, numa_guest.proc.stderr[-6000:]
    by_name = {r["name"]: r for r in numa_guest.guest["regions"]}
    assert sorted(by_name) == ["far", "split.db", "split.files"], sorted(by_name)
    files, db = by_name["split.files"], by_name["split.db"]
    assert (files["region"], files["namespace"], files["size_bytes"]) == ("split", "files", 192 * 2**20), files
    assert (files["namespace_mode"], files["filesystem"], files["mountpoint"]) == ("fsdax", "ext4",
                                                                                 "/mnt/split-files"), files
    assert files["usable_bytes"] == 197132288 and files["guest_device"].startswith("/dev/pmem"), files
    assert files["dax"] is True and files["xip_ok"] is True and files["data_ok"] is True, files
    assert (db["region"], db["namespace"], db["namespace_mode"]) == ("split", "db", "devdax"), db
    assert re.fullmatch(r"/dev/dax\d+\.\d+", db["guest_device"] or ""), db
    assert db["dax"] is True and db["data_ok"] is True and db["map_sync"] is True, db
    for r in (files, db):  # each came back after the cut, its marker found in the one backing volume
        assert r["persisted"] is True and r["marker_offset"] is not None, r
        assert (r["numa_node"], r["target_node"], r["node_ok"]) == (0, 0, True), r
    assert files["namespace_uuid"] != db["namespace_uuid"]


def test_the_guest_shows_both_namespaces_by_name_with_their_devices_and_mount(numa_guest: Created) -> None:
    proc = nvmprov("ssh", NAME, "--", "sudo ndctl list --namespaces; echo; cat /proc/self/mounts; echo; "
                   "sudo blkid -o export /dev/pmem*", timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    listing, mounts, blkid = proc.stdout.split("\n\n", 2)
    named = {ns["name"]: ns for ns in json.loads(listing) if ns.get("name")}
    assert (named["files"]["mode"], named["db"]["mode"]) == ("fsdax", "devdax"), named
    by_name = {r["name"]: r for r in numa_guest.guest["regions"]}
    files, db = by_name["split.files"], by_name["split.db"]
    assert f"/dev/{named['files']['blockdev']}" == files["guest_device"]
    assert f"/dev/{named['db']['chardev']}" == db["guest_device"]
    assert any(ln.split()[:3] == [files["guest_device"], "/mnt/split-files", "ext4"] and "dax=always" in ln
               for ln in mounts.splitlines()), mounts
    uuids = re.findall(r"^UUID=(\S+)$", blkid, re.M)  # far's and split.files' ext4: distinct
    assert len(uuids) == 2 and len(set(uuids)) == 2 and files["fs_uuid"] in uuids, blkid


def test_verify_changes_nothing_on_the_split_region(numa_guest: Created) -> None:
    before = nvmprov("ssh", NAME, "--", "sudo ndctl list --namespaces", timeout_s=120)
    proc = nvmprov("verify", NAME, "--json", timeout_s=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (g,) = json.loads(proc.stdout)["guests"]
    by_name = {r["name"]: r for r in g["regions"]}
    assert by_name["split.db"]["data_ok"] is True and by_name["split.files"]["data_ok"] is True
    after = nvmprov("ssh", NAME, "--", "sudo ndctl list --namespaces", timeout_s=120)
    assert json.loads(after.stdout) == json.loads(before.stdout)  # same namespaces, uuids, sizes


def test_the_guest_kernel_shows_two_nodes_node_1_memory_only_and_the_region_on_it(numa_guest: Created) -> None:
    seen = sysfs("/sys/devices/system/node/node*/cpulist", "/sys/bus/nd/devices/region*/target_node",
                 "/sys/bus/nd/devices/region*/numa_node")
    cpus = {p: v for p, v in seen.items() if p.endswith("/cpulist")}
    assert cpus == {"/sys/devices/system/node/node0/cpulist": "0", "/sys/devices/system/node/node1/cpulist": ""}, seen
    targets = sorted(v for p, v in seen.items() if p.endswith("/target_node"))
    assert targets == ["0", "1"], seen   # split on node 0, far on node 1 (regionN/numa_node: nearest online node)


def test_show_prints_the_topology(numa_guest: Created) -> None:
    proc = nvmprov("show", NAME, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(re.fullmatch(r"  NUMA node 0 +512 MiB  vCPUs 0 +regions: split \(guest: node 0\)", ln)
               for ln in lines), proc.stdout
    assert any(re.fullmatch(r"  NUMA node 1 +512 MiB  no vCPUs \(memory only\)  regions: far \(guest: node 1\)", ln)
               for ln in lines), proc.stdout
    data = json.loads(nvmprov("show", NAME, "--json", timeout_s=120).stdout)
    assert [(n["id"], n["cpus"], n["regions"]) for n in data["nodes"]] == [(0, "0", ["split"]), (1, None, ["far"])]


def test_attach_numa_node_hot_plugs_an_nvdimm_onto_node_1(numa_guest: Created, tmp_path: Path) -> None:
    proc = nvmprov("attach", NAME, "--size", "64MiB", "--name", "more", "--numa-node", "1", "--filesystem", "none",
                   "--json", timeout_s=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (g,) = json.loads(proc.stdout)["guests"]
    more = next(r for r in g["regions"] if r["name"] == "more")
    assert (more["numa_node"], more["target_node"], more["node_ok"]) == (1, 1, True), more
    refused = nvmprov("attach", NAME, "--size", "64MiB", "--name", "none", "--numa-node", "2", timeout_s=120)
    assert refused.returncode == 2 and "has no NUMA node 2 (its nodes: 0, 1)" in refused.stderr, refused.stderr
