"""fleet.run_parallel with real threads, real Progress objects and a real signal: concurrency bound,
failure isolation, exit codes, and a SIGINT that rolls every running guest back."""

from __future__ import annotations

import io
import signal
import threading
import time

import pytest

from nvmprov import fleet
from nvmprov.cli import exit_status
from nvmprov.errors import GuestError, HostError, Interrupted, UsageError
from nvmprov.progress import CancelToken, Progress
from nvmprov.report import GuestReport
from nvmprov.rollback import Rollback


def ok_report(name: str) -> GuestReport:
    g = GuestReport(name=name)
    g.settle()
    return g


class Tracker:
    """Counts how many jobs run at once, and which rolled back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.started: list[str] = []
        self.rolled_back: list[str] = []

    def job(self, name: str, *, work_s: float = 0.3, fail: BaseException | None = None):
        def run(progress: Progress, report: GuestReport) -> GuestReport:
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
                self.started.append(name)
            report.accel = "tcg"  # filled before anything fails: the fleet must keep it
            undo = Rollback(progress)
            undo.add("everything", lambda: progress.checkpoint())  # a checkpoint inside a rollback: inert
            try:
                end = time.monotonic() + work_s
                while time.monotonic() < end:  # a create's stages, each a checkpoint
                    with progress.phase("step"):
                        progress.line("working")
                        time.sleep(0.02)
                if fail is not None:
                    raise fail
                report.settle()
                return report
            except Interrupted:
                assert undo.run() == []
                with self.lock:
                    self.rolled_back.append(name)
                raise
            finally:
                with self.lock:
                    self.running -= 1
        return run


def test_default_parallel_is_bounded_by_cores_and_guests() -> None:
    assert fleet.default_parallel(3, cores=2) == 2
    assert fleet.default_parallel(1, cores=8) == 1
    assert fleet.default_parallel(5, cores=0) == 1


def test_at_most_parallel_jobs_run_at_once_and_all_finish() -> None:
    t = Tracker()
    jobs = [(f"g{i}", t.job(f"g{i}")) for i in range(5)]
    result = fleet.run_parallel(jobs, parallel=2, stream=io.StringIO())
    assert t.peak == 2
    assert [o.report.name for o in result.outcomes] == [f"g{i}" for i in range(5)]  # spec order, not finish order
    assert all(o.report.ok for o in result.outcomes)
    assert exit_status(result) == 0
    # five 0.3 s jobs two at a time: about 0.9 s, well under the 1.5 s one at a time
    assert result.wall_s < 1.4


def test_a_failing_guest_fails_alone_with_its_exit_code() -> None:
    t = Tracker()
    jobs = [("a", t.job("a")), ("b", t.job("b", fail=HostError("pool full"))), ("c", t.job("c"))]
    result = fleet.run_parallel(jobs, parallel=3, stream=io.StringIO())
    by_name = {o.report.name: o for o in result.outcomes}
    assert by_name["a"].report.ok and by_name["c"].report.ok
    assert not by_name["b"].report.ok
    assert by_name["b"].report.error is not None and "pool full" in by_name["b"].report.error["message"]
    assert exit_status(result) == 3
    assert not result.report.ok


def test_mixed_failures_exit_4_and_a_bug_is_reported_not_raised() -> None:
    t = Tracker()
    jobs = [("a", t.job("a", fail=UsageError("bad"))), ("b", t.job("b", fail=ZeroDivisionError("oops")))]
    result = fleet.run_parallel(jobs, parallel=2, stream=io.StringIO())
    messages = {o.report.name: o.report.error["message"] for o in result.outcomes if o.report.error}
    assert messages["b"] == "unexpected ZeroDivisionError: oops"
    assert isinstance(result.outcomes[1].error, ZeroDivisionError)  # for the exit map
    assert exit_status(result) == 4


def test_guest_error_in_report_counts_as_guest_failure() -> None:
    def failed(progress: Progress, report: GuestReport) -> GuestReport:
        report.fail("ssh", str(GuestError("no ssh")))
        return report

    result = fleet.run_parallel([("x", failed)], parallel=1, stream=io.StringIO())
    assert exit_status(result) == 4


def test_progress_lines_are_whole_and_prefixed() -> None:
    out = io.StringIO()
    t = Tracker()
    fleet.run_parallel([("alpha", t.job("alpha", work_s=0.1)), ("beta", t.job("beta", work_s=0.1))],
                       parallel=2, stream=out)
    lines = out.getvalue().splitlines()
    assert lines
    for line in lines:
        assert line.startswith("[") and ("] alpha: " in line or "] beta: " in line), line


def test_sigint_rolls_back_running_guests_and_never_starts_queued_ones() -> None:
    t = Tracker()
    jobs = [(f"g{i}", t.job(f"g{i}", work_s=30)) for i in range(4)]
    main = threading.get_ident()

    def interrupt() -> None:
        while len(t.started) < 2:
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    began = time.monotonic()
    result = fleet.run_parallel(jobs, parallel=2, stream=io.StringIO())
    assert time.monotonic() - began < 10  # not the 30 s the jobs would take
    assert result.interrupted
    assert exit_status(result) == 130
    assert sorted(t.rolled_back) == ["g0", "g1"]
    assert t.started == ["g0", "g1"]
    phases = {o.report.name: o.report.error["phase"] for o in result.outcomes if o.report.error}
    assert phases["g2"] == phases["g3"] == "queued"
    assert t.running == 0  # run_parallel returned only after the rollbacks ended


def test_cancel_token_raises_once_at_a_checkpoint_and_never_on_a_line() -> None:
    cancel = CancelToken()
    p = Progress(io.StringIO(), prefix="x: ", cancel=cancel)
    p.checkpoint()
    cancel.cancel("interrupted by SIGINT: the fleet was cancelled")
    p.line("interrupted? no: a line is never a cancellation point")
    with pytest.raises(Interrupted, match="interrupted by SIGINT"), p.phase("next"):
        raise AssertionError("a cancelled run must not enter its next stage")
    p.checkpoint()  # raised once: what follows is the run's own way out


def test_the_failed_guest_keeps_what_its_run_filled_in() -> None:
    t = Tracker()
    result = fleet.run_parallel([("b", t.job("b", work_s=0, fail=HostError("pool full")))], parallel=1,
                                stream=io.StringIO())
    (o,) = result.outcomes
    assert o.report.accel == "tcg" and o.report.error is not None and "pool full" in o.report.error["message"]


def test_summary_table_names_each_guest_and_the_totals() -> None:
    t = Tracker()
    result = fleet.run_parallel([("a", t.job("a", work_s=0)), ("b", t.job("b", work_s=0, fail=HostError("x")))],
                                parallel=2, stream=io.StringIO())
    text = fleet.summary(result)
    lines = text.splitlines()
    assert lines[0].split() == ["GUEST", "RESULT", "PHASE", "WALL", "SSH"]
    assert lines[1].split()[:2] == ["a", "ok"]
    assert lines[2].split()[:2] == ["b", "FAILED"]
    assert lines[-1].startswith("1/2 guests ok in ")
    assert "--parallel 2" in lines[-1]


def test_no_signal_handler_left_changed() -> None:
    before = signal.getsignal(signal.SIGINT)
    fleet.run_parallel([("a", Tracker().job("a", work_s=0))], parallel=1, stream=io.StringIO())
    assert signal.getsignal(signal.SIGINT) is before


def test_a_rollback_already_running_is_not_interrupted() -> None:
    cancel = CancelToken()
    out = io.StringIO()
    p = Progress(out, prefix="x: ", cancel=cancel)
    undo = Rollback(p)
    steps: list[str] = []

    def undo_step(what: str) -> None:
        cancel.cancel()  # the signal lands in the middle of this guest's own rollback
        p.checkpoint()
        with p.phase(what):  # even a phase inside a rollback is not a cancellation point
            steps.append(what)

    undo.add("volume x-data.raw", lambda: undo_step("data"))
    undo.add("volume x-seed.iso", lambda: undo_step("seed"))
    assert undo.run() == []
    assert steps == ["seed", "data"]
    assert out.getvalue().count("rolled back: ") == 2
    p.checkpoint()  # and after it: the run is on its way out


def test_destroy_f_goes_on_past_a_hypervisor_that_does_not_answer(tmp_path, monkeypatch) -> None:
    """README: one failure does not stop the rest, a whole hypervisor's included."""
    from nvmprov import cli

    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path / "state"))
    asked: list[str | None] = []
    real = fleet.destroy

    def destroy(names, *, connect, **kw):  # type: ignore[no-untyped-def]
        asked.append(connect)
        return real(names, connect=connect, **kw)

    monkeypatch.setattr(fleet, "destroy", destroy)
    monkeypatch.setattr(cli, "_targets", lambda _args: [
        ("a", "test:///nonexistent/nvmprov-no-such-file.xml"), ("b", "test:///default")])
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with pytest.raises(HostError, match=r"1 of 2 guests not destroyed: a: "):
        cli.cmd_destroy(type("Args", (), {"purge": False, "purge_adopted": False, "yes": True, "file": "x.yaml"})())
    assert asked == ["test:///nonexistent/nvmprov-no-such-file.xml", "test:///default"]
    assert "b: " in stream.getvalue() and "no such domain" in stream.getvalue()


def test_a_job_without_outcome_is_an_interrupt_only_when_there_was_one() -> None:
    from nvmprov.cli import EXIT_INTERRUPTED, EXIT_SOFTWARE

    def never(_p: Progress, r: GuestReport) -> GuestReport:
        return r

    cut = fleet._outcome_of(fleet._Job("a", never), "interrupted by SIGTERM")
    assert isinstance(cut.error, Interrupted) and exit_status(cut.error) == EXIT_INTERRUPTED
    lost = fleet._outcome_of(fleet._Job("b", never), None)
    assert not isinstance(lost.error, Interrupted) and exit_status(lost.error) == EXIT_SOFTWARE  # type: ignore[arg-type]
    assert "a bug in nvmprov" in lost.report.error["message"]  # type: ignore[index]
