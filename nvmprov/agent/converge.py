"""Run the agent: read facts, run only the missing commands, repeat until nothing is missing.

A round is two requests to the phase's guest program (agent.program): "run" loads the plan's kernel
modules when they are missing and runs the commands planned from the previous round's facts, then
"facts" reads the facts the next plan is made from. A fresh guest takes three rounds (read;
namespaces; filesystems, mounts and fstab, then the read that finds nothing left), a finished one a
single read; all of them, and the verification after them, in one python3 start.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nvmprov.agent.facts import GuestFacts, blockdev_of, daxdev_of, guest_facts, locate, namespace_of
from nvmprov.agent.program import GuestProgram, Runner, started
from nvmprov.agent.steps import Command, Phase, fstab_command, needed_modules, plan_commands
from nvmprov.errors import GuestError, RemoteCommandError
from nvmprov.plan import Plan, RegionPlan
from nvmprov.sizes import RESERVED_TAIL_BYTES, align_down

GATHER_TIMEOUT_S = 180.0
MAX_ROUNDS = 6  # read, namespace, filesystem+mount+fstab (and its read), then spares
# What may run after a power cut (recheck): loading modules, re-making a CXL region from its recorded
# parameters (nothing programs the CXL decoders at boot; it writes no namespace and no filesystem), and
# mounting. virtio-pmem is hot-plugged after start, so fstab's nofail line cannot mount it at boot.
# Never a namespace or a filesystem step: those would hide the loss they repair.
SAFE_AFTER_POWER_CYCLE: frozenset[Phase] = frozenset({"modules", "region", "mount"})


# An SSH session (a guest program is started for the call) or the phase's running guest program
Guest = Runner | GuestProgram


@dataclass(frozen=True)
class RegionState:
    """Where a spec region ended up in the guest after apply()."""

    name: str
    model: str
    guest_region: str  # "region0"
    namespace: str | None  # "namespace0.0"; None for a region without one
    namespace_mode: str | None  # "fsdax", "raw" (virtio-pmem, read-only), ...
    guest_device: str | None  # "/dev/pmem0": enumeration order, may differ on the next boot
    usable_bytes: int | None  # the namespace's size (fsdax: after the page map), else the device's
    device_dax: bool  # the block device supports DAX (/sys/block/X/queue/dax)
    filesystem: str | None  # what blkid finds on the device
    fs_uuid: str | None
    mountpoint: str | None  # where it is mounted now (None: not mounted)
    mount_dax: bool  # mounted with dax=always
    commands_run: tuple[str, ...] = ()
    # ndctl's uuid (fsdax: from its info block; None: a raw label-less one); stable across boots
    namespace_uuid: str | None = None
    target_node: int | None = None  # the guest region's sysfs target_node (None: the kernel shows none)
    persistence_domain: str | None = None  # as the guest kernel shows it (None: it shows none)
    # A region with a reserved tail (RegionPlan.reserved_tail): where in guest_device the tail starts
    # (= usable_bytes); None otherwise
    tail_offset: int | None = None
    align_bytes: int | None = None  # devdax: the character device's page size


def gather(session: Guest, *, modules: Sequence[str] = (), commands: Sequence[Command] = ()) -> GuestFacts:
    """Every fact the agent needs, in one round trip; first load `modules` and run `commands`.

    Raises RemoteCommandError (command, exit status, stderr tail) for the first command that
    failed, or for the module loading when it failed; the guest ran nothing after it.
    """
    with started(session) as guest:
        facts, failed = _round(guest, modules, commands)
    if failed is not None:
        raise failed[1]
    return facts


def _round(
    guest: GuestProgram, modules: Sequence[str], commands: Sequence[Command]
) -> tuple[GuestFacts, tuple[Command, RemoteCommandError] | None]:
    """One round: the facts, and the planned command that failed (the guest ran none after it)."""
    facts = _collect(guest, modules, commands)
    if facts.modprobe is not None and facts.modprobe.rc != 0:
        raise RemoteCommandError(facts.modprobe.command, facts.modprobe.rc, facts.modprobe.stderr)
    failed = _failed_step(facts, commands)
    if failed is None:
        return facts, None
    return facts, (failed[0], RemoteCommandError(failed[0].render(), failed[1], failed[2]))


def _collect(guest: GuestProgram, modules: Sequence[str], commands: Sequence[Command]) -> GuestFacts:
    """Run the round's module loading and commands (when there are any), then read the facts."""
    ran: dict[str, object] = {}
    if modules or commands:
        steps = [
            {
                "command": c.render(),
                "stdin_b64": base64.b64encode(c.stdin).decode() if c.stdin else None,
                "timeout_s": c.timeout_s,
            }
            for c in commands
        ]
        ran = guest.ask("run", GATHER_TIMEOUT_S + sum(c.timeout_s for c in commands), modules=list(modules),
                        steps=steps)
    return guest_facts({**guest.ask("facts", GATHER_TIMEOUT_S), **ran})


