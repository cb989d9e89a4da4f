"""The fault matrix of docs/reliability.md against real libvirtd and QEMU.

Every case asserts the exit status, the message, and that nothing was lost or left behind: no
domain (`virsh list --all`), no volume of the guest in its pool, no state directory. Most cases
stop at `--until define|start` and boot nothing; three boot a guest (panic, SSH deadline, SIGINT
in the agent phase). Guests are named e2e-rel-*.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmprov import ledger, sizes
from tests import faultcli

from .conftest import REPO, _require_host, guest_state_dir, nvmprov, write_spec

pytestmark = pytest.mark.e2e

POOL_DIR = Path("/var/lib/nvmprov/pool")
NO_LIBVIRTD = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
PAUSE_WAIT_S = 480  # the agent phase needs a TCG boot first: 2-4 min on a busy 2-core host


@pytest.fixture(scope="module", autouse=True)
def host() -> None:
    _require_host()


def small(name: str, **extra: object) -> dict:
    """A guest that is cheap to define: 512 MiB RAM, one 64 MiB nvdimm."""
    return {"name": name, "memory": "512MiB", "pmem": [{"name": "data", "size": "64MiB"}], **extra}


def domains() -> set[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def leftovers(name: str, pool_dir: Path = POOL_DIR) -> list[str]:
    left = [f"domain {name}"] if name in domains() else []
    left += [f"volume {p}" for p in sorted(pool_dir.glob(f"{name}-*"))]
    state_dir = guest_state_dir(name)
    if state_dir.exists():
        left.append(f"state dir {state_dir}: {sorted(os.listdir(state_dir))}")
    return left


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("nvmprov: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def report_error(proc: subprocess.CompletedProcess[str]) -> str:
    try:
        guest = json.loads(proc.stdout)["guests"][0]
    except (ValueError, KeyError, IndexError):
        pytest.fail(f"no JSON report (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    assert guest["ok"] is False and guest["error"], guest
    return str(guest["error"]["message"])


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Names to destroy --purge after the test, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        nvmprov("destroy", name, "--purge", "--yes")


# ---------------------------------------------------------------------------------------------
# host faults: nothing boots


def test_libvirtd_unreachable_exits_3_and_makes_nothing(tmp_path: Path) -> None:
    # The client cannot tell a missing socket from a stopped daemon: both are ECONNREFUSED/ENOENT
    # on connect(2) to the UNIX socket, so a URI naming a socket nobody serves is the same fault.
    name = "e2e-rel-nodaemon"
    path = write_spec(tmp_path, name, small(name))
    proc = nvmprov("create", str(path), "--until", "define", "--connect", NO_LIBVIRTD)
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"cannot connect to libvirt at {NO_LIBVIRTD}" in line and "is libvirtd running?" in line
    assert leftovers(name) == []
    for args in (["list"], ["start", name], ["destroy", name], ["verify", name]):
        proc = nvmprov(*args, "--connect", NO_LIBVIRTD)
        assert proc.returncode == 3, (args, proc.stderr)
        assert "cannot connect to libvirt" in one_error_line(proc.stderr)


def test_missing_image_exits_3_and_rolls_back(tmp_path: Path) -> None:
    name = "e2e-rel-noimage"
    path = write_spec(tmp_path, name, small(name, image="/nope.qcow2"))
    proc = nvmprov("create", str(path), "--until", "define")
    assert proc.returncode == 3, proc.stderr
    assert "image /nope.qcow2: No such file or directory" in one_error_line(proc.stderr)
    assert "rolled back: volume e2e-rel-noimage-pmem-data.raw" in proc.stderr
    assert leftovers(name) == []


def test_size_beyond_free_space_exits_3_and_makes_nothing(tmp_path: Path) -> None:
    name = "e2e-rel-huge"
    free = os.statvfs(POOL_DIR)
    want_gib = (free.f_bavail * free.f_frsize) // 1024**3 + 64
    path = write_spec(tmp_path, name, small(name, pmem=[{"name": "data", "size": f"{want_gib}GiB"}]))
    proc = nvmprov("create", str(path), "--until", "define")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc.stderr)
    assert "bytes free; backing volume 'e2e-rel-huge-pmem-data.raw' needs" in line and "allocation: sparse" in line
    assert leftovers(name) == []


@pytest.fixture
def tiny_pool(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A pool named e2e-rel-tiny on a 24 MiB tmpfs at the path nvmprov gives that pool name."""
    from nvmprov.uris import pool_dir_for

    pool = "e2e-rel-tiny"
    mount = Path(pool_dir_for(pool))
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0711", "tmpfs", str(mount)], check=True)
    try:
        yield pool, mount
    finally:
        subprocess.run(["virsh", "-q", "pool-destroy", pool], capture_output=True)
        subprocess.run(["virsh", "-q", "pool-undefine", pool], capture_output=True)
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


