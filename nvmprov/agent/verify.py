"""Prove each region works: DAX active, execute-in-place, data written durably.

Per mounted region: a probe (statx STATX_ATTR_DAX, a program run from the DAX mount with 0
page-cache pages against > 0 for the same program on the root disk), then 16 MiB of random
data behind a unique marker, fsynced, with its sha256. All regions in one run of
guest/verify_regions.py (one SSH exec, one python3 start: each costs seconds under TCG), which
ends with a sync. The power-cycle half: after_power_cycle here for the guest (persisted), the
marker in the host backing volume in the caller.

Regions with `filesystem: none` are never written: nvmprov hands the raw fsdax namespace to the
user and cannot tell their data from free space, so xip_ok/data_ok stay None (not checked) and
dax says whether the block device supports DAX. Read-only regions are never written either.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nvmprov.agent.converge import RegionState, Runner, recheck, run_program
from nvmprov.agent.facts import parse_fincore, parse_statx
from nvmprov.errors import GuestError
from nvmprov.plan import Plan, RegionPlan
from nvmprov.report import RegionReport

PAYLOAD_BYTES = 16 * 1024 * 1024
PAYLOAD_NAME = ".nvmprov-payload"
XIP_PROGRAM = "/usr/bin/true"
# On the guest's root disk, so that copy of the program lands in the page cache; the probe makes
# a private mkdtemp directory there.
SCRATCH_DIR = "/var/tmp"  # noqa: S108
PROBE_TIMEOUT_S = 120.0  # per region
PAYLOAD_TIMEOUT_S = 300.0  # per region
CHECK_TIMEOUT_S = 300.0
_MARKER_OK = re.compile(rb"[A-Za-z0-9:._-]{8,200}")


@dataclass(frozen=True)
class DaxProbe:
    exec_rc_dax: int
    exec_rc_root: int
    pages_dax: int | None  # page-cache pages of the copy on the DAX mount
    pages_root: int | None  # ... and of the copy on the root disk
    statx_dax: bool  # STATX_ATTR_DAX on the copy on the DAX mount
    statx_dax_root: bool  # ... on the root-disk copy (must be False)
    error: str | None = None

    @property
    def xip_ok(self) -> bool:
        return (
            self.error is None
            and self.exec_rc_dax == 0
            and self.exec_rc_root == 0
            and self.pages_dax == 0
            and (self.pages_root or 0) > 0
        )


def parse_probe(text: str) -> DaxProbe:
    """The JSON of one probe (a region's "probe" in verify_regions.py's output)."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise GuestError(f"the DAX probe printed no JSON: {e}: {text[:200]!r}") from e
    return probe_from(raw)


def probe_from(raw: dict[str, Any]) -> DaxProbe:
    copies = raw.get("copies", {})
    fincore = raw.get("fincore", {})
    pages = parse_fincore(fincore.get("stdout", "")) if fincore.get("rc") == 0 else {}
    statx = {kind: parse_statx(bytes.fromhex(v["raw"])) for kind, v in raw.get("statx", {}).items() if "raw" in v}
    errors = [f"fincore: {fincore.get('stderr', '').strip()}"] if fincore.get("rc") != 0 else []
    errors += [f"statx {k}: {v['error']}" for k, v in raw.get("statx", {}).items() if "error" in v]
    return DaxProbe(
        exec_rc_dax=int(raw.get("exec", {}).get("dax", -1)),
        exec_rc_root=int(raw.get("exec", {}).get("root", -1)),
        pages_dax=pages.get(copies.get("dax", "")),
        pages_root=pages.get(copies.get("root", "")),
        statx_dax=bool(statx.get("dax") and statx["dax"].dax),
        statx_dax_root=bool(statx.get("root") and statx["root"].dax),
        error="; ".join(errors) or None,
    )


