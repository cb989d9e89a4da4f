"""Prove each region works: DAX active, execute-in-place, data written durably.

Per mounted region: a probe (statx STATX_ATTR_DAX, a program run from the DAX mount with 0
page-cache pages against > 0 for the same program on the root disk), then 16 MiB of random
data behind a unique marker, fsynced, with its sha256. All regions in one request to the phase's
guest program (guest/verify_regions.py; the same python3 start as apply's rounds when the caller
shares it: each start costs seconds under TCG), which ends with a sync. The power-cycle half:
after_power_cycle here for the guest (persisted), the marker in the host backing volume in the caller.

Every region that can be measured gets map_sync: does the kernel grant MAP_SYNC on a file of its
filesystem (devdax: on its character device)? That is what PMDK's libpmem asks to decide is_pmem.

Sector (BTT) and raw namespaces are not DAX by design: dax is None (not applicable), there is no
execute-in-place probe, and the payload file proves the data. devdax, and raw or sector with
`filesystem: none`, have no filesystem to hold a payload file: their payload and marker live in a
reserved tail of the device (the last 2 MiB, outside usable_bytes), written only when the region
is made (`write_tails`) and only re-read by `verify` and the power-cycle proof; no other byte of
the device is touched. A `filesystem: none` fsdax namespace is still handed over unwritten (xip_ok
and data_ok None), and so are read-only regions.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nvmprov.agent.converge import Guest, RegionState, recheck
from nvmprov.agent.facts import parse_fincore, parse_statx
from nvmprov.agent.program import GuestProgram, started
from nvmprov.errors import GuestError
from nvmprov.plan import Plan, RegionPlan
from nvmprov.report import RegionReport
from nvmprov.sizes import RESERVED_TAIL_BYTES

PAYLOAD_BYTES = 16 * 1024 * 1024
PAYLOAD_NAME = ".nvmprov-payload"
XIP_PROGRAM = "/usr/bin/true"
# On the guest's root disk, so that copy of the program lands in the page cache; the probe makes
# a private mkdtemp directory there.
SCRATCH_DIR = "/var/tmp"  # noqa: S108
PROBE_TIMEOUT_S = 120.0  # per region
PAYLOAD_TIMEOUT_S = 300.0  # per region
CHECK_TIMEOUT_S = 300.0
MAP_SYNC_FILE_BYTES = 4096  # the probe file on a filesystem
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
class Tail:
    """The reserved tail of a region without a filesystem: where it is, and the marker to write (None: read)."""

    device: str
    offset: int
    devdax: bool
    marker: bytes | None = None
    length: int = RESERVED_TAIL_BYTES


@dataclass(frozen=True)
class Job:
    """What verify_regions.py does on one region: probe its mount, write a payload, measure MAP_SYNC,
    write or re-read its reserved tail; any of these."""

    region: RegionPlan
    probe_mount: str | None = None
    marker: bytes | None = None
    map_sync_path: str | None = None  # a directory on the region's filesystem, or a devdax device
    map_sync_length: int = MAP_SYNC_FILE_BYTES
    map_sync_device: bool = False  # map_sync_path is the device itself (devdax), not a directory
    tail: Tail | None = None

    def request(self) -> dict[str, Any]:
        payload = None
        if self.marker is not None:
            _check_marker(self.marker)
            payload = {"path": payload_path(self.region), "marker": self.marker.decode(), "size_bytes": PAYLOAD_BYTES}
        map_sync = None
        if self.map_sync_path is not None:
            map_sync = {"path": self.map_sync_path, "device": self.map_sync_device, "length": self.map_sync_length}
        tail = None
        if self.tail is not None:
            if self.tail.marker is not None:
                _check_marker(self.tail.marker)
            tail = {"device": self.tail.device, "offset": self.tail.offset, "length": self.tail.length,
                    "devdax": self.tail.devdax, "marker": self.tail.marker.decode() if self.tail.marker else None}
        return {"name": self.region.name, "probe": self.probe_mount, "payload": payload, "map_sync": map_sync,
                "tail": tail}


def _check_marker(marker: bytes) -> None:
    if not _MARKER_OK.fullmatch(marker):
        raise GuestError(f"marker must be 8-200 ASCII letters, digits or :._- ; got {marker[:40]!r}")


@dataclass(frozen=True)
class TailResult:
    """What the guest read back from a reserved tail (after writing it, when asked)."""

    offset: int
    marker: str | None  # the marker the tail starts with; None: no nvmprov tail there
    sha256: str  # of the whole tail as read
    sha256_written: str | None  # of what was written this run; None: only read
    self_ok: bool  # the body matches the checksum written beside it

    def ok_for(self, guest: str, region: str) -> bool:
        """The tail nvmprov wrote for this region, intact (and what was just written, if it was)."""
        mine = self.marker is not None and self.marker.startswith(f"NVMPROV-MARKER:{guest}:{region}:")
        return mine and self.self_ok and self.sha256_written in (None, self.sha256)


@dataclass(frozen=True)
class JobResult:
    probe: DaxProbe | None
    payload: Payload | None
    map_sync: bool | None = None
    tail: TailResult | None = None


def run_jobs(session: Guest, jobs: list[Job]) -> list[JobResult]:
    """All jobs in one request to guest/verify_regions.py (which ends with a sync), in order."""
    timeout_s = sum((PROBE_TIMEOUT_S if j.probe_mount else 0) + (PAYLOAD_TIMEOUT_S if j.marker or j.tail else 0)
                    for j in jobs)
    requests = [j.request() for j in jobs]
    with started(session) as guest:
        out = guest.ask("verify", max(timeout_s, PROBE_TIMEOUT_S), scratch=SCRATCH_DIR, program=XIP_PROGRAM,
                        regions=requests)
    try:
        regions = out["regions"]
        if [r["name"] for r in regions] != [j.region.name for j in jobs]:
            raise ValueError(f"regions {[r['name'] for r in regions]}, asked for {[j.region.name for j in jobs]}")
        return [JobResult(_probe_of(r), _payload_of(r), _map_sync_of(r), _tail_of(r)) for r in regions]
    except (ValueError, KeyError, TypeError) as e:
        raise GuestError(f"the guest's verifier answered no usable JSON: {e}: {str(out)[:200]!r}") from e


def _map_sync_of(raw: dict[str, Any]) -> bool | None:
    m = raw.get("map_sync")
    return None if not m or m.get("ok") is None else bool(m["ok"])  # None: the probe could not even open it


def _tail_of(raw: dict[str, Any]) -> TailResult | None:
    t = raw.get("tail")
    if not t:
        return None
    return TailResult(int(t["offset"]), t.get("marker"), str(t["sha256"]), t.get("sha256_written"),
                      bool(t["self_ok"]))


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


def sha256_of_files(session: Guest, paths: list[str]) -> dict[str, str | None]:
    """sha256 of each file in the guest, None for one it cannot read; one request for all of them."""
    if not paths:
        return {}
    with started(session) as guest:
        sums = guest.ask("sha256", CHECK_TIMEOUT_S * len(paths), paths=paths).get("sums", {})
    if not isinstance(sums, dict) or set(sums) != set(paths):
        raise GuestError(f"sha256 of {len(paths)} payload files answered {str(sums)[:200]!r}")
    return {p: sums[p] if isinstance(sums[p], str) and len(sums[p]) == 64 else None for p in paths}


def after_power_cycle(
    session: Guest, plan: Plan, regions: list[RegionReport], *, progress: Callable[[str], None] | None = None
) -> None:
    """The guest half of the persistence proof, on the guest booted again after its power was cut.

    Fills persisted (and persisted_reason) of each region: modules and mounts only (agent.recheck);
    a region that would need a namespace or a filesystem made again lost it, and nothing is made;
    every payload is read back and compared with the sha256 written before the cut (a reserved
    tail only read, at the offset this boot's device gives it). One guest program start for all of it.
    """
    with started(session) as guest:
        _after_power_cycle(guest, plan, regions, progress)


def _after_power_cycle(
    session: GuestProgram, plan: Plan, regions: list[RegionReport], progress: Callable[[str], None] | None
) -> None:
    check = recheck(session, plan, progress=progress)
    to_read: list[RegionReport] = []
    tails: list[tuple[RegionReport, Job]] = []
    for r in regions:
        r.observe(check.states.get(r.name))  # this boot's /dev/pmemN, not the first boot's
        reason = check.lost.get(r.name)
        state = check.states.get(r.name)
        if reason is not None:
            r.persisted, r.persisted_reason = False, reason
        elif r.payload_offset is not None and r.payload_sha256 is not None:
            tail = _tail_of_state(plan.region(r.name), state, marker=None) if state else None
            if tail is None:
                r.persisted = False
                r.persisted_reason = f"region {r.name}: not persisted: its device is gone after the power cycle"
            else:
                tails.append((r, Job(plan.region(r.name), tail=tail)))
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
    results = run_jobs(session, [job for _, job in tails]) if tails else []
    for (r, job), result in zip(tails, results, strict=True):
        got = result.tail.sha256 if result.tail else None
        r.persisted = got == r.payload_sha256 and job.tail is not None and job.tail.offset == r.payload_offset
        if not r.persisted:
            where = f"{job.tail.device} at offset {job.tail.offset}" if job.tail else "its device"
            r.persisted_reason = (
                f"region {r.name}: not persisted: the reserved tail of {where} reads back with sha256 {got} "
                f"after the power cycle, {r.payload_sha256} was written at offset {r.payload_offset}"
            )


def sync(session: Guest) -> None:
    """Flush the guest's filesystems (for virtio-pmem the driver turns this into a host flush)."""
    run_jobs(session, [])  # the verifier ends every request with a sync


def verify(
    session: Guest, plan: Plan, states: list[RegionState], *, write_tails: bool = False
) -> list[RegionReport]:
    """Every region's checks; the probes and payloads of all of them in one guest program run.

    write_tails: the regions were made in this run (create, or attach of the region), so the
    reserved tails of regions without a filesystem are written; otherwise they are only re-read.
    """
    by_name = {s.name: s for s in states}
    reports: list[RegionReport] = []
    jobs: list[tuple[RegionReport, Job]] = []
    for region in plan.units:
        state = by_name[region.name]
        # A namespace made in this run is new too (e.g. a region attached while the guest was stopped)
        made = write_tails or any(c.startswith("ndctl create-namespace") for c in state.commands_run)
        report, job = _prepare(plan.name, region, state, write_tails=made)
        reports.append(report)
        if job is not None:
            jobs.append((report, job))
    if not jobs:
        sync(session)  # nothing written; the power-cycle proof still wants a synced guest
        return reports
    for (report, job), result in zip(jobs, run_jobs(session, [j for _, j in jobs]), strict=True):
        _take(plan.name, report, job, result)
    return reports


def _take(guest: str, report: RegionReport, job: Job, result: JobResult) -> None:
    """Fill REPORT from what the guest measured for JOB."""
    if result.probe is not None:
        report.dax = bool(report.dax) and result.probe.statx_dax and not result.probe.statx_dax_root
        report.xip_ok = result.probe.xip_ok
    if result.payload is not None and job.marker is not None:
        report.data_ok = result.payload.ok
        report.payload_path, report.payload_sha256 = result.payload.path, result.payload.sha256
        report.marker = job.marker.decode()
    if result.map_sync is not None:
        report.map_sync = result.map_sync
    if result.tail is not None and job.tail is not None:
        report.data_ok = result.tail.ok_for(guest, report.name)
        report.payload_path, report.payload_offset = job.tail.device, result.tail.offset
        if report.data_ok:  # only an intact tail is evidence the power-cycle proof can re-check
            report.payload_sha256, report.marker = result.tail.sha256, result.tail.marker


def _tail_of_state(region: RegionPlan, state: RegionState, marker: bytes | None) -> Tail | None:
    if not region.reserved_tail or state.guest_device is None or state.tail_offset is None:
        return None
    return Tail(state.guest_device, state.tail_offset, devdax=state.namespace_mode == "devdax", marker=marker)


def _prepare(
    guest: str, region: RegionPlan, state: RegionState, *, write_tails: bool = False
) -> tuple[RegionReport, Job | None]:
    """The region's report as far as the facts decide it, and the guest job for the rest (None: no job)."""
    report = RegionReport(
        name=region.name,
        model=region.model,
        size_bytes=region.namespace_bytes or region.size_bytes,
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
        region=region.namespace_of,
        namespace=region.namespace_name,
    )
    report.observe(state)
    mode = region.effective_mode
    marker = new_marker(guest, region.name)
    if mode == "devdax":
        # The character device is DAX by definition; nothing else shows it (no filesystem, no probe).
        report.dax = state.guest_device is not None and state.device_dax
        tail = _tail_of_state(region, state, marker if write_tails else None)
        if not report.dax or tail is None:
            report.data_ok = False
            return report, None
        length = state.align_bytes or RESERVED_TAIL_BYTES
        return report, Job(region, map_sync_path=state.guest_device, map_sync_length=length, map_sync_device=True,
                           tail=tail)
    # sector (BTT) and raw namespaces are not DAX by design: dax does not apply (None), never False.
    not_dax = mode in ("sector", "raw")
    # An nvdimm region is DAX only through an fsdax namespace (raw and sector modes have no page map;
    # a raw pmem device may still show queue/dax); virtio-pmem has no namespace modes of its own.
    mode_ok = region.model == "virtio-pmem" or state.namespace_mode == "fsdax"
    if region.filesystem == "none":
        if not not_dax:
            report.dax = state.device_dax and mode_ok
            return report, None
        if not region.reserved_tail:  # read-only
            return report, None
        tail = _tail_of_state(region, state, marker if write_tails else None)
        if tail is None:
            report.data_ok = False
            return report, None
        return report, Job(region, tail=tail)
    if state.mountpoint is None:
        report.dax = None if not_dax else False
        report.xip_ok = None if not_dax else False
        report.data_ok = False
        return report, None
    if region.readonly:
        # The probe copies a program onto the mount; a read-only mount cannot take it.
        report.dax = None if not_dax else state.mount_dax and mode_ok
        return report, None
    if not_dax:
        return report, Job(region, marker=marker, map_sync_path=state.mountpoint)
    report.dax = mode_ok and state.mount_dax  # and, from the probe, statx DAX on the mount but not on the root disk
    return report, Job(region, probe_mount=state.mountpoint, marker=marker, map_sync_path=state.mountpoint)