def test_pool_full_exits_3_and_rolls_back(tmp_path: Path, tiny_pool: tuple[str, Path]) -> None:
    pool, mount = tiny_pool
    image = tmp_path / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    name = "e2e-rel-full"
    # the first 16 MiB region fits the 24 MiB tmpfs, the second does not: the first must be rolled back.
    regions = [{"name": "a", "size": "16MiB"}, {"name": "b", "size": "16MiB"}]
    path = write_spec(tmp_path, name, small(name, pool=pool, image=str(image), pmem=regions))
    proc = nvmprov("create", str(path), "--until", "define")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"storage pool '{pool}' ({mount}) has" in line and "e2e-rel-full-pmem-b.raw" in line
    assert "rolled back: volume e2e-rel-full-pmem-a.raw" in proc.stderr
    assert leftovers(name, mount) == []
    # only nvmprov's ownership ledger stays in the pool, and it records nothing any more
    assert sorted(os.listdir(mount)) == ["nvmprov-ledger-a.json", "nvmprov-ledger-b.json"]
    book = ledger.newest((Path(mount) / slot).read_bytes() for slot in ledger.SLOTS)
    assert book is not None and book.entries == ()


@pytest.fixture
def foreign_volume() -> Iterator[Path]:
    """A volume of the default pool that a test pre-creates, deleted afterwards."""
    made: list[str] = []

    def make(vol: str, size_bytes: int) -> Path:
        subprocess.run(["virsh", "-q", "vol-create-as", "nvmprov", vol, str(size_bytes), "--format", "raw"],
                       check=True, capture_output=True)
        made.append(vol)
        path = POOL_DIR / vol
        with open(path, "r+b") as fh:  # user data that must survive
            fh.write(b"precious user data " * 1000)
        return path

    yield make  # type: ignore[misc]
    for vol in made:
        subprocess.run(["virsh", "-q", "vol-delete", "--pool", "nvmprov", vol], capture_output=True)


def test_backing_volume_of_another_size_is_refused_untouched(tmp_path: Path, foreign_volume) -> None:
    name = "e2e-rel-size"
    vol = foreign_volume(f"{name}-pmem-data.raw", 32 * 1024**2)
    before = sha256(vol)
    path = write_spec(tmp_path, name, small(name, pmem=[{"name": "data", "size": "64MiB", "volume": vol.name}]))
    proc = nvmprov("create", str(path), "--until", "define")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"backing volume '{vol.name}' already exists" in line and "with 33554432 bytes" in line
    assert "never truncates or overwrites it" in line
    assert sha256(vol) == before and vol.stat().st_size == 32 * 1024**2
    assert leftovers(name) == [f"volume {vol}"]


def test_reused_backing_volume_survives_a_failed_create(tmp_path: Path, foreign_volume) -> None:
    """A volume the run adopted (`volume:`, not made) is user data: the rollback of a failed create keeps it."""
    name = "e2e-rel-reuse"
    vol = foreign_volume(f"{name}-pmem-data.raw", sizes.backing_bytes_for(64 * 1024**2))
    before = sha256(vol)
    adopt = [{"name": "data", "size": "64MiB", "volume": vol.name}]
    path = write_spec(tmp_path, name, small(name, image="/nope.qcow2", pmem=adopt))
    proc = nvmprov("create", str(path), "--until", "define")
    assert proc.returncode == 3, proc.stderr
    assert "image /nope.qcow2: No such file or directory" in one_error_line(proc.stderr)
    assert f"rolled back: volume {vol.name}" not in proc.stderr
    assert sha256(vol) == before
    assert leftovers(name) == [f"volume {vol}"]


