"""Run the agent: read facts, run only the missing commands, repeat until nothing is missing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

from nvmprov.agent.facts import GuestFacts, blockdev_of, locate, parse_guest_facts
from nvmprov.agent.steps import Command, fstab_command, plan_commands
from nvmprov.errors import GuestError
from nvmprov.plan import Plan, RegionPlan
from nvmprov.ssh import Result

GATHER_TIMEOUT_S = 180.0
MAX_ROUNDS = 6  # modules, namespace, filesystem+mount, fstab, a final read, one spare


class Runner(Protocol):
    """What the agent needs of nvmprov.ssh.Session (tests pass a fake guest)."""

    def run(
        self,
        cmd: str,
        *args: object,
        sudo: bool = False,
        check: bool = True,
        timeout_s: float = 300,
        stdin: bytes | None = None,
    ) -> Result: ...


@dataclass(frozen=True)
class RegionState:
    """Where a spec region ended up in the guest after apply()."""

    name: str
    model: str
    guest_region: str  # "region0"
    namespace: str | None  # "namespace0.0"; None for a region without one
    namespace_mode: str | None  # "fsdax", "raw" (virtio-pmem, read-only), ...
    guest_device: str | None  # "/dev/pmem0"
    usable_bytes: int | None  # the namespace's size (fsdax: after the page map), else the device's
    device_dax: bool  # the block device supports DAX (/sys/block/X/queue/dax)
    filesystem: str | None  # what blkid finds on the device
    fs_uuid: str | None
    mountpoint: str | None  # where it is mounted now (None: not mounted)
    mount_dax: bool  # mounted with dax=always
    commands_run: tuple[str, ...] = ()


def guest_program(name: str) -> bytes:
    return resources.files("nvmprov.agent.guest").joinpath(name).read_bytes()


def run_program(session: Runner, name: str, *args: object, timeout_s: float) -> Result:
    """Run one of nvmprov/agent/guest/*.py in the guest's python3, as root, fed on stdin."""
    template = "python3 -" + " %s" * len(args)
    return session.run(template, *args, sudo=True, stdin=guest_program(name), timeout_s=timeout_s)


def gather(session: Runner) -> GuestFacts:
    """Every fact the agent needs, in one round trip."""
    return parse_guest_facts(run_program(session, "collect_facts.py", timeout_s=GATHER_TIMEOUT_S).stdout)


def apply(
    session: Runner,
    plan: Plan,
    *,
    reformat: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[RegionState]:
    """Make every region of the plan a mounted DAX filesystem (or a bare fsdax namespace).

    Idempotent: facts first, then only what is missing; on a finished guest it runs nothing
    but the fact collector. `reformat` lets it replace existing filesystems (once per run).
    """
    to_reformat = {r.name for r in plan.regions} if reformat else set()
    ran: dict[str, list[str]] = {r.name: [] for r in plan.regions}
    pending: list[Command] = []
    for _ in range(MAX_ROUNDS):
        facts = gather(session)
        pending = _next_commands(facts, plan.regions, to_reformat)
        if not pending:
            return [describe(facts, r, tuple(ran[r.name])) for r in plan.regions]
        for command in pending:
            if progress is not None:
                progress(f"{command.region or 'guest'}: {command.render()}")
            session.run(command.template, *command.args, sudo=True, stdin=command.stdin, timeout_s=command.timeout_s)
            for name in [command.region] if command.region else list(ran):
                ran[name].append(command.render())
    raise GuestError(
        f"the in-guest agent did not settle after {MAX_ROUNDS} rounds; still wanted: "
        + "; ".join(c.render() for c in pending)
    )


def _next_commands(facts: GuestFacts, regions: tuple[RegionPlan, ...], to_reformat: set[str]) -> list[Command]:
    commands: list[Command] = []
    seen: set[tuple[str, bytes | None]] = set()
    for region in regions:
        for command in plan_commands(facts, region, reformat=region.name in to_reformat):
            if command.phase == "filesystem" and command.template.startswith("mkfs"):
                to_reformat.discard(region.name)  # reformat once, not every round
            key = (command.render(), command.stdin)
            if key not in seen:  # e.g. one modprobe for several regions
                seen.add(key)
                commands.append(command)
    if not commands:
        fstab = fstab_command(facts, regions)
        if fstab is not None:
            commands.append(fstab)
    return commands


def describe(facts: GuestFacts, region: RegionPlan, commands_run: tuple[str, ...] = ()) -> RegionState:
    guest = locate(facts, region)
    ns = guest.active_namespace
    dev = blockdev_of(facts, guest)
    device = f"/dev/{dev.name}" if dev else None
    mounts = facts.mounts_of(device) if device else ()
    mount = next((m for m in mounts if m.target == region.mount), mounts[0] if mounts else None)
    return RegionState(
        name=region.name,
        model=region.model,
        guest_region=guest.dev,
        namespace=ns.dev if ns else None,
        namespace_mode=ns.mode if ns else None,
        guest_device=device,
        usable_bytes=ns.size_bytes if ns else (dev.size_bytes if dev else None),
        device_dax=bool(dev and dev.dax),
        filesystem=dev.fs.type if dev and dev.fs else None,
        fs_uuid=dev.fs.uuid if dev and dev.fs else None,
        mountpoint=mount.target if mount else None,
        mount_dax=bool(mount and mount.dax),
        commands_run=commands_run,
    )
