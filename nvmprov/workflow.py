"""`nvmprov create` and the guest life cycle: one straight line of stages, side effects at the edges.

spec -> host facts -> plan -> define (metadata first) -> volumes (each recorded) -> start -> SSH
-> agent.apply -> agent.verify -> power-cycle proof -> report. Any failure or signal rolls back
exactly what this run made (unless --keep-on-failure).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from . import boot, domain, host, identity, image, image_seed, ledger, remote, seed, ssh, state, storage, virt
from . import plan as planmod
from .errors import GuestError, HostError, SpecError, UsageError, VirtError
from .progress import Progress
from .report import GuestReport, SshInfo, error_message
from .rollback import Rollback
from .uris import DEFAULT_POOL_DIR, effective_uri, pool_dir_for  # here too: callers import them from workflow

if TYPE_CHECKING:
    import libvirt

    from .plan import Plan
    from .spec import GuestSpec

Until = Literal["define", "start", "ssh", "all"]
POWER_OFF_TIMEOUT_S = 30
HOSTFWD_ERRORS = ("host forwarding rule", "Could not set up host forwarding")
# What `network: {outbound: true}` opens (QEMU user networking with restrict=off): said on every create.
OUTBOUND_NOTICE = (
    "network.outbound: true: the guest can open connections to any address this host can reach, "
    "including this host's own loopback services (127.0.0.1 here is 10.0.2.2 in the guest: databases, "
    "admin ports, libvirt's TCP socket if any); set outbound: false unless the guest needs a package mirror"
)


@dataclass(frozen=True)
class CreateOptions:
    until: Until = "all"
    power_cycle: bool = True
    reformat: bool = False
    keep_on_failure: bool = False
    connect: str | None = None  # --connect overrides the spec
    spec_path: str | None = None


# ---------------------------------------------------------------------------------------------
# create


def create(
    spec: GuestSpec, opts: CreateOptions, progress: Progress, *, report: GuestReport | None = None
) -> GuestReport:
    """Create (or, when it exists with the same spec, re-verify) one guest, filling REPORT (a new one
    by default) as it goes. Never raises for guest failures: the report carries the error. Anything
    else (spec, host, lock, a signal, a bug) passes, after the report was marked failed and saved:
    the caller prints that same report, with whatever the run had filled in (ssh, accel, notes)."""
    report = report if report is not None else GuestReport(name=spec.name)
    state.check_name(spec.name)
    conn = virt.connect(effective_uri(spec.connect, opts.connect))
    try:
        # The guest is NAME on this hypervisor (not on this URI): its lock, files and volumes go by that.
        hv = identity.of(conn)
        with state.lock(spec.name, hv=hv):
            try:
                with state.pool_lock(hv.key, spec.pool):  # held against prune, shared with other creates
                    _create_locked(conn, hv, spec, opts, progress, report)
            except (UsageError, SpecError):
                raise  # bad input changed nothing, the last report included
            except BaseException as exc:
                report.fail(progress.last_phase("create"), error_message(exc))
                report.timings_s = dict(progress.timings_s)
                save_report(report, progress, hv)
                raise
            finally:
                report.timings_s = dict(progress.timings_s)
            save_report(report, progress, hv)
    finally:
        conn.close()
    return report


def save_report(report: GuestReport, progress: Progress, hv: identity.Hypervisor) -> None:
    """The guest's last report, as `--json` prints it, in its state directory (0600). Only for a
    guest that is there: a rolled-back create removed the directory and must not bring it back."""
    from .report import Report, render_json

    files = state.guest_files(report.name, hv, create=False)
    if not files.dir.is_dir():
        return
    try:
        state.write_private(files.report, render_json(Report(guests=[report])) + "\n")
    except OSError as exc:
        progress.line(f"could not save the report to {files.report}: {exc.strerror}")


def _create_locked(
    conn: libvirt.virConnect, hv: identity.Hypervisor, spec: GuestSpec, opts: CreateOptions, progress: Progress,
    report: GuestReport,
) -> None:
    """HV: the hypervisor CONN reaches, asked once per create (a round trip over qemu+ssh)."""
    with progress.phase("host"):
        # The plan first: a host that cannot run the guest (accel: kvm without vmx/svm, ...) fails
        # here, before the pool is made or the image built (minutes). It needs no pool, only names.
        pool_dir = pool_dir_for(spec.pool, conn.getURI())
        vet_image(spec, opts)  # again: a library caller may not have (cli.cmd_create did, for the fleet)
        facts = host.facts(conn, pool_dir)
        if spec.image == "builtin":
            facts = replace(facts, builtin_volumes=image.builtin_volume_names())
        the_plan = planmod.build(spec, facts)
        pool = storage.ensure_pool(conn, spec.pool, pool_dir)
        if spec.image == "builtin" and not image.is_built(pool):
            progress.line("built-in guest image missing: building it (about 2-4 minutes)")
            image.build(conn, spec.pool, progress=progress.line)
        for volume in ledger.migrate(conn, pool, hv.key):  # guests made before the ledger (pool held shared)
            progress.line(f"ownership ledger: recorded {volume} as made by nvmprov (its domain's metadata says so)")
    report.accel = the_plan.accel
    if the_plan.accel_notice:
        progress.line(the_plan.accel_notice)
    if the_plan.network_outbound:
        progress.line(OUTBOUND_NOTICE)
    for region in the_plan.regions:
        for note in region.notes:
            progress.line(f"region {region.name}: {note}")

    existing = virt.lookup(conn, spec.name)
    if existing is not None and domain.parse_metadata(virt.xml_desc(existing, inactive=True)) is not None:
        state.adopt_legacy(spec.name, hv, existing.UUIDString())  # files kept under the old layout
    files = state.guest_files(spec.name, hv)
    if existing is not None:
        md = domain.parse_metadata(virt.xml_desc(existing, inactive=True))
        if md is not None and not md.complete:
            # A run that was killed (SIGKILL, power loss) left this: its metadata names what it made.
            progress.line(f"guest {spec.name}: an earlier create did not finish; removing what it left")
            remove_leftovers(conn, hv.key, existing, md, progress)
        else:
            try:
                _reverify_existing(conn, existing, spec, the_plan, files, opts, progress, report)
            except GuestError as exc:  # like a new guest: the report carries it (nothing to roll back)
                report.fail(progress.last_phase("create"), str(exc))
            return

    undo = Rollback(progress)
    try:
        owner = _Owner(pool, hv.key, spec.name, facts.qemu_ids)
        build = _build_guest(conn, owner, the_plan, spec, files, opts, progress, undo, report)
        if opts.until not in ("define", "start"):
            _prove(conn, build.dom, the_plan, files, opts, progress, report, power_cycle=opts.power_cycle, made=True)
        build.md = replace(build.md, complete=True)
        _record(build.dom, build.md)
        undo.commit()
    except BaseException as exc:
        if opts.keep_on_failure:
            progress.line("keeping what was made (--keep-on-failure); `nvmprov destroy --purge` removes it")
        else:
            problems = undo.run()
            if problems:
                report.notes.append("rollback left: " + "; ".join(problems))
        if isinstance(exc, GuestError):
            report.fail(progress.last_phase("create"), str(exc))
            return
        raise
    report.settle()


def vet_image(spec: GuestSpec, opts: CreateOptions) -> None:
    """A user image is untrusted input (nvmprov.diskimage): one that is there but is no disk image
    (a link to a host file, a FIFO, a device, a bad backing chain) is refused before anything is
    made (exit 2). A path with nothing at all there stays what it was, a host condition: the
    overlay step fails on it (exit 3) and the run is rolled back (docs/reliability.md)."""
    if spec.image == "builtin" or not os.path.lexists(spec.image):
        return
    from . import diskimage

    try:
        diskimage.vet(spec.image)
    except diskimage.ImageRefused as e:
        raise SpecError(f"guest {spec.name}: {e}", file=opts.spec_path or "<spec>") from None


def remove_leftovers(conn: libvirt.virConnect, hv: str, dom: libvirt.virDomain, md: domain.Metadata,
                     progress: Progress) -> None:
    """Undo an unfinished create: every volume its metadata says it made, then the domain (HV: the
    key of the hypervisor CONN reaches)."""
    virt.power_off(dom)
    pool = storage.pool_of(conn, md.pool)
    for name, _kind in reversed(md.volumes):
        if storage.delete(pool, name):
            progress.line(f"removed leftover volume {name}")
    ledger.forget(pool, hv, [name for name, _kind in md.volumes])
    virt.undefine(dom)
    progress.line(f"removed leftover domain {dom.name()}")


@dataclass
class _Build:
    """What a create run has made so far: the domain and the metadata recorded on it."""

    dom: libvirt.virDomain
    md: domain.Metadata


def _build_guest(
    conn: libvirt.virConnect,
    owner: _Owner,
    the_plan: Plan,
    spec: GuestSpec,
    files: state.GuestFiles,
    opts: CreateOptions,
    progress: Progress,
    undo: Rollback,
    report: GuestReport,
) -> _Build:
    pool = owner.pool
    pool_dir = storage.pool_path(pool)
    # Registered first so it runs last: a failed create leaves no keys or spec copy behind either.
    undo.add(f"state files {files.dir}", lambda: shutil.rmtree(files.dir, ignore_errors=True))
    with progress.phase("keys"):
        client, host_key = _make_keys(files)
        spec_json = spec.model_dump_json(by_alias=True)
        state.write_private(files.spec_json, spec_json)

    with progress.phase("define"):
        _check_backing_volumes(conn, owner, the_plan)
        md = domain.Metadata.from_plan(the_plan, ssh_port=0, spec_path=opts.spec_path, spec_json=spec_json)
        dom, md = _define_with_port(conn, the_plan, md, pool_dir)
        undo.add(f"domain {the_plan.name}", lambda: _undefine_quietly(conn, the_plan.name))
        state.record_domain(files, dom.UUIDString())  # a domain replaced under this name is told apart
        report.ssh = _ssh_info(the_plan, md.ssh_port, files)
    build = _Build(dom, md)

    with progress.phase("volumes"):
        build.md = _make_volumes(owner, build.dom, the_plan, build.md, (client, host_key), progress, undo)
    if opts.until == "define":
        return build

    with progress.phase("start", _prealloc_hint(the_plan)):
        build.dom, build.md = _start_with_port_retry(conn, build, the_plan, pool_dir, report, files)
        undo.add(f"running guest {the_plan.name}", lambda: _power_off_quietly(conn, the_plan.name))
        _hotplug_virtio_pmem(build.dom, the_plan, pool_dir)
    return build


def _power_off_quietly(conn: libvirt.virConnect, name: str) -> None:
    dom = virt.lookup(conn, name)
    if dom is not None:
        virt.power_off(dom)


def _prealloc_hint(the_plan: Plan) -> str:
    big = sum(r.backing_bytes for r in the_plan.nvdimm_regions if not r.host_pmem)
    if big >= 2 * 1024**3:
        return (
            f"libvirt preallocates {big / 1024**3:.0f} GiB of nvdimm backing (QEMU prealloc); "
            "under TCG this takes several seconds per GiB"
        )
    return ""


def _make_keys(files: state.GuestFiles) -> tuple[seed.KeyPair, seed.KeyPair]:
    client = seed.generate_keypair()
    host_key = seed.generate_keypair()
    state.write_private(files.client_key, client.private_openssh)
    state.write_private(files.client_key_pub, client.public_openssh + "\n")
    state.write_private(files.host_key_pub, host_key.public_openssh + "\n")
    return client, host_key


def _ssh_info(the_plan: Plan, port: int, files: state.GuestFiles) -> SshInfo:
    return SshInfo(
        host="127.0.0.1", port=port, user=the_plan.ssh_user,
        identity_file=str(files.client_key), known_hosts=str(files.known_hosts),
    )


def _write_known_hosts(files: state.GuestFiles, port: int) -> None:
    key = files.host_key_pub.read_text().split()
    state.write_private(files.known_hosts, f"[127.0.0.1]:{port} {key[0]} {key[1]}\n")


def _check_backing_volumes(conn: libvirt.virConnect, owner: _Owner, the_plan: Plan) -> None:
    """Refuse before changing anything when a backing volume is in the way (not made by nvmprov for
    this guest, not adopted) or in another domain's hands. _make_volumes decides again, exclusively."""
    pool, hv = owner.pool, owner.hv
    pool_dir = storage.pool_path(pool)
    book = ledger.read(pool)
    for region in the_plan.regions:
        for volume in (region.volume, region.lsa_volume):
            if volume is None:
                continue
            path = f"{pool_dir}/{volume}"
            users = virt.path_users(conn, [path], exclude=the_plan.name)[path]
            if users:
                raise HostError(
                    f"volume {volume} of region {region.name} is used by domain(s) "
                    f"{', '.join(users)}; give the region another name or detach it there first"
                )
            if region.adopted:
                _check_adoptable(pool, book, owner, region)
            elif storage.lookup(pool, volume) is not None and not ledger.may_delete(book.get(volume), hv,
                                                                                      the_plan.name):
                raise HostError(ledger.in_the_way(pool, volume, f"guest {the_plan.name}", region.name,
                                                  guest=the_plan.name))


