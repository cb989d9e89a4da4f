"""Set-ups several e2e modules share: the unprivileged user nvmprov-e2e, and an sshd of the test's
own on 127.0.0.1 (a free port, its own host key, root login by a generated key)."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "nvmprov-e2e"
SSHD_START_S = 30.0


@dataclass(frozen=True)
class E2eUser:
    name: str
    uid: int
    gid: int
    home: Path
    runtime: Path   # XDG_RUNTIME_DIR: libvirt's session socket goes there


def e2e_user() -> E2eUser:
    """nvmprov-e2e (made when missing, never root), with the runtime directory a login would give it."""
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        pw = pwd.getpwnam(USER)
    assert pw.pw_uid != 0
    runtime = Path(f"/run/user/{pw.pw_uid}")
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(runtime, pw.pw_uid, pw.pw_gid)
    return E2eUser(USER, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), runtime)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nvmprov-e2e", "-f", str(path)],
                   check=True)


def wait_listening(port: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"the test sshd did not listen on 127.0.0.1:{port} within {deadline_s:.0f}s")


@contextmanager
def loopback_sshd(d: Path, *, sshd: str = "/usr/sbin/sshd", extra_config: str = "") -> Iterator[int]:
    """An sshd on 127.0.0.1:PORT (yielded) with its files in D: host_key, id (the client key root
    logs in with), known_hosts (the host key for [127.0.0.1]:PORT), sshd.log. Stopped by its pid."""
    port = free_port()
    keygen(d / "host_key")
    keygen(d / "id")
    (d / "authorized_keys").write_bytes((d / "id.pub").read_bytes())
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nAllowTcpForwarding yes\nStrictModes no\n{extra_config}")
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    subprocess.run([sshd, "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], check=True)
    try:
        wait_listening(port, SSHD_START_S)
        yield port
    finally:
        if (d / "sshd.pid").exists():
            os.kill(int((d / "sshd.pid").read_text()), signal.SIGTERM)  # the sshd started here, by its pid
