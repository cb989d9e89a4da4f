"""Every guest of every example, rendered with a fixed context (shared by golden and test-driver tests)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from nvmprov import domain, plan, spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GOLDEN = ROOT / "tests" / "golden"
# Like this machine: libvirt offers kvm but the CPU has no vmx, so auto picks tcg.
FACTS = plan.HostFacts(kvm_domain_type=True, cpu_virt_extensions=False,
                       builtin_volumes=("nvmprov-base.qcow2", "nvmprov-vmlinuz", "nvmprov-initrd.img"))
POOL_DIR = "/var/lib/nvmprov/pool"
SSH_PORT = 2222


@dataclass(frozen=True)
class Case:
    example: str
    guest: spec.GuestSpec
    golden: Path
    multi: bool

    @property
    def id(self) -> str:
        return self.golden.stem

    def plan(self) -> plan.Plan:
        return plan.build(self.guest, FACTS)

    def context(self, *, include_virtio_pmem: bool = False) -> domain.RenderContext:
        return domain.RenderContext(
            uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"nvmprov-golden/{self.id}")), ssh_port=SSH_PORT,
            pool_dir=POOL_DIR, console_log=f"/var/lib/nvmprov/state/{self.guest.name}/console.log",
            include_virtio_pmem=include_virtio_pmem,
        )

    def render(self, *, include_virtio_pmem: bool = False) -> str:
        return domain.render(self.plan(), self.context(include_virtio_pmem=include_virtio_pmem))


def cases() -> list[Case]:
    result = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        guests = spec.load(path).guests
        for g in guests:
            stem = path.stem if len(guests) == 1 else f"{path.stem}-{g.name}"
            result.append(Case(path.name, g, GOLDEN / f"{stem}.xml", len(guests) > 1))
    return result
