"""Reliability pieces that need no libvirt: names at the path boundary, the fault-test hooks.

The faults themselves (signals, locks, full pools, panics) run against real libvirt in
tests/e2e/test_faults.py; docs/reliability.md maps each case to its test.
"""

from __future__ import annotations

import io
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

import nvmprov
from nvmprov import domain, plan, spec, state
from nvmprov.cli import exit_status
from nvmprov.errors import Interrupted, UsageError
from nvmprov.progress import Progress
from tests import faultcli

HOSTILE_NAMES = ["../x", "a/b", "x/../../etc/passwd", ".hidden", "-rf", "", "A", "a b", "a\x00b", "ａ",
                 "dеmo", "a" * 64, "x;rm -rf /", "<x>&"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_lock_refuses_names_that_are_not_guest_names(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(UsageError, match="is not an nvmprov guest name") as info, state.lock(name):
        pass
    assert exit_status(info.value) == 2
    assert not (tmp_path / "state").exists(), "a refused name must not create any file"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_guest_files_refuse_names_that_are_not_guest_names(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(UsageError):
        state.guest_files(name)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("name", ["a", "demo", "e2e-rel-x1", "9" * 63])
def test_valid_guest_names_pass_the_path_check(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    with state.lock(name):
        assert state.guest_files(name).dir == tmp_path / "guests" / name


def test_path_check_agrees_with_the_spec_rule() -> None:
    # Every name the spec accepts must reach its state files, every path-like one must not.
    for name in ("a", "a-1", "0x", "z" * 63):
        spec.loads(f"name: {name}\npmem: [{{name: d, size: 64MiB}}]\n")
        assert state.check_name(name) == name


def _alarm_raises_interrupted(after_s: float) -> None:
    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, after_s)


def test_pause_hook_waits_at_its_phase_until_a_signal() -> None:
    lines: list[str] = []
    old = signal.getsignal(signal.SIGALRM)
    try:
        _alarm_raises_interrupted(0.3)
        began = time.monotonic()
        with pytest.raises(Interrupted):
            faultcli.pause_at("volumes", "volumes", lines.append)
        assert time.monotonic() - began < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert lines and lines[0].startswith(f"{faultcli.PAUSED_LINE} volumes (pid ")


def test_pause_hook_is_inert_elsewhere() -> None:
    lines: list[str] = []
    faultcli.pause_at("volumes", None, lines.append)
    faultcli.pause_at("volumes", "start", lines.append)
    assert lines == []


def test_progress_phase_pauses_before_its_body_runs() -> None:
    restore = faultcli.install({faultcli.PAUSE_ENV: "define"})
    out = io.StringIO()
    ran: list[str] = []
    old = signal.getsignal(signal.SIGALRM)
    try:
        _alarm_raises_interrupted(0.3)
        with pytest.raises(Interrupted), Progress(out).phase("define"):
            ran.append("body")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        restore()
    assert ran == [], "the phase's side effects must not have started when the test signals"
    assert f"{faultcli.PAUSED_LINE} define" in out.getvalue()
    with Progress(io.StringIO()).phase("define"):  # restored: the product never pauses
        ran.append("body")
    assert ran == ["body"]


def _direct_plan() -> plan.Plan:
    g = spec.loads("name: demo\npmem: [{name: d, size: 64MiB}]\n").guests[0]
    facts = plan.HostFacts(builtin_volumes=("base.qcow2", "vmlinuz", "initrd.img"))
    return plan.build(g, facts)


def test_kernel_cmdline_hook_appends_only_when_asked() -> None:
    the_plan = _direct_plan()
    assert the_plan.kernel_cmdline
    assert faultcli.kernel_cmdline(the_plan, "") is the_plan
    assert faultcli.kernel_cmdline(the_plan, "rdinit=/nonexistent").kernel_cmdline == (
        f"{the_plan.kernel_cmdline} rdinit=/nonexistent"
    )
    firmware_boot = replace(the_plan, kernel_cmdline=None)
    assert faultcli.kernel_cmdline(firmware_boot, "rdinit=/nonexistent") is firmware_boot
    ctx = domain.RenderContext(uuid="00000000-0000-4000-8000-000000000000", ssh_port=2222, pool_dir="/p",
                               console_log="/l")
    restore = faultcli.install({faultcli.CMDLINE_ENV: "rdinit=/nonexistent"})
    try:
        assert "rdinit=/nonexistent" in domain.render(the_plan, ctx)
    finally:
        restore()
    assert "rdinit=/nonexistent" not in domain.render(the_plan, ctx)


def test_no_product_module_reads_test_hooks() -> None:
    package = Path(nvmprov.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "NVMPROV_TEST" not in text and "testhooks" not in text, path


class _GoneReader(io.StringIO):
    """stderr whose reader went away: every write is EPIPE."""

    def write(self, _text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_progress_to_a_gone_reader_does_not_raise() -> None:
    progress = Progress(_GoneReader(), log=_GoneReader())
    progress.line("still fine")
    with progress.phase("define"):
        pass
    assert "define" in progress.timings_s


def test_rollback_finishes_when_stderr_is_a_broken_pipe() -> None:
    # Found by the agent-phase fault test: the first "rolled back" line raised EPIPE and the
    # volumes and domain were left behind.
    from nvmprov.rollback import Rollback

    done: list[str] = []
    undo = Rollback(Progress(_GoneReader()))
    for what in ("domain", "volume a", "volume b", "running guest"):
        undo.add(what, lambda what=what: done.append(what))
    assert undo.run() == []
    assert done == ["running guest", "volume b", "volume a", "domain"]


def test_sighup_rolls_back_like_sigterm(tmp_path: Path) -> None:
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import signal, sys, time\n"
            "from nvmprov import cli\n"
            "from nvmprov.errors import Interrupted\n"
            "cli.COMMANDS['list'] = lambda a: (print('ready', flush=True), time.sleep(30), 0)[2]\n"
            "sys.exit(cli.main(['list']))\n"
        )],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGHUP)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert "interrupted by SIGHUP; what this run made was rolled back" in err
