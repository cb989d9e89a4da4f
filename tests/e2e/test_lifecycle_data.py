"""A verified nvdimm guest keeps its data through save/restore, managed save and a libvirtd
restart (the life-cycle cases libvirt's QE runs for file-backed nvdimms), and the security
promises hold on it: private files, SSH forward on loopback only, host key pinned, no secrets
in reports or logs. One booted guest (e2e-rel-data) is shared; the libvirtd restart runs last.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nvmprov import seed

from .conftest import _require_host, destroy_quietly, guest_state_dir, nvmprov, write_spec

pytestmark = pytest.mark.e2e

NAME = "e2e-rel-data"
POOL_DIR = Path("/var/lib/nvmprov/pool")
DATA_FILE = "/mnt/data/lifecycle.bin"
LIBVIRTD_BACK_S = 60


@dataclass
class Guest:
    report: dict
    log_file: Path
    sha256: str

    @property
    def port(self) -> int:
        return int(self.report["guests"][0]["ssh"]["port"])


def guest_sha256() -> str:
    proc = nvmprov("ssh", NAME, "--", "sha256sum", DATA_FILE, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


def wait_for_ssh(deadline_s: float = 180) -> None:
    """After a restore the guest runs on at once; SSH answers within seconds."""
    deadline = time.monotonic() + deadline_s
    while True:
        proc = nvmprov("ssh", NAME, "--", "true", timeout_s=60)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"no SSH to {NAME} within {deadline_s:.0f}s: {proc.stderr[-1000:]}")
        time.sleep(3)


def domstate() -> str:
    return subprocess.run(["virsh", "domstate", NAME], capture_output=True, text=True, check=True).stdout.strip()


def assert_dax_mounted() -> None:
    proc = nvmprov("ssh", NAME, "--", "cat", "/proc/mounts", timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    line = next((ln for ln in proc.stdout.splitlines() if " /mnt/data " in ln), "")
    assert "dax" in line, proc.stdout


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    _require_host()
    tmp = tmp_path_factory.mktemp("rel-data")
    destroy_quietly(NAME)
    spec = {"name": NAME, "memory": "1GiB", "timeouts": {"ssh_s": 120},
            "pmem": [{"name": "data", "size": "128MiB", "filesystem": "ext4", "mount": "/mnt/data"}]}
    path = write_spec(tmp, NAME, spec)
    log_file = tmp / "create.log"
    proc = nvmprov("create", str(path), "--no-power-cycle", "--json", "--log-file", str(log_file))
    try:
        assert proc.returncode == 0, proc.stderr[-6000:]
        report = json.loads(proc.stdout)
        write = nvmprov("ssh", NAME, "--", "sudo", "sh", "-c",
                        f"'head -c 8388608 /dev/urandom > {DATA_FILE} && sync'", timeout_s=120)
        assert write.returncode == 0, write.stderr
        yield Guest(report, log_file, guest_sha256())
    finally:
        destroy_quietly(NAME)


def test_save_and_restore_keep_the_data(guest: Guest, tmp_path: Path) -> None:
    image = tmp_path / "saved.img"
    save = subprocess.run(["virsh", "save", NAME, str(image)], capture_output=True, text=True)
    assert save.returncode == 0, save.stderr
    assert domstate() == "shut off"
    restore = subprocess.run(["virsh", "restore", str(image)], capture_output=True, text=True)
    assert restore.returncode == 0, restore.stderr
    assert domstate() == "running"
    wait_for_ssh()
    assert guest_sha256() == guest.sha256
    assert_dax_mounted()


def test_managed_save_and_start_keep_the_data(guest: Guest) -> None:
    save = subprocess.run(["virsh", "managedsave", NAME], capture_output=True, text=True)
    assert save.returncode == 0, save.stderr
    assert domstate() == "shut off"
    start = nvmprov("start", NAME)  # nvmprov's own start resumes from the managed save image
    assert start.returncode == 0, start.stderr
    assert domstate() == "running"
    wait_for_ssh()
    assert guest_sha256() == guest.sha256
    assert_dax_mounted()


def test_host_key_mismatch_is_a_hard_failure(guest: Guest) -> None:
    pinned = guest_state_dir(NAME) / "host_ed25519.pub"
    original = pinned.read_bytes()
    pinned.write_text(seed.generate_keypair().public_openssh + "\n")
    try:
        began = time.monotonic()
        proc = nvmprov("verify", NAME, "--json", timeout_s=300)
        took_s = time.monotonic() - began
    finally:
        pinned.write_bytes(original)
    assert proc.returncode == 4, proc.stderr
    message = json.loads(proc.stdout)["guests"][0]["error"]["message"]
    assert f"host key mismatch for 127.0.0.1:{guest.port}" in message, message
    assert took_s < 60, f"a mismatch must not be retried until the deadline (took {took_s:.0f}s)"
    established = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{guest.port} )"],
                                 capture_output=True, text=True, check=True).stdout
    assert established.strip() == "", f"a connection to the guest was kept: {established}"


def test_private_files_are_not_world_readable(guest: Guest) -> None:
    assert stat.S_IMODE(guest_state_dir(NAME).stat().st_mode) == 0o700
    for path in guest_state_dir(NAME).iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"
    assert stat.S_IMODE(POOL_DIR.stat().st_mode) == 0o711, "the pool dir must not be listable"
    for path in POOL_DIR.glob(f"{NAME}-*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"
    assert {p.name for p in POOL_DIR.glob(f"{NAME}-*")} >= {f"{NAME}-pmem-data.raw", f"{NAME}-seed.iso"}


def _qemu_cmdline() -> list[str]:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and b"qemu-system" in args[0] and f"guest={NAME},".encode() in b" ".join(args):
            return [a.decode() for a in args]
    pytest.fail(f"no QEMU process for {NAME}")


def test_ssh_forward_is_bound_to_loopback_without_outbound(guest: Guest) -> None:
    netdevs = [a for a in _qemu_cmdline() if "hostfwd=" in a]
    assert len(netdevs) == 1, netdevs
    forwards = re.findall(r"hostfwd=([^,]+)", netdevs[0])
    assert forwards == [f"tcp:127.0.0.1:{guest.port}-:22"], forwards
    assert "restrict=on" in netdevs[0], "the guest must have no outbound network by default"


def _private_key_lines(text: str) -> list[str]:
    m = re.search(r"-----BEGIN OPENSSH PRIVATE KEY-----(.*?)-----END OPENSSH PRIVATE KEY-----", text, re.S)
    assert m, "no private key found where one was expected"
    return [ln.strip() for ln in m.group(1).split() if len(ln.strip()) >= 20]


def test_no_secret_in_reports_or_logs(guest: Guest) -> None:
    client = _private_key_lines((guest_state_dir(NAME) / "id_ed25519").read_text())
    host = _private_key_lines((POOL_DIR / f"{NAME}-seed.iso").read_bytes().decode("latin-1"))
    verify = nvmprov("verify", NAME, "--json", timeout_s=300)
    assert verify.returncode == 0, verify.stderr
    console = Path(f"/var/log/libvirt/qemu/{NAME}-nvmprov-serial.log").read_text(errors="replace")
    texts = {
        "create --json": json.dumps(guest.report), "create --log-file": guest.log_file.read_text(),
        "verify --json": verify.stdout, "verify stderr": verify.stderr, "console log": console,
    }
    assert texts["create --log-file"].strip(), "the log file must hold the progress lines"
    for where, text in texts.items():
        for line in client + host:
            assert line not in text, f"private key material in {where}"


def _libvirtd_pid() -> int:
    for pidfile in ("/run/libvirtd.pid", "/var/run/libvirtd.pid"):
        if os.path.exists(pidfile):
            return int(Path(pidfile).read_text().strip())
    out = subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True).stdout.split()
    assert out, "libvirtd is not running"
    return int(out[0])


@pytest.mark.restarts_libvirtd
def test_libvirtd_restart_keeps_the_guest_and_its_data(guest: Guest) -> None:
    # Last in this module on purpose: other engineers' runs see libvirtd gone for a few seconds.
    # The module runs after every other e2e module (conftest.py): the restart kills guests that hold
    # a live virtio-pmem device, the shared e2e guest among them.
    pid = _libvirtd_pid()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + LIBVIRTD_BACK_S
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["libvirtd", "-d"], check=True)
    while subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"libvirtd not back within {LIBVIRTD_BACK_S}s"
        time.sleep(0.5)
    assert domstate() == "running", "restarting libvirtd must not stop QEMU"
    assert guest_sha256() == guest.sha256
    verify = nvmprov("verify", NAME, "--json", timeout_s=300)
    assert verify.returncode == 0, verify.stderr
    region = json.loads(verify.stdout)["guests"][0]["regions"][0]
    assert region["dax"] is True and region["data_ok"] is True, region