def _check_adoptable(pool: libvirt.virStoragePool, book: ledger.Ledger, owner: _Owner,
                     region: planmod.RegionPlan) -> None:
    """An adopted `volume:` must exist: nvmprov makes no volume under a name the spec chose."""
    if storage.lookup(pool, region.volume) is None:
        raise HostError(
            f"volume {region.volume} named by `volume:` under region {region.name} of guest {owner.name} does not "
            f"exist in storage pool {pool.name()!r} ({storage.pool_path(pool)}); an adopted volume is made "
            "elsewhere: create it first, or drop `volume:` and nvmprov makes and owns one"
        )
    _refuse_if_held_by_another(book, owner, region)


def _refuse_if_held_by_another(book: ledger.Ledger, owner: _Owner, region: planmod.RegionPlan) -> None:
    entry = book.get(region.volume)
    if entry is not None and not entry.belongs_to(owner.hv, owner.name):
        raise HostError(
            f"volume {region.volume} named by `volume:` under region {region.name} of guest {owner.name} is "
            f"recorded as guest {entry.guest}'s (hypervisor {entry.hypervisor}) in the ownership ledger of storage "
            f"pool {owner.pool.name()!r}; one volume has one owner: name another volume, or let {entry.guest} give "
            f"it up first (`nvmprov destroy {entry.guest}` hands an adopted volume back, `--purge` deletes a made one)"
        )


