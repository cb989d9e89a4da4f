"""Commands on guests that exist: start, stop, destroy, list, verify, ssh, console.

Which domains are nvmprov's, and what their metadata holds: managed.py. verify's proof: proof.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import libvirt

from . import boot, domain, identity, inventory, ledger, managed, proof, remote, state, storage, virt
from .errors import GuestError, HostError, UsageError, VirtError
from .managed import connection
from .progress import Progress
from .report import GuestReport, SshInfo
from .spec import check_connect
from .textsafe import clean
from .uris import effective_uri


def start(names: list[str], *, connect: str | None) -> None:
    with connection(connect) as conn:
        hv = identity.of(conn)
        for name in names:
            with state.lock(name, hv=hv):
                m = managed.guest(conn, name, hv)
                if virt.is_active(m.dom):
                    Progress().line(f"{name}: already running")
                    continue
                proof.start_guest(conn, m.dom, m.plan, Progress(prefix=f"{name}: "))


def stop(names: list[str], *, connect: str | None, force: bool, timeout_s: float) -> None:
    with connection(connect) as conn:
        hv = identity.of(conn)
        for name in names:
            with state.lock(name, hv=hv):
                progress = Progress(prefix=f"{name}: ")
                stop_one(managed.guest(conn, name, hv).dom, force=force, timeout_s=timeout_s, progress=progress)


def stop_one(dom: libvirt.virDomain, *, force: bool, timeout_s: float, progress: Progress) -> None:
    if not virt.is_active(dom):
        progress.line("already stopped")
        return
    if force:
        virt.power_off(dom)
        progress.line("powered off")
        return
    with progress.phase("stop", f"ACPI shutdown, hard stop after {timeout_s:.0f}s"):
        virt.acpi_shutdown(dom)
        if not virt.wait_inactive(dom, timeout_s):
            progress.line(f"no shutdown after {timeout_s:.0f}s: cutting the power")
            virt.power_off(dom)


def destroy(names: list[str], *, connect: str | None, purge: ledger.Purge) -> None:
    with connection(connect) as conn:
        hv = identity.of(conn)
        for name in names:
            with state.lock(name, hv=hv):
                destroy_one(conn, hv, name, purge=purge, progress=Progress(prefix=f"{name}: "))


def destroy_one(conn: libvirt.virConnect, hyper: identity.Hypervisor, name: str, *, purge: ledger.Purge,
                progress: Progress, missing_ok: bool = False) -> None:
    """Stop and undefine NAME, delete the volumes nvmprov made for it (backing volumes only with
    --purge, adopted ones only with --purge-adopted). Already destroyed: what nvmprov kept for it.
    HYPER: the hypervisor CONN reaches."""
    hv = hyper.key
    dom = virt.lookup(conn, name)
    if dom is None:
        _destroy_kept(conn, hyper, name, purge=purge, progress=progress, missing_ok=missing_ok)
        return
    md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
    if md is None:
        raise UsageError(f"domain {name!r} was not made by nvmprov; nvmprov does not destroy it")
    files = state.adopt_legacy(name, hyper, dom.UUIDString())
    pool = storage.pool_of(conn, md.pool)
    # nvmprov before the ledger recorded what it made in the domain only, which goes now: move it over
    book = ledger.update(pool, hv, lambda book: ledger.from_metadata(book, hv, name, md.volumes))
    not_ours = [r.volume for r in md.regions if not ledger.may_delete(book.get(r.volume), hv, name, adopted_too=True)]
    virt.power_off(dom)
    virt.undefine(dom)
    progress.line("domain stopped and undefined")
    _delete_owned(pool, hv, name, purge=purge, progress=progress)
    for volume in not_ours:
        if purge.volumes and storage.lookup(pool, volume) is not None:
            progress.line(f"kept volume {volume}: nvmprov did not make it for {name} (it deletes only its own)")
    shutil.rmtree(files.dir, ignore_errors=True)


def _delete_owned(pool: libvirt.virStoragePool, hv: str, name: str, *, purge: ledger.Purge,
                  progress: Progress) -> list[str]:
    """Delete what the ledger holds for NAME: overlays and seeds always, backing volumes with PURGE,
    adopted ones with PURGE_ADOPTED (else handed back: kept and no longer recorded). Returns what
    is kept for NAME."""
    deleted, kept, handed_back = [], [], []
    entries = ledger.read(pool).of(hv, name)
    in_use = _used_elsewhere(pool, name, [e.volume for e in entries if purge.deletes(e)])
    for entry in entries:
        if entry.volume in in_use:
            progress.line(f"kept volume {entry.volume}: still used by domain {', '.join(in_use[entry.volume])}; "
                          f"`nvmprov destroy {name} --purge` deletes it once nothing uses it")
        elif purge.deletes(entry):
            if storage.delete(pool, entry.volume):
                deleted.append(entry.volume)
                what = "adopted backing volume" if entry.adopted else {
                    "backing": "backing volume", "label": "label storage area"}.get(entry.kind, "volume")
                purged = entry.kind in ledger.DATA_KINDS
                progress.line(f"deleted {what} {entry.volume}" + (" (--purge)" if purged else ""))
        elif entry.adopted:
            handed_back.append(entry.volume)
        else:
            kept.append(entry.volume)
    ledger.forget(pool, hv, deleted + handed_back)
    ledger.forget(pool, hv, [e.volume for e in ledger.read(pool).of(hv, name)
                             if e.volume not in kept and storage.lookup(pool, e.volume) is None])
    if kept:
        progress.line(f"kept backing volumes (region data): {', '.join(kept)}; `nvmprov destroy {name} --purge` "
                      "deletes them")
    if handed_back:
        progress.line(f"kept adopted volumes {', '.join(handed_back)} (the spec named them; nvmprov no longer "
                      "records them); `destroy --purge-adopted` would have deleted them")
    return kept


def _used_elsewhere(pool: libvirt.virStoragePool, name: str, volumes: list[str]) -> dict[str, list[str]]:
    """Of VOLUMES (made for NAME), those another domain uses, with its names: a volume nvmprov made
    may since have been given to another guest by hand, and deleting it would pull its disk away."""
    paths = {}
    for volume in volumes:
        vol = storage.lookup(pool, volume)
        if vol is not None:
            paths[vol.path()] = volume
    if not paths:
        return {}
    users = virt.path_users(pool.connect(), paths, exclude=name)
    return {paths[p]: names for p, names in users.items() if names}


def _destroy_kept(conn: libvirt.virConnect, hyper: identity.Hypervisor, name: str, *, purge: ledger.Purge,
                  progress: Progress, missing_ok: bool) -> None:
    """NAME has no domain any more: the volumes nvmprov kept for it (in any pool with a ledger)."""
    found, hv = False, hyper.key
    for pool in _pools_with_ledgers(conn):
        if ledger.read(pool).of(hv, name):
            found = True
            progress.line(f"no domain named {name} on {conn.getURI()}; in pool {pool.name()} nvmprov kept:")
            _delete_owned(pool, hv, name, purge=purge, progress=progress)
    files = state.guest_files(name, hyper, create=False)
    if files.dir.is_dir():
        found = True
        shutil.rmtree(files.dir, ignore_errors=True)
        progress.line(f"removed its local state {files.dir}")
    if not found and not missing_ok:
        raise VirtError(f"no domain named {name!r} on {conn.getURI()}, and nvmprov keeps nothing for it there; "
                        "`nvmprov list` shows the guests")
    if not found:
        progress.line("no such domain; nothing to destroy")


def _pools_with_ledgers(conn: libvirt.virConnect) -> list[libvirt.virStoragePool]:
    try:
        pools = conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
    except libvirt.libvirtError as exc:
        raise HostError(f"listing storage pools: {exc.get_error_message()}") from None
    return [p for p in pools if any(storage.lookup(p, slot) is not None for slot in ledger.SLOTS)]


def list_guests(conn: libvirt.virConnect, hv: identity.Hypervisor | None = None) -> list[dict[str, object]]:
    rows = []
    hv = hv or identity.of(conn)
    for dom in virt.all_domains(conn):
        md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
        if md is None:
            continue
        files = state.current_files(dom.name(), hv)  # listing moves nothing
        rows.append({
            "name": dom.name(),
            "state": "running" if virt.is_active(dom) else "shut off",
            "ssh": dataclasses.asdict(managed.ssh_coordinates(files, md.ssh_port, md.ssh_user)),
            "regions": [{"name": r.name, "model": r.model, "size_bytes": r.size_bytes} for r in md.regions],
        })
    return sorted(rows, key=lambda r: str(r["name"]))


def list_text(*, connect: str | None, fmt: str) -> str:
    with connection(connect) as conn:
        rows = list_guests(conn)
        uri = conn.getURI()
    if fmt == "ansible":
        return inventory.render(rows, uri)
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if not rows:
        return "no nvmprov guests\n"
    out = [f"{'NAME':<24} {'STATE':<9} {'SSH':<22} REGIONS"]
    for r in rows:
        ssh = r["ssh"]
        assert isinstance(ssh, dict)
        regions = ", ".join(f"{x['name']}({x['model']})" for x in r["regions"])  # type: ignore[attr-defined]
        out.append(f"{r['name']:<24} {r['state']:<9} {ssh['user']}@{ssh['host']}:{ssh['port']:<8} {regions}")
    return "\n".join(out) + "\n"


def list_all(current: str | None = None) -> list[dict[str, object]]:
    """The guests of every hypervisor nvmprov keeps state for (state.known_hypervisors), each row
    with the URI it was reached by and its state; a hypervisor that does not answer gives rows
    from its state directories, state "unreachable". The hypervisor of this command's URI first;
    every hypervisor once, whatever URIs reach it."""
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    targets = [("", effective_uri(virt.DEFAULT_URI, current))]
    targets += [(h["key"], h["uri"]) for h in state.known_hypervisors()]
    for key, uri in targets:
        if key in seen:
            continue
        if key and not _replayable(uri):
            # typed once on --connect; a recorded URI that makes libvirt run a program is not replayed
            rows += [{"name": d.name, "uri": uri, "state": "not asked"} for d in _state_dirs(key)]
            continue
        try:
            conn = virt.connect(uri)
        except HostError:
            rows += [{"name": d.name, "uri": uri, "state": "unreachable"} for d in _state_dirs(key)]
            continue
        try:
            reached = identity.of(conn)
            if reached.key not in seen:
                seen.add(reached.key)
                rows += [{**row, "uri": uri} for row in list_guests(conn, reached)]  # sorted by name
        finally:
            conn.close()
        seen.add(key)
    return rows  # hypervisor by hypervisor, the current one first; by name within each


def _replayable(uri: str) -> bool:
    """A URI a spec file could name (no program, socket or key file of its choosing)."""
    try:
        check_connect(uri)
    except ValueError:
        return False
    return True


def _state_dirs(key: str) -> list[Path]:
    if not key:
        return []
    return sorted(p for p in (state.state_root() / "hypervisors" / key / "guests").glob("*") if p.is_dir())


def list_all_text(*, fmt: str, connect: str | None = None) -> str:
    rows = list_all(connect)
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if not rows:
        return "no nvmprov guests\n"
    out = [f"{'NAME':<24} {'STATE':<11} {'SSH':<22} URI"]
    for r in rows:
        ssh = r.get("ssh")
        where = f"{ssh['user']}@{ssh['host']}:{ssh['port']}" if isinstance(ssh, dict) else "-"
        out.append(f"{r['name']:<24} {r['state']:<11} {where:<22} {r['uri']}")
    return "\n".join(out) + "\n"


def verify_one(
    name: str, *, connect: str | None, power_cycle: bool, progress: Progress, report: GuestReport | None = None
) -> GuestReport:
    """Re-run the in-guest checks on one guest in its own connection (fleet.verify runs several),
    filling REPORT (a new one by default); an error other than the guest's passes, REPORT kept."""
    g = report if report is not None else GuestReport(name=name)
    with connection(connect) as conn:
        hv = identity.of(conn)
        with state.lock(name, hv=hv):
            return _verify_locked(conn, hv, name, power_cycle=power_cycle, progress=progress, report=g)


