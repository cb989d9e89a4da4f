"""qemu:///session without root: an unprivileged user made by the test (nvmprov-e2e) imports the
root-built image into its own pool, creates e2e-session (QEMU running as that user, pool and state
under its XDG directories), and destroys it. Commands run with `runuser -u nvmprov-e2e --`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, _require_host
from .hosts import USER, e2e_user

pytestmark = pytest.mark.e2e

NAME = "e2e-session"
SYSTEM_POOL = Path("/var/lib/nvmprov/pool")


@dataclass
class User:
    name: str
    uid: int
    home: Path
    env: dict[str, str]

    def nvmprov(self, *args: str, timeout_s: float = 1500) -> subprocess.CompletedProcess[str]:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        argv = ["runuser", "-u", self.name, "--", "env", "-i", *env.split(), sys.executable, "-m", "nvmprov", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)


@pytest.fixture(scope="module")
def user() -> User:
    _require_host()
    u = e2e_user()
    env = {"HOME": str(u.home), "USER": USER, "XDG_RUNTIME_DIR": str(u.runtime), "PATH": "/usr/bin:/bin:/usr/sbin",
           "LC_ALL": "C.UTF-8"}
    return User(USER, u.uid, u.home, env)


@dataclass
class SessionGuest:
    user: User
    proc: subprocess.CompletedProcess[str]
    report: dict


@pytest.fixture(scope="module")
def session_guest(user: User) -> Iterator[SessionGuest]:
    imported = user.nvmprov("image", "import", str(SYSTEM_POOL), "--connect", "qemu:///session")
    assert imported.returncode == 0, (
        f"image import as {USER} failed (scripts/test.sh builds the image as root first):\n{imported.stderr[-3000:]}")
    spec_path = user.home / f"{NAME}.yaml"
    spec_path.write_text(yaml.safe_dump({"version": 1, "name": NAME, "connect": "qemu:///session",
                                         "memory": "1GiB", "pmem": [{"name": "data", "size": "128MiB"}]}))
    os.chown(spec_path, user.uid, -1)
    user.nvmprov("destroy", NAME, "--purge", "--yes", "--connect", "qemu:///session")
    proc = user.nvmprov("create", str(spec_path), "--no-power-cycle", "--json")
    try:
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"session create printed no JSON (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        yield SessionGuest(user, proc, report)
    finally:
        user.nvmprov("destroy", NAME, "--purge", "--yes", "--connect", "qemu:///session")


def test_session_guest_is_created_and_verified_without_root(session_guest: SessionGuest) -> None:
    assert session_guest.proc.returncode == 0, session_guest.proc.stderr[-6000:]
    g = session_guest.report["guests"][0]
    assert g["ok"] is True, g
    region = g["regions"][0]
    assert region["dax"] and region["xip_ok"] and region["data_ok"], region
    home = str(session_guest.user.home)
    assert region["backing_path"].startswith(f"{home}/.local/share/nvmprov/pool/"), region
    assert g["ssh"]["identity_file"].startswith(f"{home}/.local/state/nvmprov/"), g["ssh"]


def test_qemu_runs_as_the_user(session_guest: SessionGuest) -> None:
    owners = []
    for proc in Path("/proc").iterdir():  # not ps: its columns get cut to $COLUMNS under pytest
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            uid = proc.stat().st_uid
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and f"guest={NAME},".encode() in b" ".join(argv):
            owners.append(uid)
    assert owners, "no QEMU process for the session guest"
    assert owners == [session_guest.user.uid] * len(owners), owners


def test_nothing_landed_in_the_system_libvirt(session_guest: SessionGuest) -> None:
    names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert NAME not in names
    assert not list(SYSTEM_POOL.glob(f"{NAME}-*"))


def test_list_and_destroy_as_the_user(session_guest: SessionGuest) -> None:
    user = session_guest.user
    listed = user.nvmprov("list", "--format", "json", "--connect", "qemu:///session")
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)] == [NAME]
    state = user.home / ".local/state/nvmprov"
    assert len(list(state.glob(f"hypervisors/*/guests/{NAME}"))) == 1, "the check below would be vacuous"
    gone = user.nvmprov("destroy", NAME, "--purge", "--yes", "--connect", "qemu:///session")
    assert gone.returncode == 0, gone.stderr
    assert not list((user.home / ".local/share/nvmprov/pool").glob(f"{NAME}-*"))
    assert list(state.glob(f"hypervisors/*/guests/{NAME}")) == []   # state lives under the hypervisor's identity
    assert not (state / "guests" / NAME).exists()                   # nor under the layout before it