def _used_ports(conn: libvirt.virConnect) -> set[int]:
    ports = set()
    for dom in virt.all_domains(conn):
        md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
        if md is not None and md.ssh_port:
            ports.add(md.ssh_port)
    return ports


def _render(the_plan: Plan, md: domain.Metadata, pool_dir: str, dom_uuid: str, uri: str) -> str:
    ctx = domain.RenderContext(
        uuid=dom_uuid, ssh_port=md.ssh_port, pool_dir=pool_dir,
        console_log=boot.console_log_path(the_plan.name, uri),
    )
    return domain.render(the_plan, ctx, metadata=md)


def _define_with_port(
    conn: libvirt.virConnect,
    the_plan: Plan,
    md: domain.Metadata,
    pool_dir: str,
    *,
    avoid: frozenset[int] = frozenset(),
    dom_uuid: str | None = None,
) -> tuple[libvirt.virDomain, domain.Metadata]:
    # The host lock spans choice and define, so a concurrent create sees the port in our metadata.
    # A random UUID: a fixed one would let define silently replace another domain.
    with state.host_lock("ssh-ports"):
        md = replace(md, ssh_port=boot.free_port(_used_ports(conn) | set(avoid)))
        dom = virt.define(conn, _render(the_plan, md, pool_dir, dom_uuid or str(uuid.uuid4()), conn.getURI()))
    return dom, md


