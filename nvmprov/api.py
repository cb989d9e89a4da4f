"""nvmprov as a Python library: create, verify, destroy, attach and detach guests.

    from nvmprov import api

    report = api.create("examples/guest.yaml", power_cycle=False)   # -> nvmprov.report.Report
    if not report.ok:
        print(report.guests[0].error)          # {"phase": ..., "message": ...}
    api.destroy("demo", purge=True)

What the CLI does, without its printing and its exit codes (twine's model: the CLI is the one place
that turns an exception into a message and a status, cli.exit_status):

- The same exception tree (nvmprov.errors): SpecError and UsageError for bad input (nothing was
  changed), HostError (VirtError, StorageError, LockedError) for the hypervisor side, Interrupted
  for a cancelled run; anything else is a bug. A guest that fails (boot, SSH, a command in it) is
  not raised by create/verify/attach: the returned report carries it (`report.ok` False,
  `report.guests[0].error == {"phase": ..., "message": ...}`), as `nvmprov create --json` does.
- The same report objects (nvmprov.report: Report, GuestReport, RegionReport, SshInfo);
  `nvmprov.report.render_json` / `render_junit` give what `--json` / `--junit` write.
- What a create made is rolled back on any exception that leaves it, KeyboardInterrupt included
  (unless keep_on_failure). The library installs no signal handlers: the CLI turns SIGTERM and
  SIGHUP into Interrupted for itself; a caller that wants the same raises in its own handler, or
  passes a CancelToken and cancels it (from any thread): the run stops at its next stage boundary
  and rolls back.
- Progress goes to PROGRESS, a callable that takes one line of text, or, without one, to the
  `logging` logger "nvmprov" at INFO. Nothing is written to stdout or stderr.
- Importing this module imports neither libvirt nor paramiko; each call imports what it needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from .errors import UsageError
from .progress import CancelToken, Progress
from .report import GuestReport, Report

if TYPE_CHECKING:
    from .attach import DetachResult
    from .spec import GuestSpec
    from .ssh import Session

__all__ = [
    "CancelToken", "ProgressCallback", "Report", "SpecSource", "attach", "console_tail", "create", "destroy",
    "detach", "exists", "load_spec", "open_ssh", "verify",
]

log = logging.getLogger("nvmprov")

ProgressCallback = Callable[[str], None]
SpecSource = str | os.PathLike[str] | Mapping[str, Any]  # a spec file's path, or its content as a mapping
Until = Literal["define", "start", "ssh", "all"]
MAPPING_NAME = "<mapping>"  # how errors name a spec given as a mapping


def _progress(progress: ProgressCallback | Progress | None, cancel: CancelToken | None = None,
              prefix: str = "") -> Progress:
    """A Progress as it is (the CLI's: stderr, spinner), else one that hands its lines to the callback,
    else to logging."""
    if isinstance(progress, Progress):
        if cancel is not None:
            progress.cancel = cancel
        return progress
    return Progress(sink=progress if progress is not None else log.info, cancel=cancel, prefix=prefix)


def load_spec(spec: SpecSource, *, guest: str | None = None) -> GuestSpec:
    """One guest's validated spec: from a file (a fleet file needs GUEST) or from a mapping of the
    same keys as the YAML file (`version: 1` may be left out). SpecError names what is wrong."""
    import yaml

    from . import spec as specmod

    if isinstance(spec, Mapping):
        data = {"version": 1, **dict(spec)}
        loaded = specmod.loads(yaml.safe_dump(data, sort_keys=False), filename=MAPPING_NAME)
    elif isinstance(spec, str | os.PathLike):
        loaded = specmod.load(os.fspath(spec))
    else:
        raise UsageError(f"spec must be a path or a mapping, not {type(spec).__name__}")
    return loaded.guest(guest)


def create(
    spec: SpecSource,
    *,
    guest: str | None = None,
    until: Until = "all",
    power_cycle: bool = True,
    reformat: bool = False,
    keep_on_failure: bool = False,
    connect: str | None = None,
    progress: ProgressCallback | Progress | None = None,
    cancel: CancelToken | None = None,
    report: GuestReport | None = None,
) -> Report:
    """Create one guest, boot it, set its regions up and verify them (`nvmprov create`); when it
    exists with the same spec, re-verify it instead (no power cycle, nothing re-made). A changed spec
    raises UsageError naming the changed fields.

    SPEC: a file path or a mapping (see load_spec); GUEST picks one guest of a fleet file. UNTIL stops
    after "define", "start" or "ssh". POWER_CYCLE: also cut the power and prove the data survived (a
    second boot). CONNECT overrides the spec's libvirt URI. REPORT: a GuestReport to fill as the run
    goes, for a caller that wants it also when create raises: it then holds what the run had learned
    (ssh, accel, notes such as "rollback left: ...") and the phase it failed in, as `--json` prints it.
    """
    from .workflow import CreateOptions
    from .workflow import create as create_guest

    g = load_spec(spec, guest=guest)
    opts = CreateOptions(
        until=until, power_cycle=power_cycle, reformat=reformat, keep_on_failure=keep_on_failure, connect=connect,
        spec_path=None if isinstance(spec, Mapping) else os.path.abspath(os.fspath(spec)),
    )
    if report is None:
        report = GuestReport(name=g.name)
    elif report.name != g.name:
        raise UsageError(f"the report given is guest {report.name}'s, the spec makes {g.name}")
    create_guest(g, opts, _progress(progress, cancel), report=report)
    return Report(guests=[report])


def verify(
    name: str,
    *,
    power_cycle: bool = False,
    connect: str | None = None,
    progress: ProgressCallback | Progress | None = None,
    cancel: CancelToken | None = None,
    report: GuestReport | None = None,
) -> Report:
    """Run the in-guest checks again on a guest nvmprov made (`nvmprov verify`), starting it when it
    is shut off; POWER_CYCLE also cuts its power and proves the data survived. A guest's failure is
    in the report; REPORT as for create."""
    from .guests import verify_one
    from .state import check_name

    filled = verify_one(check_name(name), connect=connect, power_cycle=power_cycle,
                        progress=_progress(progress, cancel), report=report)
    return Report(guests=[filled])


def destroy(
    name: str,
    *,
    purge: bool = False,
    purge_adopted: bool = False,
    missing_ok: bool = False,
    connect: str | None = None,
    progress: ProgressCallback | Progress | None = None,
) -> bool:
    """Stop and undefine a guest nvmprov made and delete its overlay, seed and local state
    (`nvmprov destroy`); PURGE also deletes the backing volumes nvmprov made, i.e. the region data,
    and PURGE_ADOPTED the volumes the spec adopted (no question asked: the caller decided). Nothing
    nvmprov did not make is deleted. A guest already destroyed: what nvmprov kept for it. True when a
    domain was destroyed; a missing guest with nothing kept raises HostError, or returns False with
    MISSING_OK. A domain nvmprov did not make raises UsageError."""
    from . import guests, identity, ledger, managed, state, virt

    check = state.check_name(name)
    prog = _progress(progress, prefix=f"{name}: ")
    with managed.connection(connect) as conn:
        hv = identity.of(conn)
        with state.lock(check, hv=hv):
            existed = virt.lookup(conn, check) is not None
            guests.destroy_one(conn, hv, check, purge=ledger.Purge.asked(purge, purge_adopted), progress=prog,
                               missing_ok=missing_ok)
    return existed


def exists(name: str, *, connect: str | None = None) -> bool:
    """Whether libvirt has a domain of this name (nvmprov's or not)."""
    from . import managed, state, virt

    with managed.connection(connect) as conn:
        return virt.lookup(conn, state.check_name(name)) is not None


def attach(
    domain: str,
    size: int | str,
    *,
    region: str | None = None,
    model: Literal["nvdimm", "virtio-pmem", "cxl"] = "nvdimm",
    label: int | str | None = None,
    mode: Literal["fsdax", "devdax", "sector", "raw"] | None = None,
    align: int | str | None = None,
    filesystem: Literal["ext4", "xfs", "none"] | None = None,
    mount: str | None = None,
    allocation: Literal["full", "sparse"] = "full",
    live: bool = False,
    config: bool = False,
    numa_node: int = 0,
    connect: str | None = None,
    progress: ProgressCallback | Progress | None = None,
) -> Report:
    """Add a region to a libvirt domain (`nvmprov attach`); on a guest nvmprov made, also format,
    mount and verify it. SIZE and LABEL: bytes or a size text ("512MiB"). REGION defaults to the
    first free hpN; MODE and ALIGN: an nvdimm's namespace on a guest nvmprov made; NUMA_NODE: an
    nvdimm's guest node. Neither LIVE nor CONFIG: what lasts and works on this domain. What the
    domain cannot take raises UsageError naming each change it needs; nothing is changed then."""
    from . import attach as attachmod
    from . import managed

    if model == "cxl":
        raise UsageError(attachmod.CXL_NO_HOTPLUG)
    try:
        size_bytes = _bytes(size, "size")
        label_bytes = _bytes(label, "label") if label is not None else None
        align_bytes = _bytes(align, "align") if align is not None else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    request = attachmod.AttachRequest(
        region=region or "", size_bytes=size_bytes, model=model, label_bytes=label_bytes, mode=mode,
        align_bytes=align_bytes, filesystem=filesystem, mount=mount, allocation=allocation, live=live, config=config,
        numa_node=numa_node,
    )
    with managed.connection(connect) as conn:  # an empty REGION: attach picks hpN under the domain's lock
        return attachmod.attach(conn, domain, request, _progress(progress))


def _bytes(value: int | str, what: str) -> int:
    """A size given as bytes (an int: the caller parsed it, as the CLI does) or as a text with a unit."""
    from . import spec as specmod

    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{what} {value} bytes is not a positive size")
        return value
    return specmod.parse_size(value, what=what)


def detach(
    domain: str,
    region: str,
    *,
    live: bool = False,
    config: bool = False,
    purge: bool = False,
    purge_adopted: bool = False,
    connect: str | None = None,
    progress: ProgressCallback | Progress | None = None,
) -> DetachResult:
    """Remove a region from a domain (`nvmprov detach`); PURGE also deletes its backing volume once no
    domain uses it, when nvmprov made it (PURGE_ADOPTED: an adopted one too; no question asked). What
    cannot be done raises UsageError; nothing is changed."""
    from . import attach as attachmod
    from . import ledger, managed

    with managed.connection(connect) as conn:
        return attachmod.detach(conn, domain, region, live=live, config=config,
                                purge=ledger.Purge.asked(purge, purge_adopted), progress=_progress(progress))


def open_ssh(
    name: str,
    *,
    connect: str | None = None,
    timeout_s: float | None = None,
    progress: ProgressCallback | Progress | None = None,
) -> Session:
    """An SSH session (nvmprov.ssh.Session: run(cmd, *args) with each argument shell-quoted) into a
    running guest nvmprov made, with its own key and pinned host key, waiting up to TIMEOUT_S (default:
    the spec's ssh timeout) for its sshd. The caller closes it."""
    from . import identity, managed, proof

    with managed.connection(connect) as conn:
        m = managed.guest(conn, name, identity.of(conn))
        managed.check_same_domain(m.files, m.dom)
        deadline_s = timeout_s if timeout_s is not None else m.plan.ssh_timeout_s
        return proof.open_session(m.dom, m.files, m.ssh, deadline_s, _progress(progress))


def console_tail(name: str, *, connect: str | None = None, max_lines: int = 20) -> str:
    """The last lines of the guest's serial log, cleaned of control characters; '' when there is none
    to read (never raises: this is for error messages). The log outlives a rolled-back create."""
    try:
        from . import boot, remote
        from .textsafe import clean
        from .uris import SYSTEM_URI, effective_uri

        uri = effective_uri(SYSTEM_URI, connect)
        path = boot.console_log_path(name, uri)
        hop = remote.hypervisor_for(uri)
        text = boot.read_tail(path, max_lines=max_lines) if hop is None else boot.tail_lines(hop.read_tail(path),
                                                                                            max_lines)
        return clean(text)
    except Exception:  # noqa: BLE001 - a message's helper: no console is an answer too
        log.debug("no console tail for %s", name, exc_info=True)
        return ""