@dataclass(frozen=True)
class Job:
    """What verify_regions.py does on one region: probe its mount, write a payload, or both."""

    region: RegionPlan
    probe_mount: str | None = None
    marker: bytes | None = None

    def request(self) -> dict[str, Any]:
        payload = None
        if self.marker is not None:
            if not _MARKER_OK.fullmatch(self.marker):
                raise GuestError(f"marker must be 8-200 ASCII letters, digits or :._- ; got {self.marker[:40]!r}")
            payload = {"path": payload_path(self.region), "marker": self.marker.decode(), "size_bytes": PAYLOAD_BYTES}
        return {"name": self.region.name, "probe": self.probe_mount, "payload": payload}


@dataclass(frozen=True)
class JobResult:
    probe: DaxProbe | None
    payload: Payload | None


def run_jobs(session: Runner, jobs: list[Job]) -> list[JobResult]:
    """All jobs in one run of guest/verify_regions.py (which ends with a sync), in order."""
    request = {"scratch": SCRATCH_DIR, "program": XIP_PROGRAM, "regions": [j.request() for j in jobs]}
    timeout_s = sum((PROBE_TIMEOUT_S if j.probe_mount else 0) + (PAYLOAD_TIMEOUT_S if j.marker else 0) for j in jobs)
    out = run_program(session, "verify_regions.py", json.dumps(request), timeout_s=max(timeout_s, PROBE_TIMEOUT_S))
    try:
        regions = json.loads(out.stdout)["regions"]
        if [r["name"] for r in regions] != [j.region.name for j in jobs]:
            raise ValueError(f"regions {[r['name'] for r in regions]}, asked for {[j.region.name for j in jobs]}")
        return [JobResult(_probe_of(r), _payload_of(r)) for r in regions]
    except (ValueError, KeyError, TypeError) as e:
        raise GuestError(f"the guest's verifier printed no usable JSON: {e}: {out.stdout[:200]!r}") from e


def _probe_of(raw: dict[str, Any]) -> DaxProbe | None:
    return probe_from(raw["probe"]) if raw.get("probe") else None


def _payload_of(raw: dict[str, Any]) -> Payload | None:
    p = raw.get("payload")
    return Payload(str(p["path"]), str(p["sha256"]), str(p["sha256_read"])) if p else None


def new_marker(guest: str, region: str) -> bytes:
    """Unique per guest, region and run; ASCII so it survives argv and JSON."""
    return f"NVMPROV-MARKER:{guest}:{region}:{uuid.uuid4().hex}".encode()


@dataclass(frozen=True)
class Payload:
    path: str
    sha256: str  # of what was written
    sha256_read: str  # of what was read back after fsync

    @property
    def ok(self) -> bool:
        return self.sha256 == self.sha256_read


def payload_path(region: RegionPlan) -> str:
    if region.mount is None:
        raise GuestError(f"region {region.name} has no mount point to write a payload to")
    return region.mount.rstrip("/") + "/" + PAYLOAD_NAME


def sha256_of_files(session: Runner, paths: list[str]) -> dict[str, str | None]:
    """sha256 of each file in the guest, None for one it cannot read; one exec for all of them.

    Each file is fed on stdin, so sha256sum never prints (or escapes) its name.
    """
    if not paths:
        return {}
    template = "for f in" + " %s" * len(paths) + '; do sha256sum < "$f" || echo unreadable; done'
    timeout_s = CHECK_TIMEOUT_S * len(paths)
    out = session.run(template, *paths, sudo=True, check=False, timeout_s=timeout_s).stdout.splitlines()
    if len(out) != len(paths):
        raise GuestError(f"sha256 of {len(paths)} payload files printed {len(out)} lines: {out[:4]!r}")
    sums = [line.split()[0] if line.split() and len(line.split()[0]) == 64 else None for line in out]
    return dict(zip(paths, sums, strict=True))