def _record(dom: libvirt.virDomain, md: domain.Metadata) -> None:
    virt.set_metadata(dom, domain.metadata_xml(md), key=domain.METADATA_PREFIX, uri=domain.METADATA_NS)


@dataclass(frozen=True)
class _Owner:
    """Whose volumes a create makes: guest NAME of hypervisor HV (identity.py), in POOL."""

    pool: libvirt.virStoragePool
    hv: str
    name: str
    qemu_ids: tuple[int, int] | None = None   # HostFacts.qemu_ids: owner of CXL's files


def _make_volumes(
    owner: _Owner,
    dom: libvirt.virDomain,
    the_plan: Plan,
    md: domain.Metadata,
    keys: tuple[seed.KeyPair, seed.KeyPair],
    progress: Progress,
    undo: Rollback,
) -> domain.Metadata:
    """Each volume this run creates is recorded in the ownership ledger and the domain's metadata
    right after it exists, so a killed run leaves nothing untraceable. Creation is exclusive: a
    volume is this run's only when this run's createXML made it."""
    pool = owner.pool
    client, host_key = keys

    def made(name: str, kind: str) -> None:
        nonlocal md
        undo.add(f"volume {name}", lambda: _delete_volume(owner, name))
        ledger.record(pool, ledger.Entry(name, owner.name, owner.hv, kind))
        md = md.with_volume(name, kind)
        _record(dom, md)

    for region in the_plan.regions:
        # CXL's files are named only on QEMU's command line: libvirt does not chown them, so they are
        # made owned by QEMU's user (docs/performance.md, the CXL spike)
        qemu_owned = owner.qemu_ids if region.model == "cxl" else None
        if region.lsa_volume is not None and storage.make_backing(
                pool, region.lsa_volume, planmod.CXL_LSA_BYTES, owner=qemu_owned) is not None:
            made(region.lsa_volume, "label")
            progress.line(f"region {region.name}: label storage area {region.lsa_volume}")
        elif region.lsa_volume is not None:
            how = _use_existing(owner, replace(region, volume=region.lsa_volume, backing_bytes=planmod.CXL_LSA_BYTES,
                                               adopted=False), undo)
            progress.line(f"region {region.name}: {how} label storage area {region.lsa_volume}")
        made_now = not region.adopted and storage.make_backing(
            pool, region.volume, region.backing_bytes, allocation=region.allocation, owner=qemu_owned) is not None
        if made_now:
            made(region.volume, "backing")
            progress.line(f"region {region.name}: backing volume {region.volume} ({region.backing_bytes} bytes)")
        else:
            how = _use_existing(owner, region, undo)
            progress.line(f"region {region.name}: {how} backing volume {region.volume} (same size)")

    if the_plan.base_volume is not None:
        storage.create_overlay(pool, the_plan.overlay_volume, the_plan.base_volume, the_plan.disk_bytes)
        made(the_plan.overlay_volume, "overlay")
    elif the_plan.image != "builtin":
        storage.create_overlay_for_path(pool, the_plan.overlay_volume, the_plan.image, the_plan.disk_bytes)
        made(the_plan.overlay_volume, "overlay")

    cfg = seed.SeedConfig(
        hostname=the_plan.name, user=the_plan.ssh_user, client_public_key=client.public_openssh,
        host_private_key=host_key.private_openssh.decode(), host_public_key=host_key.public_openssh,
        outbound=the_plan.network_outbound, instance_id=f"{the_plan.name}-{uuid.uuid4().hex[:12]}",
        mac=the_plan.mac,
    )
    docs = seed.user_data(cfg), seed.meta_data(cfg), seed.network_config(cfg)
    # The built-in image applies the seed in final form, checked here against what it implements.
    builtin = the_plan.base_volume is not None
    final = image_seed.final_files(*docs, static=the_plan.network_mode == "user") if builtin else None
    iso = seed.build_iso(*docs, final=final)
    storage.upload(pool, the_plan.seed_volume, iso)
    made(the_plan.seed_volume, "seed")
    return md


