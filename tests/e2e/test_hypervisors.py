"""One nvmprov, two hypervisors (issue 15): the same guest name on each keeps its own state, and
destroying one leaves the other whole; two URIs that reach one libvirtd are one hypervisor.

The second hypervisor is the session libvirtd of the unprivileged user nvmprov-e2e (the one
test_session.py uses), started by the test and reached by root through its UNIX socket. Nothing
boots: creates stop at `--until define`, on a tiny qcow2 image of the test's own. Guests: e2e-hv-*.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from nvmprov import identity

from .conftest import REPO, _require_host, nvmprov, write_spec
from .hosts import USER, e2e_user, loopback_sshd

pytestmark = pytest.mark.e2e

SYSTEM = "qemu:///system"
ALIAS = "qemu+unix:///system?socket=/var/run/libvirt/libvirt-sock"   # the same libvirtd by another URI
TWIN = "e2e-hv-twin"


def hypervisor_key(uri: str) -> str:
    conn = libvirt.open(uri)
    try:
        return identity.of(conn).key
    finally:
        conn.close()


@pytest.fixture(scope="module")
def session() -> Iterator[tuple[str, dict[str, str], Path]]:
    """(URI of nvmprov-e2e's session libvirtd, the environment nvmprov needs for it, a tiny image)."""
    _require_host()
    pw = e2e_user()
    runtime = pw.runtime
    env = ["env", "-i", f"HOME={pw.home}", f"XDG_RUNTIME_DIR={runtime}", "PATH=/usr/bin:/bin:/usr/sbin"]
    # virsh as the user autostarts its session daemon; root then reaches it through the socket
    subprocess.run(["runuser", "-u", USER, "--", *env, "virsh", "-c", "qemu:///session", "list"], check=True,
                   capture_output=True)
    work = pw.home / "t2-hypervisors"
    work.mkdir(mode=0o755, exist_ok=True)
    image = work / "tiny.qcow2"
    if not image.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    image.chmod(0o644)
    data = pw.home / ".local" / "share"
    data.mkdir(parents=True, exist_ok=True)
    for p in (pw.home / ".local", data):
        os.chown(p, pw.uid, pw.gid)
    # the session pool goes under the user's XDG data dir (uris.pool_dir_for), where its daemon can write
    yield (f"qemu+unix:///session?socket={runtime}/libvirt/libvirt-sock", {"XDG_DATA_HOME": str(data)}, image)


def spec(tmp_path: Path, name: str, image: Path) -> Path:
    return write_spec(tmp_path, name, {"name": name, "memory": "512MiB", "image": str(image),
                                       "pmem": [{"name": "data", "size": "16MiB"}]})


def listed(uri: str, env: dict[str, str] | None = None) -> dict[str, dict]:
    proc = nvmprov("list", "--format", "json", "--connect", uri, env=env)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_two_uris_of_one_libvirtd_are_one_hypervisor(tmp_path: Path, session) -> None:
    session_uri, _env, image = session
    assert hypervisor_key(SYSTEM) == hypervisor_key(ALIAS)
    assert hypervisor_key(session_uri) != hypervisor_key(SYSTEM)
    name = "e2e-hv-alias"
    try:
        assert nvmprov("create", str(spec(tmp_path, name, image)), "--until", "define").returncode == 0
        by_system, by_alias = listed(SYSTEM)[name], listed(ALIAS)[name]
        assert by_system["ssh"]["identity_file"] == by_alias["ssh"]["identity_file"]   # one state, not two
        assert Path(by_alias["ssh"]["identity_file"]).exists()
        # what nvmprov made through one URI is its own through the other
        proc = nvmprov("destroy", name, "--purge", "--yes", "--connect", ALIAS)
        assert proc.returncode == 0, proc.stderr
        assert f"deleted backing volume {name}-pmem-data.raw (--purge)" in proc.stderr
        assert not Path(by_system["ssh"]["identity_file"]).parent.exists()
    finally:
        nvmprov("destroy", name, "--purge", "--yes")


def test_one_guest_name_on_two_hypervisors_keeps_two_states(tmp_path: Path, session) -> None:
    session_uri, env, image = session
    path = spec(tmp_path, TWIN, image)
    try:
        proc = nvmprov("create", str(path), "--until", "define")
        assert proc.returncode == 0, proc.stderr
        proc = nvmprov("create", str(path), "--until", "define", "--connect", session_uri, env=env)
        assert proc.returncode == 0, proc.stderr
        on_system, on_session = listed(SYSTEM)[TWIN], listed(session_uri, env)[TWIN]
        key_system = Path(on_system["ssh"]["identity_file"])
        key_session = Path(on_session["ssh"]["identity_file"])
        assert key_system != key_session and key_system.read_text() != key_session.read_text()
        system_key_before = key_system.read_text()

        proc = nvmprov("destroy", TWIN, "--purge", "--yes", "--connect", session_uri, env=env)
        assert proc.returncode == 0, proc.stderr
        assert TWIN not in listed(session_uri, env) and not key_session.exists()
        # the system guest: still defined, its keys and volumes untouched, still nvmprov's
        row = listed(SYSTEM)[TWIN]
        assert row["ssh"]["identity_file"] == str(key_system) and key_system.read_text() == system_key_before
        assert (Path("/var/lib/nvmprov/pool") / f"{TWIN}-pmem-data.raw").exists()
        proc = nvmprov("show", TWIN, "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout)["ssh"]["identity_file"] == str(key_system), proc.stderr
    finally:
        nvmprov("destroy", TWIN, "--purge", "--yes", "--connect", session_uri, env=env)
        nvmprov("destroy", TWIN, "--purge", "--yes")


HV2 = "e2e-hv2"   # an ssh_config alias of the user's: the system libvirtd through a loopback sshd of the test


@dataclass
class FleetUser:
    """nvmprov-e2e, who reaches two hypervisors from spec files alone (spec files may not name
    sockets, programs or key files): its own session libvirtd (qemu:///session) and the system
    libvirtd as root through a loopback sshd (qemu+ssh://e2e-hv2/system, resolved by its
    ~/.ssh/config)."""

    name: str
    env: list[str]
    image: Path

    def nvmprov(self, *args: str, timeout_s: float = 1500) -> subprocess.CompletedProcess[str]:
        argv = ["runuser", "-u", self.name, "--", *self.env, sys.executable, "-m", "nvmprov", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)


@pytest.fixture(scope="module")
def fleet_user(session) -> Iterator[FleetUser]:
    _session_uri, _env, image = session
    pw = e2e_user()
    d = pw.home / "t2-hypervisors" / "ssh"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    ssh_dir = pw.home / ".ssh"
    config = ssh_dir / "config"
    try:
        with loopback_sshd(d) as port:
            for f in ("id", "id.pub", "known_hosts"):
                os.chown(d / f, pw.uid, pw.gid)
            os.chown(d, pw.uid, pw.gid)
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
            os.chown(ssh_dir, pw.uid, pw.gid)
            config.write_text(f"Host {HV2}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
                              f"  IdentityFile {d}/id\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
                              "  StrictHostKeyChecking yes\n")
            os.chown(config, pw.uid, pw.gid)
            config.chmod(0o600)
            env = ["env", "-i", f"HOME={pw.home}", f"USER={USER}", f"XDG_RUNTIME_DIR={pw.runtime}",
                   "PATH=/usr/bin:/bin:/usr/sbin", "LC_ALL=C.UTF-8"]
            yield FleetUser(USER, env, image)
    finally:
        config.unlink(missing_ok=True)


def fleet_file(user: FleetUser, *, image: str | None) -> tuple[Path, list[str]]:
    """Two guests, one on each hypervisor, each placed by its own `connect:`."""
    names = ["e2e-hv-f1", "e2e-hv-f2"]
    guests: list[dict[str, object]] = [{"name": names[0], "connect": "qemu:///session"},
                                       {"name": names[1], "connect": f"qemu+ssh://{HV2}/system"}]
    defaults: dict[str, object] = {"memory": "1GiB", "pmem": [{"name": "data", "size": "64MiB"}]}
    if image:
        defaults["image"] = image
    path = user.image.parent / "fleet.yaml"
    path.write_text(json.dumps({"version": 1, "defaults": defaults, "guests": guests}))
    path.chmod(0o644)
    return path, names


def rows_of(user: FleetUser) -> dict[str, str]:
    proc = user.nvmprov("list", "--all", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return {r["name"]: r["uri"] for r in json.loads(proc.stdout)}


def test_a_fleet_on_two_hypervisors_is_listed_and_destroyed_with_f(fleet_user: FleetUser) -> None:
    """No boot: created `--until define`; `list --all` and `destroy -f` follow each guest's connect."""
    path, names = fleet_file(fleet_user, image=str(fleet_user.image))
    try:
        proc = fleet_user.nvmprov("create", str(path), "--until", "define")
        assert proc.returncode == 0, proc.stderr
        where = rows_of(fleet_user)
        assert where[names[0]] == "qemu:///session" and where[names[1]] == f"qemu+ssh://{HV2}/system"
        assert names[1] in listed(SYSTEM)                      # really on the system libvirtd
        proc = fleet_user.nvmprov("destroy", "-f", str(path), "--purge", "--yes")
        assert proc.returncode == 0, proc.stderr
        assert not set(names) & set(rows_of(fleet_user)) and names[1] not in listed(SYSTEM)
    finally:
        fleet_user.nvmprov("destroy", "-f", str(path), "--purge", "--yes")


def test_a_fleet_on_two_hypervisors_is_verified_and_destroyed_with_f(fleet_user: FleetUser) -> None:
    """Boots two guests, one per hypervisor (the built-in image imported into the user's session
    pool; the system one uses root's): `verify -f` proves both, each where its `connect:` says,
    and `destroy -f` removes both. About 3-5 minutes under TCG on a 2-core host."""
    imported = fleet_user.nvmprov("image", "import", "/var/lib/nvmprov/pool", "--connect", "qemu:///session")
    assert imported.returncode == 0, imported.stderr
    path, names = fleet_file(fleet_user, image=None)
    try:
        proc = fleet_user.nvmprov("create", str(path), "--no-power-cycle", "--parallel", "2")
        assert proc.returncode == 0, proc.stderr[-4000:]
        proc = fleet_user.nvmprov("verify", "-f", str(path), "--json")
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout)
        assert report["ok"] is True and {g["name"] for g in report["guests"]} == set(names)
        assert all(r["dax"] and r["data_ok"] for g in report["guests"] for r in g["regions"])
        proc = fleet_user.nvmprov("destroy", "-f", str(path), "--purge", "--yes")
        assert proc.returncode == 0, proc.stderr
        assert not set(names) & set(rows_of(fleet_user))
    finally:
        fleet_user.nvmprov("destroy", "-f", str(path), "--purge", "--yes")