def _failed_step(facts: GuestFacts, commands: Sequence[Command]) -> tuple[Command, int, str] | None:
    """The planned command that failed, its exit status and stderr; None when all ran and succeeded."""
    for i, command in enumerate(commands):
        if i >= len(facts.steps):
            return command, -1, "the guest's fact collector did not run it (no result came back)"
        result = facts.steps[i]
        if result.command != command.render():
            raise GuestError(f"the guest ran {result.command!r} where {command.render()!r} was sent")
        if result.rc != 0:
            return command, result.rc, result.stderr
    return None


def plan_modules(regions: Sequence[RegionPlan]) -> tuple[str, ...]:
    """The kernel modules the regions need, each once, in a stable order."""
    return tuple(dict.fromkeys(m for r in regions for m in needed_modules(r)))


def apply(
    session: Guest,
    plan: Plan,
    *,
    reformat: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[RegionState]:
    """Make every region of the plan a mounted DAX filesystem (or a bare fsdax namespace).

    Idempotent: facts first, then only what is missing; on a finished guest it runs nothing
    but the fact collector. `reformat` lets it replace existing filesystems (once per run).
    """
    units = plan.units  # a split region's namespaces, each on its own
    to_reformat = {r.name for r in units} if reformat else set()
    ran: dict[str, list[str]] = {r.name: [] for r in units}
    modules = plan_modules(units)
    pending: list[Command] = []
    with started(session) as guest:
        for _ in range(MAX_ROUNDS):
            for command in pending:
                if progress is not None:
                    progress(f"{command.region or 'guest'}: {command.render()}")
            facts = gather(guest, modules=modules, commands=pending)
            for command in pending:
                for name in [command.region] if command.region else list(ran):
                    ran[name].append(command.render())
            _note_modprobe(facts, units, ran, progress)
            pending = _next_commands(facts, units, to_reformat)
            if not pending:
                return [describe(facts, r, tuple(ran[r.name])) for r in units]
    raise GuestError(
        f"the in-guest agent did not settle after {MAX_ROUNDS} rounds; still wanted: "
        + "; ".join(c.render() for c in pending)
    )


@dataclass(frozen=True)
class Recheck:
    """The regions after a power cut: as they came back, or why they cannot count as persisted."""

    states: dict[str, RegionState]  # every region the guest still shows, lost ones included, as it shows it
    lost: dict[str, str]  # region name -> the reason (what the guest showed, what it would have taken)


def recheck(session: Guest, plan: Plan, *, progress: Callable[[str], None] | None = None) -> Recheck:
    """After a power cut: load modules and mount what fstab could not; create nothing.

    A region whose facts call for a namespace or filesystem step did not survive the cut: it goes
    into `lost` with the reason and nothing runs on it (apply() would re-create it and hide the
    loss). So does a region the agent cannot place or mount any more (the error text). /etc/fstab
    is not rewritten.
    """
    with started(session) as guest:
        return _recheck(guest, plan, progress)


def _recheck(guest: GuestProgram, plan: Plan, progress: Callable[[str], None] | None) -> Recheck:
    units = plan.units
    modules = plan_modules(units)
    lost: dict[str, str] = {}
    pending: list[Command] = []
    for _ in range(MAX_ROUNDS):
        for command in pending:
            if progress is not None:
                progress(f"{command.region or 'guest'}: {command.render()}")
        facts, failed = _round(guest, modules, pending)
        if failed is not None:
            command, error = failed
            if command.region is None:
                raise error
            lost[command.region] = _not_persisted(command.region, f"after the power cycle, {error}")
        pending = []
        for region in units:
            if region.name in lost:
                continue
            try:
                commands = plan_commands(facts, region, reformat=False)
            except GuestError as e:
                lost[region.name] = _not_persisted(region.name, f"after the power cycle, {e}")
                continue
            unsafe = [c for c in commands if c.phase not in SAFE_AFTER_POWER_CYCLE]
            if unsafe:
                lost[region.name] = _lost_reason(facts, region, unsafe)
                continue
            pending += [c for c in commands if c not in pending]  # one modprobe for several regions
        if not pending:
            return Recheck({r.name: s for r in units if (s := _describe_if_found(facts, r)) is not None}, lost)
    raise GuestError(
        f"after the power cycle the in-guest agent did not settle after {MAX_ROUNDS} rounds; still wanted: "
        + "; ".join(c.render() for c in pending)
    )


def _describe_if_found(facts: GuestFacts, region: RegionPlan) -> RegionState | None:
    try:
        return describe(facts, region)
    except GuestError:  # the guest shows no region at its NFIT handle / PCI address (any more)
        return None


def _lost_reason(facts: GuestFacts, region: RegionPlan, unsafe: list[Command]) -> str:
    state = describe(facts, region)
    if unsafe[0].phase == "namespace":
        seen = f"{state.guest_region} with a {state.namespace_mode or 'no'} namespace, not {region.effective_mode}"
    else:
        seen = f"no {region.filesystem} filesystem on {state.guest_device}"
    return _not_persisted(
        region.name,
        f"after the power cycle the guest shows {seen}; bringing it back would take `{unsafe[0].render()}`, "
        "which would hide the loss, so nothing was run",
    )


def _not_persisted(name: str, why: str) -> str:
    prefix = f"region {name}: "
    return prefix + "not persisted: " + why.replace(prefix, "", 1)


def _note_modprobe(
    facts: GuestFacts,
    regions: Sequence[RegionPlan],
    ran: dict[str, list[str]],
    progress: Callable[[str], None] | None,
) -> None:
    """The collector loaded modules before reading: count that as run for the regions that need them."""
    if facts.modprobe is None:
        return
    if progress is not None:
        progress(f"guest: {facts.modprobe.command}")
    loaded = set(facts.modprobe.command.split()[2:])  # "modprobe -a nfit nd_pmem"
    for region in regions:
        if loaded & set(needed_modules(region)):
            ran[region.name].append(facts.modprobe.command)


def _next_commands(facts: GuestFacts, regions: tuple[RegionPlan, ...], to_reformat: set[str]) -> list[Command]:
    commands: list[Command] = []
    seen: set[tuple[str, bytes | None]] = set()
    for region in regions:
        for command in plan_commands(facts, region, reformat=region.name in to_reformat):
            if command.makes_filesystem:
                to_reformat.discard(region.name)  # reformat once, not every round
            key = (command.render(), command.stdin)
            if key not in seen:  # e.g. one modprobe for several regions
                seen.add(key)
                commands.append(command)
    fstab = fstab_command(facts, regions, commands)  # last: after the mkfs it may name
    if fstab is not None:
        commands.append(fstab)
    return commands


def tail_offset(device_bytes: int, align_bytes: int | None) -> int | None:
    """Where the reserved tail starts on a device of DEVICE_BYTES: the last RESERVED_TAIL_BYTES, at a
    multiple of the device's page size (devdax maps only whole pages); None when it does not fit."""
    offset = align_down(device_bytes - RESERVED_TAIL_BYTES, max(align_bytes or 0, 4096))
    return offset if offset > 0 else None


def describe(facts: GuestFacts, region: RegionPlan, commands_run: tuple[str, ...] = ()) -> RegionState:
    guest = locate(facts, region)
    ns = namespace_of(guest, region)
    dev = blockdev_of(facts, guest, region)
    dax = daxdev_of(facts, guest, region) if ns is not None and ns.mode == "devdax" else None
    device = f"/dev/{dev.name}" if dev else None
    mounts = facts.mounts_of(device) if device else ()
    mount = next((m for m in mounts if m.target == region.mount), mounts[0] if mounts else None)
    usable = ns.size_bytes if ns else (dev.size_bytes if dev else None)
    if dax is not None:
        device, usable = f"/dev/{dax.name}", dax.size_bytes
    elif dev is not None and ns is not None and ns.mode == "sector":
        usable = dev.size_bytes  # the BTT's data blocks, not the namespace
    tail = None
    if region.reserved_tail and usable is not None and (dax is not None or dev is not None):
        tail = tail_offset(usable, dax.align_bytes if dax else None)
        usable = tail
    return RegionState(
        name=region.name,
        model=region.model,
        guest_region=guest.dev,
        namespace=ns.dev if ns else None,
        namespace_mode=ns.mode if ns else None,
        guest_device=device,
        usable_bytes=usable,
        device_dax=bool(dev and dev.dax) or dax is not None,
        filesystem=dev.fs.type if dev and dev.fs else None,
        fs_uuid=dev.fs.uuid if dev and dev.fs else None,
        mountpoint=mount.target if mount else None,
        mount_dax=bool(mount and mount.dax),
        commands_run=commands_run,
        namespace_uuid=ns.uuid if ns else None,
        target_node=guest.target_node,
        persistence_domain=guest.persistence_domain,
        tail_offset=tail,
        align_bytes=dax.align_bytes if dax else None,
    )
