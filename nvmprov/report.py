"""The report of a run: the one schema (this module), rendered as a text table, JSON, JUnit XML.

The JSON is the dataclasses below, field for field (Report.to_dict): adding a field to SshInfo,
GuestReport or RegionReport adds it to `--json`, the saved report.json and the README's example is
all that is left to update. schema_version rule: a new field keeps the version (readers ignore keys
they do not know); renaming, removing or changing the meaning or type of a field bumps it.
"""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import NvmprovError
from .sizes import human_size
from .textsafe import clean, clean_tree

if TYPE_CHECKING:
    from .agent.converge import RegionState

SCHEMA_VERSION = 1  # bump only for a change that is not additive (see above)

# What each region field must be for the region to count as verified.
REGION_CHECKS = ("dax", "xip_ok", "data_ok", "persisted", "node_ok")


@dataclass
class SshInfo:
    host: str
    port: int
    user: str
    identity_file: str
    known_hosts: str


@dataclass
class RegionReport:
    """One region in the report (`--json` regions[]); the caller fills backing_path and persisted.

    The fields observe() sets depend on how the guest enumerated its devices, which can change from
    one boot to the next (/dev/pmem1 may come back as /dev/pmem2): they always describe the last
    facts read. fs_uuid and namespace_uuid name the same filesystem and namespace on every boot.
    """

    name: str
    model: str
    size_bytes: int
    usable_bytes: int | None
    backing_path: str | None
    guest_device: str | None  # /dev/pmemN as of the last facts read; may change between boots
    namespace_mode: str | None
    filesystem: str | None
    mountpoint: str | None
    dax: bool | None
    xip_ok: bool | None  # None: not checked (filesystem none, not mounted)
    data_ok: bool | None  # None: not checked (filesystem none, read-only)
    persisted: bool | None = None  # None: no power cycle ran
    persisted_reason: str | None = None  # why persisted is False, when it is
    payload_path: str | None = None  # for the power-cycle re-check
    payload_sha256: str | None = None
    marker: str | None = None  # ASCII; starts the payload file, so the host can find it
    marker_offset: int | None = None  # where the caller found the marker in the backing volume
    fs_uuid: str | None = None  # the filesystem's UUID (stable; /etc/fstab mounts by it)
    namespace_uuid: str | None = None  # ndctl's namespace uuid (stable); None for a raw label-less namespace
    numa_node: int | None = None  # the spec's node (nvdimm); None: not checked (virtio-pmem has no node)
    target_node: int | None = None  # the node the guest kernel shows (sysfs regionN/target_node; -1: none)
    node_ok: bool | None = None  # target_node == numa_node; None: not checked (no numa_node, or no sysfs value)
    # Measured in the guest: an mmap with MAP_SHARED_VALIDATE | MAP_SYNC succeeds on a file of the
    # region's filesystem (devdax: on its character device). True: an application may flush from user
    # space (PMDK's is_pmem); False: it must fsync/msync; None: not measured (no filesystem, read-only).
    # A fact, not a check: False does not fail the region.
    map_sync: bool | None = None
    persistence_domain: str | None = None  # the guest kernel's, for the region; None when it shows none
    # Regions proved without a filesystem: where in guest_device the payload (and its marker) starts,
    # inside the reserved tail after usable_bytes; None for a payload file
    payload_offset: int | None = None
    # A namespace of a split region (issue 19) is an entry of its own, named REGION.NAMESPACE, with the
    # spec region it is in and its name (ndctl's, in its label); size_bytes is the namespace's. Both
    # None for an entry that is a whole region.
    region: str | None = None
    namespace: str | None = None

    def observe(self, state: RegionState | None) -> None:
        """Take every enumeration-dependent field from `state`, the region as the guest shows it
        now (None: the guest shows no region at its NFIT handle or PCI address)."""
        self.guest_device = state.guest_device if state else None
        self.usable_bytes = state.usable_bytes if state else None
        self.namespace_mode = state.namespace_mode if state else None
        self.namespace_uuid = state.namespace_uuid if state else None
        self.fs_uuid = state.fs_uuid if state else None
        self.mountpoint = state.mountpoint if state else None
        self.target_node = state.target_node if state else None
        if self.numa_node is not None:
            self.node_ok = None if self.target_node is None else self.target_node == self.numa_node
        self.persistence_domain = state.persistence_domain if state else None
        if self.filesystem != "none":  # `filesystem: none` in the spec: reported as such, whatever blkid says
            self.filesystem = state.filesystem if state else None


@dataclass
class GuestReport:
    name: str
    ok: bool = False
    error: dict[str, str] | None = None  # {"phase": ..., "message": ...}
    accel: str | None = None
    ssh: SshInfo | None = None
    regions: list[Any] = field(default_factory=list)  # RegionReport; attach's foreign regions: dicts
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. "rollback left: ..." after a failed rollback

    def fail(self, phase: str, message: str) -> None:
        self.ok = False
        self.error = {"phase": phase, "message": clean(message)}  # may quote the guest

    def settle(self) -> None:
        """ok = no error and every region check that ran passed (persisted None = not checked)."""
        if self.error is not None:
            self.ok = False
            return
        self.ok = all(_region_ok(_as_dict(r)) for r in self.regions)