def _verify_locked(conn: libvirt.virConnect, hv: identity.Hypervisor, name: str, *, power_cycle: bool,
                   progress: Progress, report: GuestReport) -> GuestReport:
    m = managed.guest(conn, name, hv)
    managed.check_same_domain(m.files, m.dom)
    run = proof.GuestRun(conn, m.plan, m.files, progress, report, dom=m.dom)
    report.accel = m.plan.accel
    report.ssh = m.ssh
    try:
        if not virt.is_active(m.dom):
            proof.start_guest(conn, m.dom, m.plan, progress)
        proof.prove(run, power_cycle=power_cycle)
    except GuestError as exc:
        report.fail(progress.last_phase("verify"), str(exc))  # ssh, agent, ...: where it failed
    report.timings_s = dict(progress.timings_s)
    report.settle()
    proof.save_report(report, progress, hv)
    return report


def ssh_argv(name: str, *, connect: str | None, command: list[str]) -> list[str]:
    with connection(connect) as conn:
        m = managed.guest(conn, name)
        managed.check_same_domain(m.files, m.dom)
        proxy = remote.ssh_proxy_options(conn.getURI())  # a remote guest: through the hypervisor's SSH
    files = m.files
    if not files.client_key.exists():
        raise HostError(f"no client key for {name} in {files.dir}; it was created on another machine")
    ssh_bin = shutil.which("ssh")
    if ssh_bin is None:
        raise HostError("the OpenSSH client is not installed; apt-get install openssh-client")
    return openssh_argv(ssh_bin, m.ssh, proxy=proxy, command=command)


