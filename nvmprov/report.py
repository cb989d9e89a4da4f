"""The report of a run: text table, JSON (schema_version 1, documented in the README), JUnit XML."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from .textsafe import clean, clean_tree

SCHEMA_VERSION = 1

# What each region field must be for the region to count as verified.
REGION_CHECKS = ("dax", "xip_ok", "data_ok", "persisted")


@dataclass
class SshInfo:
    host: str
    port: int
    user: str
    identity_file: str
    known_hosts: str


@dataclass
class GuestReport:
    name: str
    ok: bool = False
    error: dict[str, str] | None = None  # {"phase": ..., "message": ...}
    accel: str | None = None
    ssh: SshInfo | None = None
    regions: list[Any] = field(default_factory=list)  # agent.verify.RegionReport (dataclasses)
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def fail(self, phase: str, message: str) -> None:
        self.ok = False
        self.error = {"phase": phase, "message": clean(message)}  # may quote the guest

    def settle(self) -> None:
        """ok = no error and every region check that ran passed (persisted None = not checked)."""
        if self.error is not None:
            self.ok = False
            return
        self.ok = all(_region_ok(_as_dict(r)) for r in self.regions)


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
    return {
        "name": g.name,
        "ok": g.ok,
        "error": g.error,
        "accel": g.accel,
        "ssh": dataclasses.asdict(g.ssh) if g.ssh else None,
        "regions": [_as_dict(r) for r in g.regions],
        "timings_s": g.timings_s,
    }


def render_json(report: Report) -> str:
    return json.dumps(clean_tree(report.to_dict()), indent=2, sort_keys=False)  # guest text: no escapes


def _fmt_bool(value: Any) -> str:
    if value is None:
        return "-"
    return "yes" if value else "NO"


def _fmt_bytes(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def render_text(report: Report) -> str:
    """A plain table a person can read; no colour codes so it pastes into tickets and logs."""
    lines: list[str] = []
    headers = ("region", "model", "size", "usable", "device", "mode", "fs", "mount", "dax", "xip", "data", "persisted")
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
                str(d.get("name")), str(d.get("model")), _fmt_bytes(d.get("size_bytes")),
                _fmt_bytes(d.get("usable_bytes")), str(d.get("guest_device") or "-"),
                str(d.get("namespace_mode") or "-"), str(d.get("filesystem") or "-"),
                str(d.get("mountpoint") or "-"), _fmt_bool(d.get("dax")), _fmt_bool(d.get("xip_ok")),
                _fmt_bool(d.get("data_ok")), _fmt_bool(d.get("persisted")),
            ))
        if rows:
            widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
            for row in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        for r in g.regions:
            reason = _as_dict(r).get("persisted_reason")
            if reason:
                lines.append(f"  {reason}")
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
                cases.append(case)
        total_s = sum(g.timings_s.values())
        suite = ET.SubElement(
            suites, "testsuite", name=g.name, tests=str(len(cases)),
            failures=str(sum(1 for c in cases if c.find("failure") is not None)),
            skipped=str(sum(1 for c in cases if c.find("skipped") is not None)),
            time=f"{total_s:.2f}",
        )
        suite.extend(cases)
    for el in suites.iter():  # valid XML 1.0 whatever the guest printed (ElementTree does not check)
        el.text = clean(el.text) if el.text else el.text
        for key, value in el.attrib.items():
            el.set(key, clean(value))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
