"""How many SSH execs and guest python3 starts the agent costs: each is seconds under TCG.

Before the rounds were folded (docs/performance.md, 'What dominates' item 2), a fresh one-region
guest took 11 execs (5 fact reads) and a fresh three-region guest 22; verify took two python3 runs
per region plus a sync. Then each round was one exec and one python3 start (3 for a fresh guest,
and one more for verify); now the phase's one guest program serves every round and the verify.
These tests pin the counts so that a regression fails.
"""

from __future__ import annotations

import pytest

from nvmprov.agent import apply, started, steps, verify
from nvmprov.errors import RemoteCommandError

from .test_agent_steps import LABEL, FakeGuest, MiB, plan_of, region

ONE = plan_of(region())
THREE = plan_of(
    region("fast", slot=0, size=1024 * MiB, mount="/mnt/fast"),
    region("labelled", slot=1, label=LABEL, fs="xfs", mount="/mnt/labelled"),
    region("v", model="virtio-pmem", pci=0x0C, size=256 * MiB, mount="/mnt/v"),
)


def fresh_one() -> FakeGuest:
    g = FakeGuest()
    g.modules -= {"nfit", "nd_pmem"}  # not loaded yet: the collector loads them
    g.add_nvdimm(0, 512 * MiB)
    return g


def fresh_three() -> FakeGuest:
    g = FakeGuest()
    g.modules -= {"nfit", "nd_pmem", "virtio_pmem"}
    g.add_nvdimm(0, 1024 * MiB)
    g.add_nvdimm(1, 512 * MiB, label=LABEL)
    g.add_virtio(0x0C, 256 * MiB)
    return g


def rounds_of(g: FakeGuest, plan: object) -> list[list[str]]:
    """The programs each round ran (the commands between two fact reads), in order."""
    per_round: list[list[str]] = [[]]
    original_mutate, original_answer = g._mutate, g.answer

    def mutate(command: str, stdin: bytes | None) -> tuple[int, str]:
        per_round[-1].append(command.split()[0])
        return original_mutate(command, stdin)

    def answer(request: dict[str, object]) -> object:
        result = original_answer(request)
        if request["op"] == "facts":
            per_round.append([])
        return result

    g._mutate = mutate  # type: ignore[method-assign]
    g.answer = answer  # type: ignore[method-assign]
    apply(g, plan)  # type: ignore[arg-type]
    return per_round[:-1]


@pytest.mark.parametrize(("make", "plan"), [(fresh_one, ONE), (fresh_three, THREE)], ids=["1-region", "3-regions"])
def test_fresh_guest_takes_three_reads_in_one_program_start_then_one(make: object, plan: object) -> None:
    g = make()  # type: ignore[operator]
    apply(g, plan)  # type: ignore[arg-type]
    # was 11 execs (1 region) / 22 (3 regions) with 5 reads; then 3 execs and 3 python3 starts
    assert (g.execs, g.pythons, g.gathers) == (1, 1, 3)
    done = len(g.commands)
    apply(g, plan)  # type: ignore[arg-type]
    assert (g.execs, g.pythons, g.gathers) == (2, 2, 4)  # a finished guest: one read, nothing else
    assert len(g.commands) == done


def test_apply_and_verify_share_one_program_start() -> None:
    g = fresh_one()
    with started(g) as guest:
        states = apply(guest, ONE)
        g.answer = lambda request: {"regions": [], "synced": True}  # type: ignore[method-assign,assignment]
        # the fake writes no payload; verify's request is what counts here
        verify(guest, ONE, [states[0].__class__(**{**states[0].__dict__, "mountpoint": None})])
    assert (g.execs, g.pythons, g.gathers) == (1, 1, 3)  # was 5 execs and 5 python3 starts (4 + verify)


def test_what_each_round_carries() -> None:
    per_exec = rounds_of(fresh_one(), ONE)
    assert per_exec == [
        [],  # modules loaded by the collector, then the first read
        ["ndctl"],  # create-namespace, then the read that shows /dev/pmem0
        ["mkfs.ext4", "mkdir", "mount", "cat"],  # mkfs with the planned UUID, mount, fstab; the last read
    ]
    three = rounds_of(fresh_three(), THREE)
    assert len(three) == 3
    assert three[1][:5] == ["ndctl", "ndctl", "ndctl", "ndctl", "ndctl"]  # both DIMMs' namespaces...
    assert three[1][5:] == ["mkfs.ext4", "mkdir", "mount", "cat"]  # ...and the virtio-pmem region, already
    assert three[2] == ["mkfs.ext4", "mkdir", "mount", "mkfs.xfs", "mkdir", "mount", "cat"]


def test_the_fstab_entry_names_the_uuid_mkfs_was_given() -> None:
    g = fresh_three()
    apply(g, THREE)
    for r in THREE.regions:
        blockdev = next(fs for fs in g.fs.values() if fs[2] == steps.fs_label(r.name, r.filesystem))
        assert blockdev[1] == steps.fs_uuid(r)
        assert f"UUID={steps.fs_uuid(r)} {r.mount} {r.filesystem} dax,nofail 0 0" in g.fstab


def test_fs_uuid_is_fixed_by_the_plan() -> None:
    assert steps.fs_uuid(region()) == "712d2c82-0cfd-523a-84f5-d95a6f622c52"  # g-data.raw; never changes
    uuids = {steps.fs_uuid(r) for r in THREE.regions} | {steps.fs_uuid(region(name="data2"))}
    assert len(uuids) == 4


def test_a_failing_step_stops_its_round_and_names_itself() -> None:
    class FullDisk(FakeGuest):
        def _mutate(self, command: str, stdin: bytes | None) -> tuple[int, str]:
            if command.startswith("mkfs"):
                return 1, "mkfs.ext4: No space left on device while writing out and closing file system"
            return super()._mutate(command, stdin)

    g = FullDisk()
    g.add_nvdimm(0, 512 * MiB)
    with pytest.raises(RemoteCommandError) as e:
        apply(g, ONE)
    assert e.value.command.startswith("mkfs.ext4 -q -F -b 4096 -U ")
    assert e.value.exit_status == 1 and "No space left on device" in str(e.value)
    assert g.commands[-1].startswith("mkfs")  # mkdir, mount and the fstab rewrite after it never ran
    assert "UUID=" not in g.fstab.split("\n", 2)[-1]


def test_module_loading_failure_is_the_error() -> None:
    g = fresh_one()
    g.modprobe_fails = True
    with pytest.raises(RemoteCommandError, match=r"exit 1\): modprobe -a nfit nd_pmem: modprobe: FATAL: Module nfit"):
        apply(g, ONE)
    assert g.commands == [] and g.execs == 1


def test_a_round_far_beyond_one_command_line_goes_through() -> None:
    """Was refused above 100 KB: the request travelled on argv. Now it is a line on stdin."""
    g = FakeGuest()
    g.add_nvdimm(0, 512 * MiB)
    g.fstab += "# padding\n" * 20_000
    apply(g, ONE)
    assert g.fstab.count("# padding") == 20_000 and "UUID=" + steps.fs_uuid(ONE.regions[0]) in g.fstab
