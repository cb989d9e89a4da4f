"""One nvmprov, two hypervisors (issue 15): the same guest name on each keeps its own state, and
destroying one leaves the other whole; two URIs that reach one libvirtd are one hypervisor.

The second hypervisor is the session libvirtd of the unprivileged user nvmprov-e2e (the one
test_session.py uses), started by the test and reached by root through its UNIX socket. Nothing
boots: creates stop at `--until define`, on a tiny qcow2 image of the test's own. Guests: e2e-hv-*.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from nvmprov import identity

from .conftest import _require_host, nvmprov, write_spec

pytestmark = pytest.mark.e2e

USER = "nvmprov-e2e"
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
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        pw = pwd.getpwnam(USER)
    runtime = Path(f"/run/user/{pw.pw_uid}")
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(runtime, pw.pw_uid, pw.pw_gid)
    env = ["env", "-i", f"HOME={pw.pw_dir}", f"XDG_RUNTIME_DIR={runtime}", "PATH=/usr/bin:/bin:/usr/sbin"]
    # virsh as the user autostarts its session daemon; root then reaches it through the socket
    subprocess.run(["runuser", "-u", USER, "--", *env, "virsh", "-c", "qemu:///session", "list"], check=True,
                   capture_output=True)
    work = Path(pw.pw_dir) / "t2-hypervisors"
    work.mkdir(mode=0o755, exist_ok=True)
    image = work / "tiny.qcow2"
    if not image.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    image.chmod(0o644)
    data = Path(pw.pw_dir) / ".local" / "share"
    data.mkdir(parents=True, exist_ok=True)
    for p in (Path(pw.pw_dir) / ".local", data):
        os.chown(p, pw.pw_uid, pw.pw_gid)
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
