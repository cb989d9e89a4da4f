"""fleet.run_parallel with real threads, real Progress objects and a real signal: concurrency bound,
failure isolation, exit codes, and a SIGINT that rolls every running guest back."""

from __future__ import annotations

import io
import signal
import threading
import time

import pytest

from nvmprov import fleet
from nvmprov.errors import GuestError, HostError, Interrupted, UsageError
from nvmprov.progress import Progress
from nvmprov.report import GuestReport


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
        def run(progress: Progress) -> GuestReport:
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
                self.started.append(name)
            try:
                end = time.monotonic() + work_s
                while time.monotonic() < end:  # a create reporting progress between its steps
                    progress.line("working")
                    time.sleep(0.02)
                if fail is not None:
                    raise fail
                return ok_report(name)
            except Interrupted:
                progress.line("rolled back: everything")  # must not raise a second time
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
    assert result.exit_code() == 0
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
    assert result.exit_code() == 3
    assert not result.report.ok


def test_mixed_failures_exit_4_and_a_bug_is_reported_not_raised() -> None:
    t = Tracker()
    jobs = [("a", t.job("a", fail=UsageError("bad"))), ("b", t.job("b", fail=ZeroDivisionError("oops")))]
    result = fleet.run_parallel(jobs, parallel=2, stream=io.StringIO())
    messages = {o.report.name: o.report.error["message"] for o in result.outcomes if o.report.error}
    assert messages["b"] == "ZeroDivisionError: oops"
    assert result.exit_code() == 4


def test_guest_error_in_report_counts_as_guest_failure() -> None:
    def failed(progress: Progress) -> GuestReport:
        g = GuestReport(name="x")
        g.fail("ssh", str(GuestError("no ssh")))
        return g

    result = fleet.run_parallel([("x", failed)], parallel=1, stream=io.StringIO())
    assert result.exit_code() == 4


def test_progress_lines_are_whole_and_prefixed() -> None:
    out = io.StringIO()
    t = Tracker()
    fleet.run_parallel([("alpha", t.job("alpha", work_s=0.1)), ("beta", t.job("beta", work_s=0.1))],
                       parallel=2, stream=out)
    lines = out.getvalue().splitlines()
    assert lines
    for line in lines:
        assert line.startswith("[") and ("] alpha: working" in line or "] beta: working" in line), line


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
    assert result.exit_code() == 130
    assert sorted(t.rolled_back) == ["g0", "g1"]
    assert t.started == ["g0", "g1"]
    phases = {o.report.name: o.report.error["phase"] for o in result.outcomes if o.report.error}
    assert phases["g2"] == phases["g3"] == "queued"
    assert t.running == 0  # run_parallel returned only after the rollbacks ended


def test_cancellable_progress_raises_once() -> None:
    cancel = threading.Event()
    p = fleet.CancellableProgress(cancel, io.StringIO(), prefix="x: ")
    p.line("fine")
    cancel.set()
    with pytest.raises(Interrupted):
        p.line("next step")
    p.line("rolled back: volume")  # the rollback's own lines pass


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
    cancel = threading.Event()
    out = io.StringIO()
    p = fleet.CancellableProgress(cancel, out, prefix="x: ")
    p.line("rolled back: running guest x")  # this guest failed on its own and is undoing
    cancel.set()
    p.line("rolled back: volume x-seed.iso")
    p.line("some later line")  # the undo must run to its end: no Interrupted from here on
    assert out.getvalue().count("x: ") == 3