def _use_existing(owner: _Owner, region: planmod.RegionPlan, undo: Rollback) -> str:
    """A volume of the region's name exists: use it when nvmprov made it for this guest (data kept
    by `destroy`), or when the spec names it (`volume:`, adopted); refuse anything else."""
    pool = owner.pool
    book = ledger.read(pool)
    entry = book.get(region.volume)
    if region.adopted:
        _check_adoptable(pool, book, owner, region)
    ours = ledger.may_delete(entry, owner.hv, owner.name)
    if not ours and not region.adopted:
        raise HostError(ledger.in_the_way(pool, region.volume, f"guest {owner.name}", region.name, guest=owner.name))
    storage.check_reusable(pool, storage.volume(pool, region.volume), region.backing_bytes)
    if ours:
        return "reusing its own"
    if entry is None or not entry.belongs_to(owner.hv, owner.name):
        def adopt(now: ledger.Ledger) -> ledger.Ledger:  # checked again under the ledger's lock
            _refuse_if_held_by_another(now, owner, region)
            return now.with_entry(ledger.Entry(region.volume, owner.name, owner.hv, "backing", adopted=True))

        ledger.update(pool, owner.hv, adopt)
        undo.add(f"adoption of volume {region.volume} (the volume is kept)",
                 lambda: _unadopt(owner, region.volume, entry))
    return "adopting"


