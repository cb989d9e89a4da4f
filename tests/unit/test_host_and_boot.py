"""Pure pieces of the host side: acceleration facts, boot watching, port choice, locks, rollback."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import textwrap

import pytest

from nvmprov import boot, host, state
from nvmprov.errors import GuestError, LockedError
from nvmprov.progress import Progress
from nvmprov.rollback import Rollback

CAPS = """<capabilities><host><cpu><arch>x86_64</arch><model>kvm64</model>{features}</cpu></host>
<guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/>{kvm}</arch></guest></capabilities>"""


@pytest.mark.parametrize(
    ("features", "kvm", "expected"),
    [
        ("<feature name='hypervisor'/>", "<domain type='kvm'/>", (True, False)),  # paravirtual /dev/kvm: here
        ("<feature name='vmx'/>", "<domain type='kvm'/>", (True, True)),
        ("<feature name='svm'/>", "", (False, True)),
        ("", "", (False, False)),
    ],
)
def test_kvm_facts_reads_domain_types_and_cpu_flags(features: str, kvm: str, expected: tuple[bool, bool]) -> None:
    assert host.kvm_facts(CAPS.format(features=features, kvm=kvm)) == expected


def test_kvm_facts_ignores_other_arches() -> None:
    caps = CAPS.format(features="<feature name='vmx'/>", kvm="").replace(
        "</capabilities>", "<guest><arch name='aarch64'><domain type='kvm'/></arch></guest></capabilities>"
    )
    assert host.kvm_facts(caps) == (False, True)


def check(name: str, log_path: str, *, active: bool) -> None:
    """What proof.open_session does between SSH attempts, on a local serial log."""
    boot.check_boot_text(name, boot.read_tail(log_path, max_lines=200), active=active)


def test_panic_detected_in_console_tail(tmp_path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("Booting\n[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    with pytest.raises(GuestError, match="panicked") as info:
        check("g", str(log), active=True)
    assert "Unable to mount root fs" in str(info.value)


def test_dead_domain_reported_with_tail(tmp_path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("line one\nline two\n")
    with pytest.raises(GuestError, match="stopped while booting") as info:
        check("g", str(log), active=False)
    assert "line two" in str(info.value)


def test_healthy_boot_passes(tmp_path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("Linux version 6.1\n")
    check("g", str(log), active=True)
    check("g", str(tmp_path / "missing.log"), active=True)


def test_free_port_skips_claimed_and_listening_ports() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        candidates = [taken, taken + 1 if taken < 65535 else taken - 1]
        claimed = {candidates[1]}
        with pytest.raises(Exception, match="no free SSH port"):
            boot.free_port(claimed, candidates)
    port = boot.free_port(set(), [taken])
    assert port == taken


def test_lock_fails_fast_naming_the_holder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from nvmprov import state
            with state.lock("demo"):
                print("held", flush=True)
                time.sleep(30)
        """)],
        stdout=subprocess.PIPE, text=True, env={"NVMPROV_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid}"), state.lock("demo"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with state.lock("demo"):  # released when the holder died
        pass
    assert oct((tmp_path / "locks").stat().st_mode & 0o777) == "0o700"


def test_guest_files_are_private(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    files = state.guest_files("demo")
    state.write_private(files.client_key, b"secret")
    assert files.client_key.stat().st_mode & 0o777 == 0o600
    assert files.dir.stat().st_mode & 0o777 == 0o700


def test_rollback_undoes_in_reverse_and_survives_failures() -> None:
    done: list[str] = []
    undo = Rollback(Progress(io.StringIO()))
    undo.add("a", lambda: done.append("a"))
    undo.add("broken", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    undo.add("c", lambda: done.append("c"))
    problems = undo.run()
    assert done == ["c", "a"]
    assert problems == ["broken: boom"]
    assert undo.run() == []  # nothing left to undo


def test_committed_rollback_undoes_nothing() -> None:
    done: list[str] = []
    undo = Rollback(Progress(io.StringIO()))
    undo.add("a", lambda: done.append("a"))
    undo.commit()
    assert undo.run() == [] and done == []


def test_pool_lock_is_shared_by_creates_and_exclusive_for_prune(tmp_path, monkeypatch) -> None:
    """flocks are per open file description: two opens in one process behave like two processes."""
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    with state.pool_lock("hv", "p"), state.pool_lock("hv", "p"):  # two creates at once
        with pytest.raises(LockedError, match="pool 'p' is busy"), state.pool_lock("hv", "p", exclusive=True):
            pass
        with state.pool_lock("hv", "other", exclusive=True):  # another pool is another lock
            pass
    with state.pool_lock("hv", "p", exclusive=True):  # released when the creates ended
        pass


def test_seed_failure_on_the_console_stops_the_wait(tmp_path) -> None:
    """apply_seed.sh's error line ends the SSH wait at once (no login can work), with the console."""
    log = tmp_path / "serial.log"
    log.write_text("[  OK  ] Started x\nnvmprov-seed: error: seed file nvmprov/extra not implemented by the image\n")
    with pytest.raises(GuestError, match="could not apply its seed") as info:
        check("g", str(log), active=True)
    assert "nvmprov/extra not implemented" in str(info.value)
    log.write_text("nvmprov-seed: applied (host g, user u, instance i) in 3.1 s\n")
    check("g", str(log), active=True)


def test_seed_applied_is_the_appliers_own_last_line() -> None:
    """The SSH wait opens on the line apply_seed.sh prints once eth0 has its address (and stops on
    its error line): the markers are the script's own words."""
    from nvmprov import image

    applier = (image.RECIPE_DIR / "files/usr/local/lib/nvmprov/apply_seed.sh").read_text()
    say = 'say() {\n    echo "nvmprov-seed: $*"\n    [ -z "$CONSOLE" ] || echo "nvmprov-seed: $*" > "$CONSOLE"'
    assert say in applier
    # ... straight onto the console: through journald (journal+console) it came 4-9 s late
    assert "    CONSOLE=/dev/console\n" in applier.split("main() {", 1)[1].split("mount_seed", 1)[0]
    unit = (image.RECIPE_DIR / "files/etc/systemd/system/nvmprov-seed.service").read_text()
    assert "StandardOutput=journal\n" in unit and "StandardError=journal\n" in unit
    assert 'say "applied (host' in applier and 'fail() { say "error: $*"' in applier
    assert applier.index("    set_network\n") < applier.index('say "applied (host')
    assert boot.seed_applied("x\r\nnvmprov-seed: applied (host g, user u, instance i) in 3.1 s\r\n")
    assert not boot.seed_applied("nvmprov-seed: error: no cidata CD\n")
    assert not boot.seed_applied("")


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_seed_line_gate_opens_on_the_line_and_only_then() -> None:
    clock, console = _Clock(), ["[    0.0] Linux version 6.1"]
    gate = boot.SeedLineGate(lambda: console[0], now=clock)
    clock.t += 30
    assert not gate()  # the console is readable and the seed is not applied yet
    console[0] += "\nnvmprov-seed: applied (host g, user u, instance i) in 1.0 s\n"
    assert gate()


def test_seed_line_gate_gives_up_on_a_silent_console_and_after_its_limit() -> None:
    """An unreadable console (a remote hypervisor's root-owned log reads as '') must not hold SSH
    back for the whole limit; a readable one without the line holds it SEED_LINE_WAIT_S at most."""
    clock = _Clock()
    silent = boot.SeedLineGate(lambda: "", now=clock)
    clock.t += boot.CONSOLE_SILENT_S - 1
    assert not silent()  # the kernel may not have printed yet
    clock.t += 1
    assert silent()
    clock = _Clock()
    talking = boot.SeedLineGate(lambda: "[    0.0] Linux version 6.1\n", now=clock)
    clock.t += boot.SEED_LINE_WAIT_S - 1
    assert not talking()
    clock.t += 1
    assert talking()
