"""`nvmprov create`: one straight line of stages, side effects at the edges.

spec -> host facts -> plan -> define (metadata first) -> volumes (each recorded) -> start ->
proof.prove (SSH, agent.apply, agent.verify, power-cycle proof) -> report. Any failure or signal
rolls back exactly what this run made (unless --keep-on-failure). docs/architecture.md: the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from . import (
    boot,
    diskimage,
    domain,
    host,
    identity,
    image,
    image_seed,
    ledger,
    managed,
    proof,
    seed,
    state,
    storage,
    virt,
)
from . import plan as planmod
from .errors import GuestError, HostError, SpecError, UsageError, VirtError
from .progress import Progress
from .proof import GuestRun, save_report
from .report import GuestReport, error_message
from .rollback import Rollback
from .sizes import human_size
from .spec import load_recorded
from .uris import effective_uri, pool_dir_for

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


@dataclass(frozen=True)
class _Owner:
    """Whose volumes a create makes: guest NAME of hypervisor HV (identity.py), in POOL."""

    pool: libvirt.virStoragePool
    hv: str
    name: str
    qemu_ids: tuple[int, int] | None = None   # HostFacts.qemu_ids: owner of CXL's files


@dataclass(kw_only=True)
class _Creation(GuestRun):
    """A create run: the guest run the proof works on, plus what only create has: the spec and
    options, whose volumes it makes, what to undo, and the metadata recorded on the domain so far."""

    spec: GuestSpec
    opts: CreateOptions
    owner: _Owner
    undo: Rollback = field(init=False)
    md: domain.Metadata | None = None

    def __post_init__(self) -> None:
        self.undo = Rollback(self.progress)

    @property
    def metadata(self) -> domain.Metadata:
        assert self.md is not None, "the metadata is recorded when the domain is defined"
        return self.md


def _create_locked(
    conn: libvirt.virConnect, hv: identity.Hypervisor, spec: GuestSpec, opts: CreateOptions, progress: Progress,
    report: GuestReport,
) -> None:
    """HV: the hypervisor CONN reaches, asked once per create (a round trip over qemu+ssh)."""
    the_plan, pool, facts = _host_phase(conn, hv, spec, opts, progress)
    _tell_plan(the_plan, progress, report)
    existing = virt.lookup(conn, spec.name)
    md = domain.parse_metadata(virt.xml_desc(existing, inactive=True)) if existing is not None else None
    if existing is not None and md is not None:
        state.adopt_legacy(spec.name, hv, existing.UUIDString())  # files kept under the old layout
    run = _Creation(conn, the_plan, state.guest_files(spec.name, hv), progress, report,
                    spec=spec, opts=opts, owner=_Owner(pool, hv.key, spec.name, facts.qemu_ids))
    if existing is not None:
        if md is None or md.complete:
            try:
                _reverify_existing(run, existing, md)
            except GuestError as exc:  # like a new guest: the report carries it (nothing to roll back)
                report.fail(progress.last_phase("create"), str(exc))
            return
        # A run that was killed (SIGKILL, power loss) left this: its metadata names what it made.
        progress.line(f"guest {spec.name}: an earlier create did not finish; removing what it left")
        remove_leftovers(conn, hv.key, existing, md, progress)
    _create_new(run)


def _host_phase(conn: libvirt.virConnect, hv: identity.Hypervisor, spec: GuestSpec, opts: CreateOptions,
                progress: Progress) -> tuple[Plan, libvirt.virStoragePool, planmod.HostFacts]:
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
    return the_plan, pool, facts


def _tell_plan(the_plan: Plan, progress: Progress, report: GuestReport) -> None:
    report.accel = the_plan.accel
    if the_plan.accel_notice:
        progress.line(the_plan.accel_notice)
    if the_plan.network_outbound:
        progress.line(OUTBOUND_NOTICE)
    for region in the_plan.regions:
        for note in region.notes:
            progress.line(f"region {region.name}: {note}")


def _create_new(run: _Creation) -> None:
    """Make the guest and prove it; anything failing undoes exactly what this run made."""
    opts, progress, report = run.opts, run.progress, run.report
    try:
        _build_guest(run)
        if opts.until not in ("define", "start"):
            proof.prove(run, booting=True, started=True, reformat=opts.reformat, made=True,
                        power_cycle=opts.power_cycle, ssh_only=opts.until == "ssh")
        run.md = replace(run.metadata, complete=True)
        _record(run.domain, run.md)
        run.undo.commit()
    except BaseException as exc:
        if opts.keep_on_failure:
            progress.line("keeping what was made (--keep-on-failure); `nvmprov destroy --purge` removes it")
        else:
            problems = run.undo.run()
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


def _build_guest(run: _Creation) -> None:
    """Keys, domain (metadata first), volumes (each recorded), start: each registered with run.undo."""
    conn, the_plan, files, progress, undo = run.conn, run.plan, run.files, run.progress, run.undo
    # Registered first so it runs last: a failed create leaves no keys or spec copy behind either.
    undo.add(f"state files {files.dir}", lambda: shutil.rmtree(files.dir, ignore_errors=True))
    with progress.phase("keys"):
        keys = _make_keys(files)
        spec_json = run.spec.model_dump_json(by_alias=True)
        state.write_private(files.spec_json, spec_json)

    with progress.phase("define"):
        _check_backing_volumes(run)
        md = domain.Metadata.from_plan(the_plan, ssh_port=0, spec_path=run.opts.spec_path, spec_json=spec_json)
        run.dom, run.md = _define_with_port(run, md)
        undo.add(f"domain {the_plan.name}", lambda: _undefine_quietly(conn, the_plan.name))
        state.record_domain(files, run.dom.UUIDString())  # a domain replaced under this name is told apart
        run.set_ssh_port(run.md.ssh_port)

    with progress.phase("volumes"):
        _make_volumes(run, keys)
    if run.opts.until == "define":
        return

    with progress.phase("start", _prealloc_hint(the_plan)):
        _start_with_port_retry(run)
        undo.add(f"running guest {the_plan.name}", lambda: _power_off_quietly(conn, the_plan.name))
        proof.hotplug_virtio_pmem(run.domain, the_plan, run.pool_dir)


def _power_off_quietly(conn: libvirt.virConnect, name: str) -> None:
    dom = virt.lookup(conn, name)
    if dom is not None:
        virt.power_off(dom)


def _prealloc_hint(the_plan: Plan) -> str:
    big = sum(r.backing_bytes for r in the_plan.nvdimm_regions if not r.host_pmem)
    if big >= 2 * 1024**3:
        return (
            f"libvirt preallocates {human_size(big)} of nvdimm backing (QEMU prealloc); "
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


def _check_backing_volumes(run: _Creation) -> None:
    """Refuse before changing anything when a backing volume is in the way (not made by nvmprov for
    this guest, not adopted) or in another domain's hands. _make_volumes decides again, exclusively."""
    owner, the_plan = run.owner, run.plan
    pool, hv = owner.pool, owner.hv
    pool_dir = storage.pool_path(pool)
    book = ledger.read(pool)
    for region in the_plan.regions:
        for volume in (region.volume, region.lsa_volume):
            if volume is None:
                continue
            path = f"{pool_dir}/{volume}"
            users = virt.path_users(run.conn, [path], exclude=the_plan.name)[path]
            if users:
                what = "backing volume" if volume == region.volume else "label storage volume"
                raise HostError(
                    f"{what} {volume} of region {region.name} is used by domain(s) "
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
    run: _Creation, md: domain.Metadata, *, avoid: frozenset[int] = frozenset(), dom_uuid: str | None = None,
) -> tuple[libvirt.virDomain, domain.Metadata]:
    # The host lock spans choice and define, so a concurrent create sees the port in our metadata.
    # A random UUID: a fixed one would let define silently replace another domain.
    conn = run.conn
    with state.host_lock("ssh-ports"):
        md = replace(md, ssh_port=boot.free_port(_used_ports(conn) | set(avoid)))
        xml = _render(run.plan, md, storage.pool_path(run.owner.pool), dom_uuid or str(uuid.uuid4()), conn.getURI())
        dom = virt.define(conn, xml)
    return dom, md


