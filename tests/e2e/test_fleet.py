"""Fleets on real guests: examples/fleet.yaml (three guests) created in parallel, verified as a fleet,
reached by Ansible through `nvmprov list --format ansible`, destroyed with `destroy -f`; a fleet
whose one guest fails; and SIGTERM during a parallel create. Guests are named e2e-fleet*."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, _require_host, guest_state_dir, nvmprov

pytestmark = pytest.mark.e2e

POOL_DIR = Path("/var/lib/nvmprov/pool")


def fleet_spec(prefix: str) -> dict:
    """examples/fleet.yaml with its guests renamed PREFIX-1.. (user guests ci-* are never touched)."""
    spec = yaml.safe_load((REPO / "examples" / "fleet.yaml").read_text())
    for g in spec["guests"]:
        g["name"] = g["name"].replace("ci-", f"{prefix}-")
    return spec


def domains() -> set[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def leftovers(name: str) -> list[str]:
    left = [f"domain {name}"] if name in domains() else []
    left += [f"volume {p.name}" for p in sorted(POOL_DIR.glob(f"{name}-*"))]
    if guest_state_dir(name).exists():
        left.append(f"state dir of {name}")
    return left


@dataclass
class Fleet:
    path: Path
    names: list[str]
    proc: subprocess.CompletedProcess[str]
    report: dict
    wall_s: float


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    _require_host()
    spec = fleet_spec("e2e-fleet")
    names = [g["name"] for g in spec["guests"]]
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    nvmprov("destroy", "-f", str(path), "--purge", "--yes")
    began = time.monotonic()
    proc = nvmprov("create", str(path), "--no-power-cycle", "--parallel", "3", "--json")
    wall_s = time.monotonic() - began
    try:
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"fleet create printed no JSON (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                        f"{proc.stderr[-6000:]}")
        yield Fleet(path, names, proc, report, wall_s)
    finally:
        nvmprov("destroy", "-f", str(path), "--purge", "--yes")


def test_three_guests_created_in_parallel_all_verified(fleet: Fleet) -> None:
    assert fleet.proc.returncode == 0, fleet.proc.stderr[-6000:]
    assert [g["name"] for g in fleet.report["guests"]] == fleet.names
    for g in fleet.report["guests"]:
        assert g["ok"] is True, g
        assert g["regions"] and all(r["dax"] and r["data_ok"] and r["xip_ok"] for r in g["regions"]), g
    # parallel for real: the three boots overlapped (each guest's own timings add up to more than the wall)
    guest_time_s = sum(sum(g["timings_s"].values()) for g in fleet.report["guests"])
    print(f"fleet of 3: wall {fleet.wall_s:.1f}s, sum of guest phases {guest_time_s:.1f}s")
    assert fleet.wall_s < guest_time_s
    # each guest's progress carries its prefix
    for name in fleet.names:
        assert f"] {name}: ssh: waiting for SSH" in fleet.proc.stderr


def test_verify_f_checks_the_whole_fleet_with_a_summary(fleet: Fleet) -> None:
    proc = nvmprov("verify", "-f", str(fleet.path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["GUEST", "RESULT"])
    for name, line in zip(fleet.names, lines[head + 1:head + 4], strict=True):
        assert line.split()[:2] == [name, "ok"], line
    assert lines[-1].startswith("3/3 guests ok")


def test_ansible_inventory_reaches_every_guest(fleet: Fleet, tmp_path: Path) -> None:
    proc = nvmprov("list", "--format", "ansible", check=True)
    inventory = tmp_path / "inventory.json"
    inventory.write_text(proc.stdout)
    ansible = Path(sys.executable).with_name("ansible")
    assert ansible.exists(), "ansible-core is a test dependency: pip install -e '.[test]'"
    limit = ",".join(fleet.names)
    run = subprocess.run(
        [str(ansible), "-i", str(inventory), "nvmprov", "--limit", limit, "-m", "command", "-a", "cat /proc/mounts"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True", "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in fleet.names:
        assert f"{name} | CHANGED | rc=0" in run.stdout, run.stdout
    assert run.stdout.count("dax") >= 3  # every guest shows its -o dax mount (dax=always)


def test_a_failing_guest_is_rolled_back_alone(tmp_path: Path) -> None:
    _require_host()
    names = ["e2e-fleetfail-ok", "e2e-fleetfail-bad"]
    spec = {"version": 1, "defaults": {"memory": "512MiB", "pmem": [{"name": "data", "size": "64MiB"}]},
            "guests": [{"name": names[0]}, {"name": names[1], "image": "/nope.qcow2"}]}
    path = tmp_path / "fail.yaml"
    path.write_text(yaml.safe_dump(spec))
    try:
        proc = nvmprov("create", str(path), "--until", "define")
        assert proc.returncode == 3, proc.stderr  # the one failure is a host error
        assert names[0] in domains(), "the good guest must stay"
        assert leftovers(names[1]) == []
        assert f"{names[1]}: rolled back: volume {names[1]}-pmem-data.raw" in proc.stderr
        summary = proc.stdout.splitlines()
        assert any(ln.split()[:3] == [names[1], "FAILED", "volumes"] for ln in summary), proc.stdout
        assert any(ln.split()[:2] == [names[0], "ok"] for ln in summary), proc.stdout
        # destroy -f acts on the whole fleet and skips the guest that is already gone
        d = nvmprov("destroy", "-f", str(path), "--purge", "--yes")
        assert d.returncode == 0, d.stderr
        assert f"{names[1]}: no such domain; nothing to destroy" in d.stderr
        assert leftovers(names[0]) == []
    finally:
        nvmprov("destroy", "-f", str(path), "--purge", "--yes")


def test_sigterm_during_a_parallel_create_rolls_back_every_guest(tmp_path: Path) -> None:
    _require_host()
    names = ["e2e-fleetsig-1", "e2e-fleetsig-2"]
    spec = {"version": 1, "defaults": {"memory": "512MiB", "pmem": [{"name": "data", "size": "64MiB"}]},
            "guests": [{"name": n} for n in names]}
    path = tmp_path / "sig.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, "-m", "nvmprov", "create", str(path), "--until", "ssh",
                             "--parallel", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Both guests booting (their SSH wait started): the worst time to be interrupted.
        seen: list[str] = []
        deadline = time.monotonic() + 300
        assert proc.stderr is not None
        while len(seen) < 2 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += [n for n in names if f"] {n}: ssh: waiting for SSH" in line]
        assert len(seen) == 2, "both guests should have reached the SSH wait"
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=180)
        took_s = time.monotonic() - began
        assert proc.returncode == 130, rest[-3000:]
        assert "interrupted by SIGTERM" in rest
        for name in names:
            assert f"{name}: rolled back: domain {name}" in rest, rest[-3000:]
            assert leftovers(name) == []
        print(f"SIGTERM to rolled back in {took_s:.1f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        nvmprov("destroy", "-f", str(path), "--purge", "--yes")
