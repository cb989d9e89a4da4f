"""The report: JSON schema fields, ok/exit semantics, JUnit structure, the text table."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

from nvmprov.agent import RegionReport
from nvmprov.report import GuestReport, Report, SshInfo, failed_checks, render_json, render_junit, render_text


def region(**over) -> RegionReport:
    base = dict(
        name="data", model="nvdimm", size_bytes=1 << 30, usable_bytes=1054867456,
        backing_path="/var/lib/nvmprov/pool/demo-pmem-data.raw", guest_device="/dev/pmem0",
        namespace_mode="fsdax", filesystem="ext4", mountpoint="/mnt/data", dax=True, xip_ok=True,
        data_ok=True, persisted=True,
    )
    base.update(over)
    return RegionReport(**base)


def guest(*regions: RegionReport, name: str = "demo") -> GuestReport:
    g = GuestReport(name=name, accel="tcg", regions=list(regions), timings_s={"ssh": 50.0},
                    ssh=SshInfo("127.0.0.1", 40022, "nvmprov", "/k", "/kh"))
    g.settle()
    return g


def test_json_has_the_documented_schema() -> None:
    data = json.loads(render_json(Report([guest(region())])))
    assert data["schema_version"] == 1 and data["ok"] is True
    g = data["guests"][0]
    assert set(g) == {"name", "ok", "error", "accel", "ssh", "regions", "timings_s", "notes"}
    assert set(g["ssh"]) == {"host", "port", "user", "identity_file", "known_hosts"}
    documented = {"name", "model", "size_bytes", "usable_bytes", "backing_path", "guest_device", "namespace_mode",
                  "filesystem", "mountpoint", "dax", "xip_ok", "data_ok", "persisted", "fs_uuid", "namespace_uuid"}
    assert documented <= set(g["regions"][0])


def test_any_false_check_fails_the_guest_but_none_does_not() -> None:
    assert guest(region(persisted=None)).ok is True
    bad = guest(region(persisted=False))
    assert bad.ok is False
    assert failed_checks(bad.regions[0]) == ["persisted"]
    assert Report([guest(region()), bad]).ok is False
    assert Report([]).ok is False  # nothing created is not success


def test_error_fails_the_guest() -> None:
    g = GuestReport(name="demo")
    g.fail("ssh", "timed out")
    g.settle()
    data = json.loads(render_json(Report([g])))
    assert data["ok"] is False
    assert data["guests"][0]["error"] == {"phase": "ssh", "message": "timed out"}


def test_junit_one_case_per_check_with_failures_and_skips() -> None:
    xml = render_junit(Report([guest(region(persisted=None), region(name="b", dax=False))]))
    root = ET.fromstring(xml)
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "10"   # node_ok: not checked (no numa_node)
    assert suite.get("failures") == "1" and suite.get("skipped") == "3"
    failed = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failed] == [("nvmprov.demo.b", "dax")]


def test_text_table_shows_each_region_and_verdict() -> None:
    text = render_text(Report([guest(region(), region(name="logs", persisted=False))]))
    assert "guest demo: FAILED" in text
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(("data ", "logs "))]
    assert len(lines) == 2 and lines[1].rstrip().endswith("NO")
    assert "ssh -i /k" in text and text.rstrip().endswith("FAILED")


def test_why_a_region_is_not_persisted_is_shown() -> None:
    reason = "region logs: not persisted: after the power cycle the guest shows region1 with a raw namespace"
    report = Report([guest(region(), region(name="logs", persisted=False, persisted_reason=reason))])
    assert f"  {reason}" in render_text(report).splitlines()
    assert json.loads(render_json(report))["guests"][0]["regions"][1]["persisted_reason"] == reason
    assert json.loads(render_json(report))["guests"][0]["regions"][0]["persisted_reason"] is None
    failures = [f for f in ET.fromstring(render_junit(report)).iter("failure")]
    assert [f.text for f in failures] == [reason]


def test_notes_reach_json_and_junit() -> None:
    g = guest(region())
    g.notes.append("rollback left: volume demo-pmem-data.raw: in use")
    report = Report([g])
    assert json.loads(render_json(report))["guests"][0]["notes"] == g.notes
    suite = ET.fromstring(render_junit(report)).find("testsuite")
    assert suite is not None
    out = suite.find("system-out")
    assert out is not None and out.text == "note: rollback left: volume demo-pmem-data.raw: in use"
    assert suite.get("tests") == "5"  # a note is not a test case


def test_a_region_on_another_node_fails_with_the_nodes_named() -> None:
    from nvmprov.agent.converge import RegionState

    state = RegionState(name="data", model="nvdimm", guest_region="region0", namespace="namespace0.0",
                        namespace_mode="fsdax", guest_device="/dev/pmem0", usable_bytes=1, device_dax=True,
                        filesystem="ext4", fs_uuid=None, mountpoint="/mnt/data", mount_dax=True, target_node=0)
    wrong = region(numa_node=1)
    wrong.observe(state)
    assert (wrong.target_node, wrong.node_ok) == (0, False) and failed_checks(wrong) == ["node_ok"]
    g = guest(wrong)
    assert g.ok is False
    reason = "region data: on NUMA node 0 in the guest (sysfs target_node), the spec puts it on node 1"
    assert f"  {reason}" in render_text(Report([g])).splitlines()
    fail = ET.fromstring(render_junit(Report([g]))).find("testsuite/testcase[@name='node_ok']/failure")
    assert fail is not None and fail.text == reason
    data = json.loads(render_json(Report([g])))["guests"][0]["regions"][0]
    assert (data["numa_node"], data["target_node"], data["node_ok"]) == (1, 0, False)
    right = region(numa_node=0)
    right.observe(state)
    assert right.node_ok is True and guest(right).ok is True
    unknown = region(numa_node=0)   # a kernel without regionN/target_node: not checked
    unknown.observe(dataclasses.replace(state, target_node=None))
    assert unknown.node_ok is None
    virtio = region(model="virtio-pmem")  # no numa_node: the node is reported, never checked
    virtio.observe(state)
    assert (virtio.target_node, virtio.node_ok) == (0, None)


def test_modes_map_sync_and_the_tail_in_json_and_text() -> None:
    """Issue 17: namespace_mode, guest_device and usable_bytes say what was made; map_sync is a fact
    (no: fsync needed), not a check, so it never fails a region; dax null (sector, raw) passes too."""
    dd = RegionReport("dd", "nvdimm", 128 << 20, 127926272, None, "/dev/dax0.0", "devdax", "none", None,
                      True, None, True, map_sync=True, payload_offset=127926272)
    sec = RegionReport("sec", "nvdimm", 128 << 20, 133005312, None, "/dev/pmem1s", "sector", "ext4", "/mnt/sec",
                       None, None, True, map_sync=False)
    virt = RegionReport("virt", "virtio-pmem", 128 << 20, 128 << 20, None, "/dev/pmem2", "fsdax", "ext4",
                        "/mnt/virt", True, True, True, map_sync=False)
    g = GuestReport(name="m", regions=[dd, sec, virt])
    g.settle()
    assert g.ok
    data = json.loads(render_json(Report([g])))
    assert data["schema_version"] == 1
    first = data["guests"][0]["regions"][0]
    assert (first["map_sync"], first["persistence_domain"], first["payload_offset"]) == (True, None, 127926272)
    lines = render_text(Report([g])).splitlines()
    assert lines[1].split() == ["region", "model", "size", "usable", "device", "mode", "fs", "mount", "dax",
                                "map_sync", "xip", "data", "persisted"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["dd"][rows["dd"].index("/dev/dax0.0") + 1] == "devdax"
    assert rows["sec"][-5:] == ["-", "no", "-", "yes", "-"]   # dax n/a, map_sync no, xip n/a, data yes
    assert rows["virt"][-5:] == ["yes", "no", "yes", "yes", "-"]
