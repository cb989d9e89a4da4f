"""Commands on guests that exist: start, stop, destroy, list, verify, ssh, console.

libvirt is the store of managed guests: a domain is nvmprov's when it carries nvmprov's metadata,
which holds the spec (so the plan can be rebuilt) and every volume nvmprov made for it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import boot, domain, host, state, storage, virt
from .errors import GuestError, HostError, UsageError
from .progress import Progress
from .report import GuestReport, SshInfo

if TYPE_CHECKING:
    import libvirt

    from .plan import Plan


@dataclass
class Managed:
    dom: libvirt.virDomain
    md: domain.Metadata
    plan: Plan


@contextmanager
def _connection(connect: str | None) -> Iterator[libvirt.virConnect]:
    from .workflow import effective_uri

    conn = virt.connect(effective_uri(virt.DEFAULT_URI, connect))
    try:
        yield conn
    finally:
        conn.close()


connection = _connection  # for fleet.py: one connection per worker thread


def managed(conn: libvirt.virConnect, name: str) -> Managed:
    dom = virt.require(conn, state.check_name(name))
    md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
    if md is None:
        raise UsageError(f"domain {name!r} was not made by nvmprov (no nvmprov metadata); nothing done")
    return Managed(dom, md, plan_from_metadata(conn, md))


def plan_from_metadata(conn: libvirt.virConnect, md: domain.Metadata) -> Plan:
    """Rebuild the plan from the spec recorded in the domain: same spec + same host -> same plan."""
    from dataclasses import replace

    from . import image, plan
    from .spec import load_recorded

    if md.spec_json is None:
        raise HostError(f"the nvmprov metadata of this domain holds no spec (made by nvmprov {md.version}?)")
    try:
        spec, broken = load_recorded(json.loads(md.spec_json))
    except ValueError:
        raise HostError("the spec in this domain's nvmprov metadata is not JSON; recreate the guest") from None
    for rule in broken:  # made before the rule: warned about, used as it is, nothing changed
        Progress(prefix=f"{spec.name}: ").line(f"warning: the spec this guest was made with breaks a rule added "
                                               f"since: {rule}; the guest is left as it is")
    pool = storage.pool_of(conn, spec.pool)
    facts = host.facts(conn, storage.pool_path(pool))
    if spec.image == "builtin":
        facts = replace(facts, builtin_volumes=image.builtin_volume_names())
    return plan.build(spec, facts)


def start(names: list[str], *, connect: str | None) -> None:
    from .workflow import start_guest

    with _connection(connect) as conn:
        for name in names:
            with state.lock(name):
                m = managed(conn, name)
                if virt.is_active(m.dom):
                    Progress().line(f"{name}: already running")
                    continue
                start_guest(conn, m.dom, m.plan, Progress(prefix=f"{name}: "))


def stop(names: list[str], *, connect: str | None, force: bool, timeout_s: float) -> None:
    with _connection(connect) as conn:
        for name in names:
            with state.lock(name):
                progress = Progress(prefix=f"{name}: ")
                stop_one(managed(conn, name).dom, force=force, timeout_s=timeout_s, progress=progress)


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


def destroy(names: list[str], *, connect: str | None, purge: bool) -> None:
    with _connection(connect) as conn:
        for name in names:
            with state.lock(name):
                destroy_one(conn, name, purge=purge, progress=Progress(prefix=f"{name}: "))


def destroy_one(conn: libvirt.virConnect, name: str, *, purge: bool, progress: Progress) -> None:
    dom = virt.require(conn, name)
    md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
    if md is None:
        raise UsageError(f"domain {name!r} was not made by nvmprov; nvmprov does not destroy it")
    virt.power_off(dom)
    virt.undefine(dom)
    progress.line("domain stopped and undefined")
    pool = storage.pool_of(conn, md.pool)
    backing = [r.volume for r in md.regions]  # region data, whether this tool made it or reused it
    for vol_name, kind in md.volumes:
        if kind != "backing" and storage.delete(pool, vol_name):
            progress.line(f"deleted volume {vol_name}")
    kept = []
    for vol_name in backing:
        if not purge:
            kept.append(vol_name)
        elif storage.delete(pool, vol_name):
            progress.line(f"deleted backing volume {vol_name} (--purge)")
    if kept:
        progress.line(f"kept backing volumes (region data): {', '.join(kept)}; `destroy --purge` deletes them")
    files = state.guest_files(name, create=False)
    shutil.rmtree(files.dir, ignore_errors=True)


def list_guests(conn: libvirt.virConnect) -> list[dict[str, object]]:
    rows = []
    for dom in virt.all_domains(conn):
        md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
        if md is None:
            continue
        files = state.guest_files(dom.name(), create=False)
        rows.append({
            "name": dom.name(),
            "state": "running" if virt.is_active(dom) else "shut off",
            "ssh": {"host": "127.0.0.1", "port": md.ssh_port, "user": md.ssh_user,
                    "identity_file": str(files.client_key), "known_hosts": str(files.known_hosts)},
            "regions": [{"name": r.name, "model": r.model, "size_bytes": r.size_bytes} for r in md.regions],
        })
    return sorted(rows, key=lambda r: str(r["name"]))


def list_text(*, connect: str | None, fmt: str) -> str:
    with _connection(connect) as conn:
        rows = list_guests(conn)
        uri = conn.getURI()
    if fmt == "ansible":
        from . import inventory

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
        out.append(f"{r['name']:<24} {r['state']:<9} {ssh['user']}@127.0.0.1:{ssh['port']:<8} {regions}")
    return "\n".join(out) + "\n"


def verify_one(
    name: str, *, connect: str | None, power_cycle: bool, progress: Progress, report: GuestReport | None = None
) -> GuestReport:
    """Re-run the in-guest checks on one guest in its own connection (fleet.verify runs several),
    filling REPORT (a new one by default); an error other than the guest's passes, REPORT kept."""
    from . import agent
    from .workflow import open_session, power_cycle_proof, save_report, start_guest

    g = report if report is not None else GuestReport(name=name)
    with _connection(connect) as conn, state.lock(name):
        m = managed(conn, name)
        files = state.guest_files(name)
        g.accel = m.plan.accel
        g.ssh = SshInfo("127.0.0.1", m.md.ssh_port, m.md.ssh_user, str(files.client_key), str(files.known_hosts))
        try:
            if not virt.is_active(m.dom):
                start_guest(conn, m.dom, m.plan, progress)
            with progress.phase("ssh"):
                session = open_session(m.dom, m.plan, files, m.md.ssh_port, m.plan.ssh_timeout_s, progress)
            try:
                with progress.phase("agent"):
                    states = agent.apply(session, m.plan)
                with progress.phase("verify"):
                    g.regions = agent.verify(session, m.plan, states)
            finally:
                session.close()
            pool_dir = storage.pool_path(storage.pool_of(conn, m.plan.pool))
            for r in g.regions:
                r.backing_path = f"{pool_dir}/{m.plan.region(r.name).volume}"
            if power_cycle:
                with progress.phase("power-cycle"):
                    power_cycle_proof(conn, m.dom, m.plan, files, m.md.ssh_port, g.regions, progress)
        except GuestError as exc:
            g.fail(progress.last_phase("verify"), str(exc))  # ssh, agent, ...: where it failed
        g.timings_s = dict(progress.timings_s)
        g.settle()
        save_report(g, progress)
    return g