def _record(dom: libvirt.virDomain, md: domain.Metadata) -> None:
    virt.set_metadata(dom, domain.metadata_xml(md), key=domain.METADATA_PREFIX, uri=domain.METADATA_NS)


def _make_volumes(run: _Creation, keys: tuple[seed.KeyPair, seed.KeyPair]) -> None:
    """Each volume this run creates is recorded in the ownership ledger and the domain's metadata
    (run.md) right after it exists, so a killed run leaves nothing untraceable. Creation is
    exclusive: a volume is this run's only when this run's createXML made it."""
    owner, the_plan, progress = run.owner, run.plan, run.progress
    pool = owner.pool
    client, host_key = keys

    def made(name: str, kind: str) -> None:
        run.undo.add(f"volume {name}", lambda: _delete_volume(owner, name))
        ledger.record(pool, ledger.Entry(name, owner.name, owner.hv, kind))
        run.md = run.metadata.with_volume(name, kind)
        _record(run.domain, run.md)

    for region in the_plan.regions:
        # CXL's files are named only on QEMU's command line: libvirt does not chown them, so they are
        # made owned by QEMU's user (docs/performance.md, the CXL spike)
        qemu_owned = owner.qemu_ids if region.model == "cxl" else None
        if region.lsa_volume is not None and storage.make_backing(
                pool, region.lsa_volume, planmod.CXL_LSA_BYTES, owner=qemu_owned) is not None:
            made(region.lsa_volume, "label")
            progress.line(f"region {region.name}: label storage area {region.lsa_volume}")
        elif region.lsa_volume is not None:
            how = _use_existing(run, replace(region, volume=region.lsa_volume, backing_bytes=planmod.CXL_LSA_BYTES,
                                             adopted=False))
            progress.line(f"region {region.name}: {how} label storage area {region.lsa_volume}")
        made_now = not region.adopted and storage.make_backing(
            pool, region.volume, region.backing_bytes, allocation=region.allocation, owner=qemu_owned) is not None
        if made_now:
            made(region.volume, "backing")
            progress.line(f"region {region.name}: backing volume {region.volume} ({region.backing_bytes} bytes)")
        else:
            how = _use_existing(run, region)
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