def _unadopt(owner: _Owner, volume: str, before: ledger.Entry | None) -> None:
    if before is None:
        ledger.forget(owner.pool, owner.hv, [volume])
    else:
        ledger.record(owner.pool, before)


def _delete_volume(owner: _Owner, name: str) -> None:
    storage.delete(owner.pool, name)
    ledger.forget(owner.pool, owner.hv, [name])


def _undefine_quietly(conn: libvirt.virConnect, name: str) -> None:
    dom = virt.lookup(conn, name)
    if dom is not None:
        virt.power_off(dom)
        virt.undefine(dom)


def _start_with_port_retry(
    conn: libvirt.virConnect,
    build: _Build,
    the_plan: Plan,
    pool_dir: str,
    report: GuestReport,
    files: state.GuestFiles,
    attempts: int = 3,
) -> tuple[libvirt.virDomain, domain.Metadata]:
    """Start; when QEMU cannot bind the SSH forward (someone took the port since), pick another."""
    dom, md = build.dom, build.md
    tried: set[int] = set()
    for attempt in range(attempts):
        try:
            virt.start(dom)
            _write_known_hosts(files, md.ssh_port)
            return dom, md
        except VirtError as exc:
            if attempt == attempts - 1 or not any(m in str(exc) for m in HOSTFWD_ERRORS):
                raise
            tried.add(md.ssh_port)
            dom, md = _define_with_port(conn, the_plan, md, pool_dir, avoid=frozenset(tried), dom_uuid=dom.UUIDString())
            report.ssh = _ssh_info(the_plan, md.ssh_port, files)
    raise AssertionError("unreachable")


def _hotplug_virtio_pmem(dom: libvirt.virDomain, the_plan: Plan, pool_dir: str) -> None:
    """libvirt 9.0 cannot start a domain with virtio-pmem in its config: attach them live, every start."""
    for region in the_plan.virtio_pmem_regions:
        virt.attach(dom, domain.region_device_xml(region, pool_dir), live=True, config=False)