def openssh_argv(ssh_bin: str, coords: SshInfo, *, proxy: list[str], command: list[str]) -> list[str]:
    """OpenSSH with the guest's own key and only its pinned host key: neither the user's nor the
    system's known_hosts counts (GlobalKnownHostsFile=/dev/null), no agent, no other identity.
    PROXY (a remote guest's ProxyCommand) runs an ssh of its own to the hypervisor, which keeps
    the user's usual config and known_hosts: these options are not passed on to it."""
    return [
        ssh_bin, "-i", coords.identity_file, "-o", f"UserKnownHostsFile={coords.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        *proxy, "-p", str(coords.port), f"{coords.user}@{coords.host}", *command,
    ]


def console_text(name: str, *, connect: str | None) -> str:
    """The guest's serial log, without its escape sequences and control characters (the guest
    wrote it: it must not drive the user's terminal)."""
    with connection(connect) as conn:
        managed.guest(conn, name)
        path = boot.console_log_path(name, conn.getURI())
        hop = remote.hypervisor_for(conn.getURI())
    if hop is not None:  # the log is on the hypervisor
        return clean(hop.read_tail(path, max_bytes=16 * 1024 * 1024))
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return clean(fh.read())
    except OSError as exc:
        raise HostError(f"cannot read the serial log of {name} at {path}: {exc.strerror}") from None
