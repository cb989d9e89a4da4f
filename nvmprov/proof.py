"""The proof, one path for create, verify and attach: from a running guest to a filled report.

SSH in with the guest's own key (its forward on the hypervisor's loopback) -> agent.apply ->
agent.verify -> each region's host backing file -> optionally the power-cycle proof (cut the
power, boot, re-read the payloads in the guest and find each marker in its host volume).
A GuestRun carries what that needs; create, verify and attach each make one and call prove().
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import agent, boot, domain, identity, remote, ssh, state, storage, virt
from .errors import GuestError
from .managed import ssh_coordinates
from .report import GuestReport, Report, SshInfo, render_json

if TYPE_CHECKING:
    import libvirt

    from .plan import Plan, RegionPlan
    from .progress import Progress

def write_known_hosts(files: state.GuestFiles, port: int) -> None:
    """Pin the host key create generated for the guest, under the address its forward has now."""
    key = files.host_key_pub.read_text().split()
    state.write_private(files.known_hosts, f"[{domain.SSH_FORWARD_HOST}]:{port} {key[0]} {key[1]}\n")


@dataclass
class GuestRun:
    """One guest being created, verified or attached to: where it is, what it should be, whom to
    tell, and the report being filled. `dom` is None until create has defined the domain; the SSH
    coordinates are the report's (report.ssh), set once the port is known."""

    conn: libvirt.virConnect
    plan: Plan
    files: state.GuestFiles
    progress: Progress
    report: GuestReport
    dom: libvirt.virDomain | None = None

    @property
    def domain(self) -> libvirt.virDomain:
        assert self.dom is not None, "the domain is defined before anything uses it"
        return self.dom

    @property
    def ssh(self) -> SshInfo:
        assert self.report.ssh is not None, "the SSH port is chosen before anything connects"
        return self.report.ssh

    def set_ssh_port(self, port: int) -> None:
        self.report.ssh = ssh_coordinates(self.files, port, self.plan.ssh_user)

    @functools.cached_property
    def pool_dir(self) -> str:
        return storage.pool_path(storage.pool_of(self.conn, self.plan.pool))


def prove(
    run: GuestRun,
    *,
    booting: bool = False,
    started: bool = False,
    only: tuple[RegionPlan, ...] | None = None,
    reformat: bool = False,
    made: bool = False,
    power_cycle: bool = False,
    ssh_only: bool = False,
) -> None:
    """The proof on RUN's running guest, filling run.report.regions; a guest failure raises
    GuestError (the phase it happened in is progress.last_phase()).

    booting: the guest may still be booting (create), so SSH waits the boot timeout, not the ssh
    timeout; started: this run started the domain just now (its console log is this boot's alone);
    only: these regions alone (attach: the new one; the others stay as they are);
    reformat: make filesystems again; made: this run made the regions, so the reserved tails of
    those without a filesystem are written (otherwise only re-read); power_cycle: then the
    persistence proof; ssh_only: stop once SSH answers (create --until ssh)."""
    progress, coords = run.progress, run.ssh
    deadline_s = run.plan.boot_timeout_s if booting else run.plan.ssh_timeout_s
    waiting = f"waiting for SSH on {coords.host}:{coords.port}" + (" (a TCG boot takes 10-40 s)"
                                                                   if booting else "")
    with progress.phase("ssh", waiting):
        session = open_session(run.domain, run.files, coords, deadline_s, progress,
                               seed_line=started and run.plan.base_volume is not None)
    if ssh_only:
        session.close()
        return
    checked = run.plan if only is None else replace(run.plan, regions=only)
    try:
        with agent.started(session) as guest:  # one guest program start for apply and verify
            with progress.phase("agent"):
                states = agent.apply(guest, checked, reformat=reformat)
            with progress.phase("verify"):
                regions = agent.verify(guest, checked, states, write_tails=made)
    finally:
        session.close()
    for r in regions:
        r.backing_path = f"{run.pool_dir}/{run.plan.region(r.name).volume}"
    run.report.regions = regions
    if power_cycle:
        with progress.phase("power-cycle"):
            power_cycle_proof(run, regions)


def power_cycle_proof(run: GuestRun, regions: list[agent.RegionReport]) -> None:
    """Cut the power after the guest synced, boot again, re-check each payload's sha256 in the guest
    and find each region's marker in its host backing volume (read through libvirt)."""
    dom, the_plan, progress = run.domain, run.plan, run.progress
    progress.line("cutting the guest's power (virDomainDestroy, no clean shutdown)")
    cut = time.monotonic()
    virt.power_off(dom)
    virt.start(dom)
    pool_dir = os.path.dirname(regions[0].backing_path) if regions and regions[0].backing_path else ""
    hotplug_virtio_pmem(dom, the_plan, pool_dir)
    session = open_session(dom, run.files, run.ssh, the_plan.boot_timeout_s, progress,
                           seed_line=the_plan.base_volume is not None)
    progress.line(f"power-cycle: the guest answers on SSH again {time.monotonic() - cut:.1f}s after the cut")
    try:
        # Not agent.apply: after the cut only modules and mounts may run; a region that would need
        # its namespace or filesystem made again is reported not persisted, and nothing is made.
        agent.after_power_cycle(session, the_plan, regions, progress=progress.line)
    finally:
        session.close()
    pool = storage.pool_of(run.conn, the_plan.pool)
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


def open_session(
    dom: libvirt.virDomain, files: state.GuestFiles, coords: SshInfo, deadline_s: float, progress: Progress,
    *, seed_line: bool = False,
) -> ssh.Session:
    """An SSH session into DOM at COORDS, waiting up to DEADLINE_S for its sshd while watching the
    serial console for a boot that cannot succeed; on failure the console's last lines say why.
    seed_line: the built-in image, started just now: no SSH attempt before its console says the seed
    is applied (its address set): boot.SeedLineGate, ssh.connect's `ready`."""
    name = dom.name()
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

    ready = boot.SeedLineGate(lambda: log_tail(200)) if seed_line else None
    port = coords.port
    target = ssh.SshTarget(
        host=coords.host, port=port, user=coords.user, client_key_path=coords.identity_file,
        host_public_key=files.host_key_pub.read_text().strip(),
        sock_factory=(lambda: hop.open_channel(port)) if hop is not None else None,
    )
    try:
        return ssh.connect(
            target, deadline_s=deadline_s, progress=progress.line, abort_check=abort_check, ready=ready
        )
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


def start_guest(conn: libvirt.virConnect, dom: libvirt.virDomain, the_plan: Plan, progress: Progress) -> None:
    with progress.phase("start"):
        virt.start(dom)
        hotplug_virtio_pmem(dom, the_plan, storage.pool_path(storage.pool_of(conn, the_plan.pool)))


def hotplug_virtio_pmem(dom: libvirt.virDomain, the_plan: Plan, pool_dir: str) -> None:
    """libvirt 9.0 cannot start a domain with virtio-pmem in its config: attach them live, every start."""
    for region in the_plan.virtio_pmem_regions:
        virt.attach(dom, domain.region_device_xml(region, pool_dir), live=True, config=False)


def save_report(report: GuestReport, progress: Progress, hv: identity.Hypervisor) -> None:
    """The guest's last report, as `--json` prints it, in its state directory (0600). Only for a
    guest that is there: a rolled-back create removed the directory and must not bring it back."""
    files = state.guest_files(report.name, hv, create=False)
    if not files.dir.is_dir():
        return
    try:
        state.write_private(files.report, render_json(Report(guests=[report])) + "\n")
    except OSError as exc:
        progress.line(f"could not save the report to {files.report}: {exc.strerror}")