def test_keep_on_failure_keeps_what_was_made_until_destroy(tmp_path: Path) -> None:
    name = "e2e-rel-keep"
    path = write_spec(tmp_path, name, small(name, image="/nope.qcow2"))
    proc = nvmprov("create", str(path), "--until", "define", "--keep-on-failure")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc.stderr)
    assert "image /nope.qcow2: No such file or directory" in line
    assert "rolled back" not in proc.stderr, proc.stderr  # the message must not claim a rollback that did not run
    assert f"domain {name}" in leftovers(name) and f"volume {POOL_DIR / (name + '-pmem-data.raw')}" in leftovers(name)
    proc = nvmprov("destroy", name, "--purge", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert leftovers(name) == []


def test_backing_volume_used_by_another_domain_is_refused(tmp_path: Path, foreign_volume) -> None:
    name, other = "e2e-rel-shared", "e2e-rel-foreign"
    vol = foreign_volume(f"{name}-pmem-data.raw", sizes.backing_bytes_for(64 * 1024**2))
    before = sha256(vol)
    xml = tmp_path / "foreign.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{other}</name><memory unit='MiB'>128</memory><os><type>hvm</type></os>"
        f"<devices><disk type='file' device='disk'><source file='{vol}'/><target dev='vdb' bus='virtio'/>"
        "</disk></devices></domain>"
    )
    subprocess.run(["virsh", "-q", "define", str(xml)], check=True, capture_output=True)
    try:
        path = write_spec(tmp_path, name, small(name))
        proc = nvmprov("create", str(path), "--until", "define")
        assert proc.returncode == 3, proc.stderr
        line = one_error_line(proc.stderr)
        assert f"backing volume {vol.name} of region data is used by domain(s) {other}" in line
        assert sha256(vol) == before
        assert other in domains()
        assert leftovers(name) == [f"volume {vol}"]
    finally:
        subprocess.run(["virsh", "-q", "undefine", other], capture_output=True)


# ---------------------------------------------------------------------------------------------
# signals and locks: a real create paused at a phase by NVMPROV_TEST_PAUSE_AT


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored and Python keeps an ignored SIGINT, so
    # when this suite runs in the background the child would shrug Ctrl-C off: restore it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PausedCreate:
    """`nvmprov create` in the background, paused at PHASE; stderr collected by a thread."""

    def __init__(self, spec_path: Path, phase: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faultcli", "create", str(spec_path), "--json", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, faultcli.PAUSE_ENV: phase},
            preexec_fn=_default_sigint,  # noqa: PLW1509 - a single-threaded signal reset only
        )
        self.lines: list[str] = []
        self.paused = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if faultcli.PAUSED_LINE in line:
                self.paused.set()

    def wait_paused(self, timeout_s: float = PAUSE_WAIT_S) -> None:
        if not self.paused.wait(timeout_s):
            self.proc.kill()
            pytest.fail(f"create never paused (exit {self.proc.poll()}):\n{''.join(self.lines)[-4000:]}")

    def signal(self, signum: int, timeout_s: float = 120) -> tuple[int, str, str]:
        self.proc.send_signal(signum)
        self.proc.wait(timeout=timeout_s)  # the JSON report on stdout is far below a pipe's buffer
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read()
        self._reader.join(timeout=10)
        return self.proc.returncode, stdout, "".join(self.lines)


@pytest.mark.parametrize(("phase", "signum"), [
    ("define", signal.SIGINT), ("volumes", signal.SIGINT), ("start", signal.SIGTERM), ("ssh", signal.SIGINT),
])
def test_signal_at_each_phase_rolls_back_everything(tmp_path: Path, cleanup: list[str], phase: str,
                                                    signum: int) -> None:
    name = f"e2e-rel-sig-{phase}"
    cleanup.append(name)
    path = write_spec(tmp_path, name, small(name))
    run = PausedCreate(path, phase)
    run.wait_paused()
    rc, _, stderr = run.signal(signum)
    assert rc == 130, stderr
    line = one_error_line(stderr)
    assert "interrupted" in line and "rolled back" in line
    if phase in ("start", "ssh"):
        assert "rolled back: volume e2e-rel-sig" in stderr  # there was something to undo
    assert leftovers(name) == []


def test_sigint_in_the_agent_phase_rolls_back_a_booted_guest(tmp_path: Path, cleanup: list[str]) -> None:
    name = "e2e-rel-sig-agent"
    cleanup.append(name)
    path = write_spec(tmp_path, name, small(name))
    run = PausedCreate(path, "agent")
    run.wait_paused()
    rc, _, stderr = run.signal(signal.SIGINT)
    assert rc == 130, stderr
    assert "rolled back: running guest e2e-rel-sig-agent" in stderr
    assert leftovers(name) == []