def error_message(exc: BaseException) -> str:
    """What a report's error says about an exception: nvmprov's own by their message (they are
    written for people), an interrupt as such, anything else (a bug) with its type."""
    if isinstance(exc, NvmprovError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT"
    return f"unexpected {type(exc).__name__}: {exc}"


def _as_dict(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def _region_ok(region: dict[str, Any]) -> bool:
    for check in REGION_CHECKS:
        value = region.get(check)
        if value is False:
            return False
    return True


def node_reason(region: dict[str, Any]) -> str:
    return (f"region {region.get('name')}: on NUMA node {region.get('target_node')} in the guest "
            f"(sysfs target_node), the spec puts it on node {region.get('numa_node')}")


def failed_checks(region: Any) -> list[str]:
    data = _as_dict(region)
    return [c for c in REGION_CHECKS if data.get(c) is False]


@dataclass
class Report:
    guests: list[GuestReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.guests) and all(g.ok for g in self.guests)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "guests": [_guest_dict(g) for g in self.guests],
        }


def _guest_dict(g: GuestReport) -> dict[str, Any]:
    return dataclasses.asdict(g)  # every field, in declaration order; regions and ssh recursively


def render_json(report: Report) -> str:
    return json.dumps(clean_tree(report.to_dict()), indent=2, sort_keys=False)  # guest text: no escapes


def _fmt_bool(value: Any) -> str:
    if value is None:
        return "-"
    return "yes" if value else "NO"


def _fmt_sync(value: Any) -> str:
    """map_sync is a fact, not a check: "no" (fsync needed), never the "NO" of a failed check."""
    if value is None:
        return "-"
    return "yes" if value else "no"


def render_text(report: Report) -> str:
    """A plain table a person can read; no colour codes so it pastes into tickets and logs."""
    lines: list[str] = []
    headers = ("region", "model", "size", "usable", "device", "mode", "fs", "mount", "dax", "map_sync", "xip", "data",
               "persisted")
    for g in report.guests:
        status = "ok" if g.ok else "FAILED"
        lines.append(f"guest {g.name}: {status}" + (f" (accel {g.accel})" if g.accel else ""))
        if g.error:
            lines.append(f"  error in {g.error['phase']}: {g.error['message']}")
        if g.ssh:
            lines.append(
                f"  ssh: ssh -i {g.ssh.identity_file} -o UserKnownHostsFile={g.ssh.known_hosts} "
                f"-p {g.ssh.port} {g.ssh.user}@{g.ssh.host}   (or: nvmprov ssh {g.name})"
            )
        rows = []
        for r in g.regions:
            d = _as_dict(r)
            rows.append((
                str(d.get("name")), str(d.get("model")), human_size(d.get("size_bytes")),
                human_size(d.get("usable_bytes")), str(d.get("guest_device") or "-"),
                str(d.get("namespace_mode") or "-"), str(d.get("filesystem") or "-"),
                str(d.get("mountpoint") or "-"), _fmt_bool(d.get("dax")), _fmt_sync(d.get("map_sync")),
                _fmt_bool(d.get("xip_ok")),
                _fmt_bool(d.get("data_ok")), _fmt_bool(d.get("persisted")),
            ))
        if rows:
            widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
            for row in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        for r in g.regions:
            d = _as_dict(r)
            if d.get("persisted_reason"):
                lines.append(f"  {d['persisted_reason']}")
            if d.get("node_ok") is False:
                lines.append(f"  {node_reason(d)}")
        if g.timings_s:
            lines.append("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in g.timings_s.items()))
        for note in g.notes:
            lines.append(f"  note: {note}")
    overall = "all guests ok" if report.ok else "FAILED"
    lines.append(overall)
    return clean("\n".join(lines)) + "\n"  # region fields and errors quote the guest


def render_junit(report: Report) -> str:
    """One testsuite per guest, one testcase per region check plus the guest's own error."""
    suites = ET.Element("testsuites", name="nvmprov")
    for g in report.guests:
        cases: list[ET.Element] = []
        if g.error:
            case = ET.Element("testcase", classname=f"nvmprov.{g.name}", name=g.error["phase"])
            fail = ET.SubElement(case, "failure", message=g.error["message"])
            fail.text = g.error["message"]
            cases.append(case)
        for r in g.regions:
            d = _as_dict(r)
            for check in REGION_CHECKS:
                case = ET.Element("testcase", classname=f"nvmprov.{g.name}.{d.get('name')}", name=check)
                value = d.get(check)
                if value is None:
                    ET.SubElement(case, "skipped", message=f"{check} not checked")
                elif not value:
                    fail = ET.SubElement(case, "failure", message=f"{check} failed for region {d.get('name')}")
                    if check == "persisted" and d.get("persisted_reason"):
                        fail.text = str(d["persisted_reason"])
                    if check == "node_ok":
                        fail.text = node_reason(d)
                cases.append(case)
        total_s = sum(g.timings_s.values())
        suite = ET.SubElement(
            suites, "testsuite", name=g.name, tests=str(len(cases)),
            failures=str(sum(1 for c in cases if c.find("failure") is not None)),
            skipped=str(sum(1 for c in cases if c.find("skipped") is not None)),
            time=f"{total_s:.2f}",
        )
        suite.extend(cases)
        if g.notes:  # e.g. "rollback left: ...": where a CI page shows a suite's output
            ET.SubElement(suite, "system-out").text = "\n".join(f"note: {n}" for n in g.notes)
    for el in suites.iter():  # valid XML 1.0 whatever the guest printed (ElementTree does not check)
        el.text = clean(el.text) if el.text else el.text
        for key, value in el.attrib.items():
            el.set(key, clean(value))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
