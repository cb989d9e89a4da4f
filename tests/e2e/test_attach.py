"""attach/detach/show/prune against a real domain nvmprov did NOT create (its metadata stripped,
started with virsh), on this host's libvirt 9.0 + QEMU 7.2 under TCG. One boot for the module."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import PREFIX, _require_host, guest_state_dir, nvmprov, write_spec

pytestmark = pytest.mark.e2e

NAME = f"{PREFIX}attach-foreign"
NOMAX = f"{PREFIX}attach-nomax"
PLANTED = f"{PREFIX}attach-prune-pmem-x.raw"
POOL = "nvmprov"
METADATA_NS = "https://nvmprov.dev/xmlns/domain/1"
SSH_DEADLINE_S = 420.0


def virsh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["virsh", "-q", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def volumes() -> set[str]:
    return {line.split()[0] for line in virsh("vol-list", POOL).splitlines() if line.strip()}


def cleanup() -> None:
    for dom in (NAME, NOMAX):
        virsh("destroy", dom, check=False)
        virsh("undefine", dom, check=False)
    for vol in volumes():
        if vol.startswith(f"{PREFIX}attach-"):
            virsh("vol-delete", "--pool", POOL, vol, check=False)
    shutil.rmtree(guest_state_dir(NAME), ignore_errors=True)


@dataclass
class Foreign:
    name: str
    port: int
    key: Path
    known_hosts: Path

    def ssh(self, command: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10", "-p", str(self.port),
             "nvmprov@127.0.0.1", command], capture_output=True, text=True, timeout=timeout_s)

    def wait_ssh(self) -> None:
        deadline = time.monotonic() + SSH_DEADLINE_S
        while time.monotonic() < deadline:
            if self.ssh("true").returncode == 0:
                return
            time.sleep(3)
        pytest.fail(f"{self.name}: no SSH within {SSH_DEADLINE_S:.0f}s")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Foreign]:
    """nvmprov defines it (image, keys, seed), then it stops being nvmprov's: the metadata goes and
    virsh starts it. Its only region is virtio-pmem, which is never in the config, so the domain
    starts with no memory device at all (nvdimm support off in QEMU)."""
    _require_host()
    cleanup()
    tmp = tmp_path_factory.mktemp("attach")
    spec = {"version": 1, "name": NAME, "memory": "1GiB", "vcpus": 1,
            "pmem": [{"name": "seed", "size": "16MiB", "model": "virtio-pmem", "filesystem": "none"}]}
    proc = nvmprov("create", str(write_spec(tmp, NAME, spec)), "--until", "define", "--json", check=True)
    port = json.loads(proc.stdout)["guests"][0]["ssh"]["port"]
    virsh("metadata", NAME, METADATA_NS, "--remove", "--config")
    files = guest_state_dir(NAME)
    key = (files / "host_ed25519.pub").read_text().split()
    (files / "known_hosts").write_text(f"[127.0.0.1]:{port} {key[0]} {key[1]}\n")
    virsh("start", NAME)
    try:
        yield Foreign(NAME, port, files / "id_ed25519", files / "known_hosts")
    finally:
        cleanup()


def memory_devices(name: str, *, inactive: bool) -> list[str]:
    xml = virsh("dumpxml", name, *(["--inactive"] if inactive else []))
    return [part.split(">")[0] for part in xml.split("<memory model=")[1:]]


def test_foreign_domain_is_not_managed(foreign: Foreign) -> None:
    assert "nvmprov:" not in virsh("dumpxml", foreign.name, "--inactive")
    assert memory_devices(foreign.name, inactive=False) == []


def test_nvdimm_live_is_refused_with_the_ways_that_work(foreign: Foreign) -> None:
    before = (virsh("dumpxml", foreign.name), virsh("dumpxml", foreign.name, "--inactive"), volumes())
    proc = nvmprov("attach", foreign.name, "--size", "64MiB", "--name", "nv")
    assert proc.returncode == 2, proc.stderr
    assert "missing 'nvdimm' in '-M'" in proc.stderr
    assert "--model virtio-pmem" in proc.stderr and "--config" in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert (virsh("dumpxml", foreign.name), virsh("dumpxml", foreign.name, "--inactive"), volumes()) == before


def test_nvdimm_config_attach_and_detach(foreign: Foreign) -> None:
    proc = nvmprov("attach", foreign.name, "--size", "64MiB", "--name", "nv", "--config", "--json")
    assert proc.returncode == 0, proc.stderr
    (region,) = json.loads(proc.stdout)["guests"][0]["regions"]
    assert region["attached"] == "config" and region["backing_path"].endswith(f"{NAME}.domain.nv.raw")
    (dev,) = memory_devices(foreign.name, inactive=True)
    assert "'nvdimm'" in dev and "access='shared'" in dev
    assert memory_devices(foreign.name, inactive=False) == []     # at the next start, not now

    proc = nvmprov("detach", foreign.name, "nv", "--live")
    assert proc.returncode == 2
    assert "nvdimm device hot unplug is not supported yet" in proc.stderr and "--config" in proc.stderr
    assert len(memory_devices(foreign.name, inactive=True)) == 1

    proc = nvmprov("detach", foreign.name, "nv", "--config")
    assert proc.returncode == 0, proc.stderr
    assert memory_devices(foreign.name, inactive=True) == []
    assert f"{NAME}.domain.nv.raw" in volumes()   # the data stays without --purge


def test_domain_without_max_memory_gets_what_must_change(foreign: Foreign, tmp_path: Path) -> None:
    xml = virsh("dumpxml", foreign.name, "--inactive")
    start, end = xml.index("<maxMemory"), xml.index("</maxMemory>") + len("</maxMemory>")
    xml = xml[:start] + xml[end:]
    xml = xml.replace(f"<name>{foreign.name}</name>", f"<name>{NOMAX}</name>")
    xml = "\n".join(line for line in xml.splitlines() if "<uuid>" not in line)
    (tmp_path / "nomax.xml").write_text(xml)
    virsh("define", str(tmp_path / "nomax.xml"))
    before = (virsh("dumpxml", NOMAX, "--inactive"), volumes())
    proc = nvmprov("attach", NOMAX, "--size", "64MiB", "--name", "x")
    assert proc.returncode == 2, proc.stderr
    assert "has no <maxMemory>" in proc.stderr and "<maxMemory slots=" in proc.stderr
    assert (virsh("dumpxml", NOMAX, "--inactive"), volumes()) == before
    virsh("undefine", NOMAX)


def test_prune_removes_only_unreferenced_volumes_nvmprov_made(foreign: Foreign) -> None:
    """The region detached above (kept) goes; a volume planted under a name like nvmprov's stays."""
    virsh("vol-create-as", POOL, PLANTED, "16M", "--format", "raw")
    overlay, detached = f"{NAME}-root.qcow2", f"{NAME}.domain.nv.raw"  # the running domain's disk; made by attach
    proc = nvmprov("prune", "--only", f"{PREFIX}attach-*")      # no TTY, no --yes: list and refuse
    assert proc.returncode == 2 and detached in proc.stdout and overlay not in proc.stdout
    assert PLANTED not in proc.stdout and detached in volumes()
    proc = nvmprov("prune", "--only", f"{PREFIX}attach-*", "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    deleted = json.loads(proc.stdout)["deleted"]
    assert detached in deleted and PLANTED not in deleted
    left = volumes()
    assert PLANTED in left and detached not in left and overlay in left and f"{NAME}-seed.iso" in left


def test_virtio_pmem_live_reaches_the_guest(foreign: Foreign) -> None:
    foreign.wait_ssh()
    before = set(foreign.ssh("ls /dev/ | grep '^pmem' || true").stdout.split())
    t0 = time.monotonic()
    proc = nvmprov("attach", foreign.name, "--size", "128MiB", "--model", "virtio-pmem", "--name", "vp", "--json")
    took_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    (dev,) = memory_devices(foreign.name, inactive=False)
    assert "'virtio-pmem'" in dev and "access='shared'" in dev
    assert memory_devices(foreign.name, inactive=True) == []     # live only: libvirt 9.0 cannot boot it
    new: set[str] = set()
    deadline = time.monotonic() + 30
    while not new and time.monotonic() < deadline:
        new = set(foreign.ssh("ls /dev/ | grep '^pmem' || true").stdout.split()) - before
        time.sleep(1)
    assert len(new) == 1, f"guest saw no new /dev/pmemN (before {before})"
    print(f"virtio-pmem live attach: {took_s:.1f}s, guest device /dev/{new.pop()}")

    shown = json.loads(nvmprov("show", foreign.name, "--json", check=True).stdout)
    assert [(r["name"], r["model"], r["where"]) for r in shown["regions"]] == [("vp", "virtio-pmem", "live")]
    assert shown["free_slots"] == shown["slots"] - 1

    proc = nvmprov("detach", foreign.name, "vp")
    assert proc.returncode == 3
    assert "virtio based memory devices cannot be unplugged" in proc.stderr
    assert len(memory_devices(foreign.name, inactive=False)) == 1