def after_power_cycle(
    session: Runner, plan: Plan, regions: list[RegionReport], *, progress: Callable[[str], None] | None = None
) -> None:
    """The guest half of the persistence proof, on the guest booted again after its power was cut.

    Fills persisted (and persisted_reason) of each region: modules and mounts only (agent.recheck);
    a region that would need a namespace or a filesystem made again lost it, and nothing is made;
    every payload is read back and compared with the sha256 written before the cut.
    """
    check = recheck(session, plan, progress=progress)
    to_read: list[RegionReport] = []
    for r in regions:
        r.observe(check.states.get(r.name))  # this boot's /dev/pmemN, not the first boot's
        reason = check.lost.get(r.name)
        if reason is not None:
            r.persisted, r.persisted_reason = False, reason
        elif r.payload_path is not None and r.payload_sha256 is not None:
            to_read.append(r)
    sums = sha256_of_files(session, [r.payload_path for r in to_read if r.payload_path is not None])
    for r in to_read:
        got = sums[r.payload_path or ""]
        r.persisted = got == r.payload_sha256
        if got is None:
            r.persisted_reason = f"region {r.name}: not persisted: {r.payload_path} is gone after the power cycle"
        elif not r.persisted:
            r.persisted_reason = (
                f"region {r.name}: not persisted: {r.payload_path} reads back with sha256 {got} after the "
                f"power cycle, {r.payload_sha256} was written"
            )


def sync(session: Runner) -> None:
    """Flush the guest's filesystems (for virtio-pmem the driver turns this into a host flush)."""
    session.run("sync", sudo=True)


def verify(session: Runner, plan: Plan, states: list[RegionState]) -> list[RegionReport]:
    """Every region's checks; the probes and payloads of all of them in one guest program run."""
    by_name = {s.name: s for s in states}
    reports: list[RegionReport] = []
    jobs: list[tuple[RegionReport, Job]] = []
    for region in plan.regions:
        report, job = _prepare(plan.name, region, by_name[region.name])
        reports.append(report)
        if job is not None:
            jobs.append((report, job))
    if not jobs:
        sync(session)  # nothing written; the power-cycle proof still wants a synced guest
        return reports
    for (report, job), result in zip(jobs, run_jobs(session, [j for _, j in jobs]), strict=True):
        assert result.probe is not None and result.payload is not None and job.marker is not None
        report.dax = report.dax and result.probe.statx_dax and not result.probe.statx_dax_root
        report.xip_ok = result.probe.xip_ok
        report.data_ok = result.payload.ok
        report.payload_path, report.payload_sha256 = result.payload.path, result.payload.sha256
        report.marker = job.marker.decode()
    return reports


def _prepare(guest: str, region: RegionPlan, state: RegionState) -> tuple[RegionReport, Job | None]:
    """The region's report as far as the facts decide it, and the guest job for the rest (None: no job)."""
    report = RegionReport(
        name=region.name,
        model=region.model,
        size_bytes=region.size_bytes,
        usable_bytes=None,
        backing_path=None,
        guest_device=None,
        namespace_mode=None,
        filesystem="none" if region.filesystem == "none" else None,
        mountpoint=None,
        dax=None,
        xip_ok=None,
        data_ok=None,
        numa_node=region.numa_node if region.model == "nvdimm" else None,
    )
    report.observe(state)
    # An nvdimm region is DAX only through an fsdax namespace (raw and sector modes have no page map;
    # a raw pmem device may still show queue/dax); virtio-pmem has no namespace modes of its own.
    mode_ok = region.model != "nvdimm" or state.namespace_mode == "fsdax"
    if region.filesystem == "none":
        report.dax = state.device_dax and mode_ok
        return report, None
    if state.mountpoint is None:
        report.dax = report.xip_ok = report.data_ok = False
        return report, None
    if region.readonly:
        # The probe copies a program onto the mount; a read-only mount cannot take it.
        report.dax = state.mount_dax and mode_ok
        return report, None
    report.dax = mode_ok and state.mount_dax  # and, from the probe, statx DAX on the mount but not on the root disk
    return report, Job(region, probe_mount=state.mountpoint, marker=new_marker(guest, region.name))