# ---------------------------------------------------------------------------------------------
# SSH, agent, verification, power cycle


def open_session(
    dom: libvirt.virDomain, the_plan: Plan, files: state.GuestFiles, port: int, deadline_s: float, progress: Progress
) -> ssh.Session:
    name = the_plan.name
    uri = dom.connect().getURI()
    log_path = boot.console_log_path(name, uri)
    # A remote guest's forward is on the hypervisor's loopback: reach it, and its serial log,
    # through the hypervisor's SSH (remote.py). None on this machine.
    hop = remote.hypervisor_for(uri)

    def log_tail(max_lines: int) -> str:
        if hop is None:
            return boot.read_tail(log_path, max_lines=max_lines)
        return boot.tail_lines(hop.read_tail(log_path), max_lines)

    def abort_check() -> None:  # between SSH attempts: a boot that cannot succeed, or a cancelled fleet
        progress.checkpoint()
        boot.check_boot_text(name, log_tail(200), active=virt.is_active(dom))

    target = ssh.SshTarget(
        host="127.0.0.1", port=port, user=the_plan.ssh_user, client_key_path=str(files.client_key),
        host_public_key=files.host_key_pub.read_text().strip(),
        sock_factory=(lambda: hop.open_channel(port)) if hop is not None else None,
    )
    try:
        return ssh.connect(target, deadline_s=deadline_s, progress=progress.line, abort_check=abort_check)
    except GuestError as exc:
        tail = log_tail(15)
        if hop is None:
            boot.copy_log(log_path, files.console_copy)
        else:
            state.write_private(files.console_copy, log_tail(10_000))
        if "console lines" in str(exc):
            raise
        # An empty console says something too: QEMU or the kernel never got as far as printing.
        shown = tail or "(none: the guest has printed nothing on its serial console)"
        raise GuestError(f"{exc}\nlast console lines:\n{shown}") from None


def _prove(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    the_plan: Plan,
    files: state.GuestFiles,
    opts: CreateOptions,
    progress: Progress,
    report: GuestReport,
    *,
    power_cycle: bool,
    made: bool = False,
) -> None:
    """apply, verify and (power_cycle) the proof; `made`: this run made the guest, so the reserved
    tails of its regions without a filesystem are written (a re-run only re-reads them)."""
    assert report.ssh is not None
    port = report.ssh.port
    with progress.phase("ssh", f"waiting for SSH on 127.0.0.1:{port} (TCG boot takes about a minute)"):
        session = open_session(dom, the_plan, files, port, the_plan.boot_timeout_s, progress)
    if opts.until == "ssh":
        session.close()
        return
    try:
        with progress.phase("agent"):
            states = agent.apply(session, the_plan, reformat=opts.reformat)
        with progress.phase("verify"):
            regions = agent.verify(session, the_plan, states, write_tails=made)
    finally:
        session.close()
    pool_dir = storage.pool_path(storage.pool_of(conn, the_plan.pool))
    for r in regions:
        r.backing_path = f"{pool_dir}/{the_plan.region(r.name).volume}"
    report.regions = regions
    if power_cycle:
        with progress.phase("power-cycle"):
            power_cycle_proof(conn, dom, the_plan, files, port, regions, progress)