def ssh_argv(name: str, *, connect: str | None, command: list[str]) -> list[str]:
    from . import remote

    with _connection(connect) as conn:
        m = managed(conn, name)
        proxy = remote.ssh_proxy_options(conn.getURI())  # a remote guest: through the hypervisor's SSH
    files = state.guest_files(name, create=False)
    if not files.client_key.exists():
        raise HostError(f"no client key for {name} in {files.dir}; it was created on another machine")
    ssh_bin = shutil.which("ssh")
    if ssh_bin is None:
        raise HostError("the OpenSSH client is not installed; apt-get install openssh-client")
    return openssh_argv(ssh_bin, files, port=m.md.ssh_port, user=m.md.ssh_user, proxy=proxy, command=command)


def openssh_argv(
    ssh_bin: str, files: state.GuestFiles, *, port: int, user: str, proxy: list[str], command: list[str]
) -> list[str]:
    """OpenSSH with the guest's own key and only its pinned host key: neither the user's nor the
    system's known_hosts counts (GlobalKnownHostsFile=/dev/null), no agent, no other identity.
    PROXY (a remote guest's ProxyCommand) runs an ssh of its own to the hypervisor, which keeps
    the user's usual config and known_hosts: these options are not passed on to it."""
    return [
        ssh_bin, "-i", str(files.client_key), "-o", f"UserKnownHostsFile={files.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        *proxy, "-p", str(port), f"{user}@127.0.0.1", *command,
    ]


def console_text(name: str, *, connect: str | None) -> str:
    """The guest's serial log, without its escape sequences and control characters (the guest
    wrote it: it must not drive the user's terminal)."""
    from . import remote
    from .textsafe import clean

    with _connection(connect) as conn:
        managed(conn, name)
        path = boot.console_log_path(name, conn.getURI())
        hop = remote.hypervisor_for(conn.getURI())
    if hop is not None:  # the log is on the hypervisor
        return clean(hop.read_tail(path, max_bytes=16 * 1024 * 1024))
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return clean(fh.read())
    except OSError as exc:
        raise HostError(f"cannot read the serial log of {name} at {path}: {exc.strerror}") from None