def _use_existing(run: _Creation, region: planmod.RegionPlan) -> str:
    """A volume of the region's name exists: use it when nvmprov made it for this guest (data kept
    by `destroy`), or when the spec names it (`volume:`, adopted); refuse anything else."""
    owner = run.owner
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
        run.undo.add(f"adoption of volume {region.volume} (the volume is kept)",
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


def _start_with_port_retry(run: _Creation, attempts: int = 3) -> None:
    """Start; when QEMU cannot bind the SSH forward (someone took the port since), pick another."""
    tried: set[int] = set()
    for attempt in range(attempts):
        try:
            virt.start(run.domain)
            proof.write_known_hosts(run.files, run.metadata.ssh_port)
            return
        except VirtError as exc:
            if attempt == attempts - 1 or not any(m in str(exc) for m in HOSTFWD_ERRORS):
                raise
            tried.add(run.metadata.ssh_port)
            run.dom, run.md = _define_with_port(run, run.metadata, avoid=frozenset(tried),
                                                dom_uuid=run.domain.UUIDString())
            run.set_ssh_port(run.md.ssh_port)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# re-running create on an existing guest


def _reverify_existing(run: _Creation, dom: libvirt.virDomain, md: domain.Metadata | None) -> None:
    spec, opts = run.spec, run.opts
    if md is None:
        raise HostError(
            f"a domain named {spec.name!r} already exists and was not made by nvmprov; "
            "pick another name, or use `nvmprov attach` to add regions to it"
        )
    if md.spec_digest != run.plan.spec_digest:
        changed = ", ".join(changed_fields(spec, md, run.files))
        raise UsageError(
            f"guest {spec.name!r} exists with a different spec (changed: {changed}); "
            f"`nvmprov destroy {spec.name}` first, or keep the old spec"
        )
    managed.check_same_domain(run.files, dom)
    run.progress.line(f"guest {spec.name} exists with this spec: re-verifying without a power cycle")

    run.dom, run.md = dom, md
    run.plan = managed.with_recorded_volumes(run.plan, md)
    run.set_ssh_port(md.ssh_port)
    if opts.until == "define":  # the guest is defined: nothing to do, and starting it would be a change
        run.report.settle()
        return
    started = not virt.is_active(dom)
    if started:
        proof.start_guest(run.conn, dom, run.plan, run.progress)
    if opts.until == "start":
        run.report.settle()
        return
    proof.prove(run, booting=True, started=started, reformat=opts.reformat, ssh_only=opts.until == "ssh")
    run.report.settle()


def changed_fields(spec: GuestSpec, md: domain.Metadata, files: state.GuestFiles | None = None) -> list[str]:
    """The spec paths that differ from the spec the guest was made with. libvirt's copy (the domain
    metadata) is the record, so this works from any machine; the local state file is only the
    fallback for domains whose metadata predates spec_json."""
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


__all__ = ["CreateOptions", "changed_fields", "create", "remove_leftovers", "vet_image"]