def power_cycle_proof(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    the_plan: Plan,
    files: state.GuestFiles,
    port: int,
    regions: list[agent.RegionReport],
    progress: Progress,
) -> None:
    """Cut the power after the guest synced, boot again, re-check each payload's sha256 in the guest
    and find each region's marker in its host backing volume (read through libvirt)."""
    progress.line("cutting the guest's power (virDomainDestroy, no clean shutdown)")
    virt.power_off(dom)
    virt.start(dom)
    pool_dir = os.path.dirname(regions[0].backing_path) if regions and regions[0].backing_path else ""
    _hotplug_virtio_pmem(dom, the_plan, pool_dir)
    session = open_session(dom, the_plan, files, port, the_plan.boot_timeout_s, progress)
    try:
        # Not agent.apply: after the cut only modules and mounts may run; a region that would need
        # its namespace or filesystem made again is reported not persisted, and nothing is made.
        agent.after_power_cycle(session, the_plan, regions, progress=progress.line)
    finally:
        session.close()
    pool = storage.pool_of(conn, the_plan.pool)
    for r in regions:
        if r.persisted and r.marker is not None:
            volume = the_plan.region(r.name).volume
            offset = storage.find_marker(storage.volume(pool, volume), r.marker.encode())
            r.persisted = offset is not None
            r.marker_offset = offset
            if offset is None:
                r.persisted_reason = (
                    f"region {r.name}: not persisted: the guest reads its payload back, but its marker is not in "
                    f"the backing volume {volume} (the guest's writes did not reach the host file)"
                )


# ---------------------------------------------------------------------------------------------
# re-running create on an existing guest


def _reverify_existing(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    spec: GuestSpec,
    the_plan: Plan,
    files: state.GuestFiles,
    opts: CreateOptions,
    progress: Progress,
    report: GuestReport,
) -> None:
    md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
    if md is None:
        raise HostError(
            f"a domain named {spec.name!r} already exists and was not made by nvmprov; "
            "pick another name, or use `nvmprov attach` to add regions to it"
        )
    if md.spec_digest != the_plan.spec_digest:
        changed = ", ".join(changed_fields(spec, md, files))
        raise UsageError(
            f"guest {spec.name!r} exists with a different spec (changed: {changed}); "
            f"`nvmprov destroy {spec.name}` first, or keep the old spec"
        )
    from .guests import check_same_domain, with_recorded_volumes

    check_same_domain(files, dom)
    progress.line(f"guest {spec.name} exists with this spec: re-verifying without a power cycle")

    the_plan = with_recorded_volumes(the_plan, md)
    report.ssh = _ssh_info(the_plan, md.ssh_port, files)
    if opts.until == "define":  # the guest is defined: nothing to do, and starting it would be a change
        report.settle()
        return
    if not virt.is_active(dom):
        start_guest(conn, dom, the_plan, progress)
    if opts.until == "start":
        report.settle()
        return
    _prove(conn, dom, the_plan, files, opts, progress, report, power_cycle=False)
    report.settle()


def changed_fields(spec: GuestSpec, md: domain.Metadata, files: state.GuestFiles | None = None) -> list[str]:
    """The spec paths that differ from the spec the guest was made with. libvirt's copy (the domain
    metadata) is the record, so this works from any machine; the local state file is only the
    fallback for domains whose metadata predates spec_json."""
    from .spec import load_recorded

    try:
        if md.spec_json is not None:
            recorded = md.spec_json
        elif files is not None:
            recorded = files.spec_json.read_text()
        else:
            raise FileNotFoundError
        old, _broken = load_recorded(json.loads(recorded))
    except (OSError, ValueError, HostError):
        return ["(the guest's metadata does not hold the spec it was made with)"]
    return spec.diff(old) or ["(digest differs)"]


def start_guest(conn: libvirt.virConnect, dom: libvirt.virDomain, the_plan: Plan, progress: Progress) -> None:
    with progress.phase("start"):
        virt.start(dom)
        pool = storage.pool_of(conn, the_plan.pool)
        _hotplug_virtio_pmem(dom, the_plan, storage.pool_path(pool))


# Imported late: the agent pulls in paramiko, which `render`/`validate` never need.
from . import agent  # noqa: E402

__all__ = [
    "DEFAULT_POOL_DIR", "CreateOptions", "create", "effective_uri", "open_session", "pool_dir_for", "power_cycle_proof",
    "save_report", "start_guest", "vet_image",
]