@pytest.mark.parametrize("phase", ["start", "ssh"])
def test_sigkill_then_rerun_cleans_up_and_completes(tmp_path: Path, cleanup: list[str], phase: str) -> None:
    name = f"e2e-rel-kill-{phase}"
    cleanup.append(name)
    path = write_spec(tmp_path, name, small(name))
    run = PausedCreate(path, phase)
    run.wait_paused()
    rc, _, _ = run.signal(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert name in domains(), "SIGKILL runs no rollback: the half-made guest must still be there"
    proc = nvmprov("create", str(path), "--until", "define")
    assert proc.returncode == 0, proc.stderr
    assert f"guest {name}: an earlier create did not finish; removing what it left" in proc.stderr
    assert f"removed leftover domain {name}" in proc.stderr
    again = nvmprov("create", str(path), "--until", "define")  # now complete: changes nothing
    assert again.returncode == 0 and "exists with this spec" in again.stderr, again.stderr
    assert "rolled back" not in again.stderr and "removed leftover" not in again.stderr
    state = subprocess.run(["virsh", "domstate", name], capture_output=True, text=True, check=True).stdout
    assert state.strip() == "shut off"


def test_second_create_of_the_same_name_fails_fast_naming_the_holder(tmp_path: Path, cleanup: list[str]) -> None:
    name = "e2e-rel-race"
    cleanup.append(name)
    path = write_spec(tmp_path, name, small(name))
    first = PausedCreate(path, "volumes", "--until", "define")
    first.wait_paused()
    began = time.monotonic()
    second = nvmprov("create", str(path), "--until", "define")
    took_s = time.monotonic() - began
    assert second.returncode == 3, second.stderr
    line = one_error_line(second.stderr)
    assert f"guest '{name}' is busy: another nvmprov holds its lock (pid {first.proc.pid})" in line
    assert took_s < 15, f"the loser must fail fast, took {took_s:.1f}s"
    assert name in domains(), "the loser must not touch the winner's guest"
    rc, _, stderr = first.signal(signal.SIGTERM)
    assert rc == 130, stderr
    assert leftovers(name) == []


def test_eight_creates_at_once_all_succeed_and_leave_nothing(tmp_path: Path, cleanup: list[str]) -> None:
    # `--until start` for 8: eight TCG boots to SSH at once on 2 cores did not finish within this
    # suite's 900 s test timeout (measured 2026-12-01, docs/reliability.md); the 3-guest fleet test
    # boots guests in parallel all the way through verification instead.
    names = [f"e2e-rel-par{i}" for i in range(8)]
    cleanup.extend(names)
    procs = []
    for name in names:
        path = write_spec(tmp_path, name, small(name))
        procs.append(subprocess.Popen([sys.executable, "-m", "nvmprov", "create", str(path), "--until", "start",
                                       "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=REPO))
    try:
        results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    finally:  # a timed-out test must not leave creates running behind the cleanup's back
        for p in procs:
            if p.poll() is None:
                p.terminate()  # SIGTERM: the create rolls back
                p.wait(timeout=120)
    ports = set()
    for name, ((stdout, stderr), rc) in zip(names, results, strict=True):
        assert rc == 0, f"{name}: exit {rc}\n{stderr[-3000:]}"
        ports.add(json.loads(stdout)["guests"][0]["ssh"]["port"])
        assert subprocess.run(["virsh", "domstate", name], capture_output=True, text=True).stdout.strip() == "running"
    assert len(ports) == 8, f"each guest needs its own SSH port: {ports}"
    for name in names:
        proc = nvmprov("destroy", name, "--purge", "--yes")
        assert proc.returncode == 0, proc.stderr
        assert leftovers(name) == []


# ---------------------------------------------------------------------------------------------
# guests that cannot be reached


def test_kernel_panic_fails_fast_with_the_console_tail(tmp_path: Path, cleanup: list[str]) -> None:
    name = "e2e-rel-panic"
    cleanup.append(name)
    path = write_spec(tmp_path, name, small(name, timeouts={"boot_s": 300}))
    began = time.monotonic()
    proc = nvmprov("create", str(path), "--until", "ssh", "--json",
                   env={faultcli.CMDLINE_ENV: "rdinit=/nonexistent"}, entry="tests.faultcli")
    took_s = time.monotonic() - began
    assert proc.returncode == 4, proc.stderr
    message = report_error(proc)
    assert f"guest {name} panicked while booting; last console lines:" in message
    assert "Kernel panic - not syncing" in message
    assert took_s < 120, f"a panic must end the wait at once, not at boot_s=300 (took {took_s:.0f}s)"
    assert leftovers(name) == []


def test_ssh_that_never_answers_times_out_with_the_console_tail(tmp_path: Path, cleanup: list[str]) -> None:
    # 3 s is less than the kernel alone takes to boot under TCG (the floor, ~5 s): SSH cannot answer
    # in time, and the deadline fires. (15 s stopped being enough: the guest now answers in ~11 s.)
    name = "e2e-rel-nossh"
    cleanup.append(name)
    path = write_spec(tmp_path, name, small(name, timeouts={"boot_s": 3}))
    began = time.monotonic()
    proc = nvmprov("create", str(path), "--until", "ssh", "--json")
    took_s = time.monotonic() - began
    assert proc.returncode == 4, proc.stderr
    message = report_error(proc)
    assert "127.0.0.1:" in message and "after 3 s" in message, message
    assert "last console lines" in message, message
    assert took_s < 90, took_s
    assert leftovers(name) == []
