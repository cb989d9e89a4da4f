"""Fleets: the guests of one spec file created (or verified) concurrently, one thread per guest.

Each guest runs the ordinary single-guest workflow with its own libvirt connection, lock and
progress prefix, so a failing guest is rolled back alone. Signals arrive in the main thread: it
cancels the fleet's CancelToken; every worker raises Interrupted at its next checkpoint (the start
of a phase, between SSH attempts; never inside a rollback), rolls back what it made, and the main
thread waits for those rollbacks. What each guest ended with (its report, the exception that ended
it) goes back to the CLI, whose exit map alone turns it into a status.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, cast

from . import guests as guestsmod
from . import identity, managed, state, workflow
from .errors import Interrupted, NvmprovError
from .progress import CancelToken, Progress
from .report import GuestReport, Report, error_message

if TYPE_CHECKING:
    from . import ledger
    from .spec import GuestSpec
    from .workflow import CreateOptions

POLL_S = 0.2  # how often the main thread looks up from waiting (signals land between looks)
ROLLBACK_WAIT_S = 600.0  # after a signal: how long the main thread waits for the workers' rollbacks


def default_parallel(n_guests: int, cores: int | None = None) -> int:
    """One guest per core (TCG runs a vCPU as a host thread), never more than there are guests."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(n_guests, cores))


class LineStream(io.TextIOBase):
    """A stderr shared by several Progress objects: whole lines, never interleaved, and no TTY
    spinner (several spinners would fight over the one status line)."""

    def __init__(self, stream: IO[str], lock: threading.Lock | None = None) -> None:
        self._stream = stream
        self._lock = lock or threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return self._stream.write(text)

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()

    def isatty(self) -> bool:
        return False


@dataclass
class Outcome:
    """What became of one guest of the fleet."""

    report: GuestReport  # the one the guest's run filled, also when it raised
    error: BaseException | None = None  # what ended the run when it raised (the CLI maps it to a status)
    wall_s: float = 0.0


@dataclass
class FleetResult:
    report: Report
    outcomes: list[Outcome]
    wall_s: float
    parallel: int
    interrupted: str | None = None  # the signal's message when the run was cancelled


@dataclass
class _Job:
    name: str
    run: Callable[[Progress, GuestReport], GuestReport]
    outcome: Outcome | None = None
    started: bool = False
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _run_job(job: _Job, progress: Progress) -> None:
    began = time.monotonic()
    report = GuestReport(name=job.name)
    error: BaseException | None = None
    try:
        report = job.run(progress, report)
    except Exception as exc:  # noqa: BLE001 - one guest's failure (a bug included) must not hide the others'
        # Host/spec errors leave workflow.create as exceptions (after its own rollback), with the
        # report it filled; in a fleet they are this guest's failure, not the others'.
        if report.error is None:
            report.fail(progress.last_phase("create"), error_message(exc))
        report.timings_s = report.timings_s or dict(progress.timings_s)
        error = exc
    finally:
        job.outcome = Outcome(report, error, round(time.monotonic() - began, 1))
        job.done.set()


def run_parallel(
    jobs: Sequence[tuple[str, Callable[[Progress, GuestReport], GuestReport]]],
    *,
    parallel: int,
    stream: IO[str],
    log: IO[str] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> FleetResult:
    """Run each job in its own thread, at most PARALLEL at a time, in order. A signal in the main
    thread (KeyboardInterrupt, Interrupted) cancels: queued jobs never start, running ones roll
    back, and this returns once they did (result.interrupted says so)."""
    began = time.monotonic()
    shared = cast(IO[str], LineStream(stream))
    cancel = CancelToken()
    queue = [_Job(name, run) for name, run in jobs]
    interrupted: str | None = None
    try:
        _schedule(queue, parallel, cancel, shared, log, on_start)
    except (KeyboardInterrupt, Interrupted) as exc:
        interrupted = (str(exc) or "interrupted").split(";")[0]  # "interrupted by SIGTERM"
        cancel.cancel(f"{interrupted}: the fleet was cancelled")
        _wait_for_rollbacks(queue, shared)
    outcomes = [_outcome_of(job, interrupted) for job in queue]
    report = Report(guests=[o.report for o in outcomes])
    return FleetResult(report, outcomes, round(time.monotonic() - began, 1), parallel, interrupted)


def _schedule(
    queue: list[_Job],
    parallel: int,
    cancel: CancelToken,
    stream: IO[str],
    log: IO[str] | None,
    on_start: Callable[[str], None] | None,
) -> None:
    pending = list(queue)
    while True:
        running = [j for j in queue if j.started and not j.done.is_set()]
        while pending and len(running) < parallel:
            job = pending.pop(0)
            progress = Progress(stream, prefix=f"{job.name}: ", log=log, cancel=cancel)
            job.thread = threading.Thread(target=_run_job, args=(job, progress), name=f"nvmprov-{job.name}",
                                          daemon=True)
            job.started = True
            if on_start is not None:
                on_start(job.name)
            job.thread.start()
            running.append(job)
        if not running and not pending:
            return
        # Wait on the first running job with a short timeout: the main thread stays responsive
        # to signals and refills the slot of whichever job ends first.
        running[0].done.wait(POLL_S)


def _wait_for_rollbacks(queue: list[_Job], stream: IO[str]) -> None:
    """After a signal: every started job notices the cancel event and rolls back; wait for them.
    A second Ctrl-C does not abandon them (that would leave domains and volumes behind)."""
    note = Progress(stream, prefix="fleet: ")
    busy = [j for j in queue if j.started and not j.done.is_set()]
    if busy:
        note.line(f"interrupted: rolling back {', '.join(j.name for j in busy)} (wait for it)")
    deadline = time.monotonic() + ROLLBACK_WAIT_S
    while time.monotonic() < deadline:
        try:
            busy = [j for j in busy if not j.done.is_set()]
            if not busy:
                return
            busy[0].done.wait(POLL_S)
        except (KeyboardInterrupt, Interrupted):
            note.line(f"still rolling back {', '.join(j.name for j in busy)}; interrupt again after it ends")
    note.line(f"gave up waiting for {', '.join(j.name for j in busy)} after {ROLLBACK_WAIT_S:.0f}s")


def _outcome_of(job: _Job, interrupted: str | None) -> Outcome:
    """A job's outcome; one that has none was cut off by INTERRUPTED (a signal). Without a signal
    every job ends with an outcome: one missing is nvmprov's bug (EXIT_SOFTWARE), not an interrupt."""
    if job.outcome is not None:
        return job.outcome
    report = GuestReport(name=job.name)
    if interrupted is None:
        error: BaseException = RuntimeError(f"the fleet ended without an outcome for {job.name} (a bug in nvmprov)")
        report.fail("queued" if not job.started else "create", str(error))
    elif not job.started:
        error = Interrupted(interrupted)
        report.fail("queued", f"not started: {interrupted}")
    else:
        error = Interrupted(interrupted)
        report.fail("rollback", "still running when nvmprov gave up waiting; `nvmprov destroy` it")
    return Outcome(report, error)


# ---------------------------------------------------------------------------------------------
# the two fleet commands


def create(
    guests: Sequence[GuestSpec], opts: CreateOptions, *, parallel: int, stream: IO[str], log: IO[str] | None = None
) -> FleetResult:
    """Create every guest of a fleet, PARALLEL at a time; each guest fails and rolls back alone."""
    def job(g: GuestSpec) -> Callable[[Progress, GuestReport], GuestReport]:
        return lambda progress, report: workflow.create(g, opts, progress, report=report)

    return run_parallel([(g.name, job(g)) for g in guests], parallel=parallel, stream=stream, log=log)


def verify(
    names: Sequence[str], *, connect: str | None, power_cycle: bool, parallel: int, stream: IO[str],
    connect_of: Mapping[str, str | None] | None = None,
) -> FleetResult:
    """Re-verify several guests concurrently (each in its own connection and SSH session), each on
    its own hypervisor when CONNECT_OF names one (a fleet's `connect:`)."""
    def job(name: str) -> Callable[[Progress, GuestReport], GuestReport]:
        uri = connect_of.get(name, connect) if connect_of is not None else connect

        def run(progress: Progress, report: GuestReport) -> GuestReport:
            return guestsmod.verify_one(name, connect=uri, power_cycle=power_cycle, progress=progress,
                                        report=report)
        return run

    return run_parallel([(n, job(n)) for n in names], parallel=parallel, stream=stream)


def destroy(names: Sequence[str], *, connect: str | None, purge: ledger.Purge, stream: IO[str]) -> list[str]:
    """Destroy every guest of a fleet that exists; a guest already gone is said and skipped.
    Returns the failures ("name: message"); the others are destroyed regardless."""
    failures = []
    left = list(names)
    try:
        with managed.connection(connect) as conn:
            hv = identity.of(conn)
            while left:
                name = left.pop(0)
                progress = Progress(stream, prefix=f"{name}: ")
                try:
                    with state.lock(name, hv=hv):
                        guestsmod.destroy_one(conn, hv, name, purge=purge, progress=progress, missing_ok=True)
                except NvmprovError as exc:
                    progress.line(f"not destroyed: {exc}")
                    failures.append(f"{name}: {exc}")
    except NvmprovError as exc:  # its hypervisor did not answer: the guests of other hypervisors go on
        for name in left:
            Progress(stream, prefix=f"{name}: ").line(f"not destroyed: {exc}")
            failures.append(f"{name}: {exc}")
    return failures


# ---------------------------------------------------------------------------------------------
# the summary table


def summary(result: FleetResult) -> str:
    """One line per guest and a total: what a person scans at the end of a fleet run."""
    rows = [("GUEST", "RESULT", "PHASE", "WALL", "SSH")]
    for o in result.outcomes:
        g = o.report
        status = "ok" if g.ok else ("FAILED" if g.error else "CHECK FAILED")
        phase = g.error["phase"] if g.error else "-"
        ssh = f"{g.ssh.user}@{g.ssh.host}:{g.ssh.port}" if g.ssh and g.ok else "-"
        rows.append((g.name, status, phase, f"{o.wall_s:.1f}s", ssh))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    n_ok = sum(1 for o in result.outcomes if o.report.ok)
    serial_s = sum(o.wall_s for o in result.outcomes)
    total = (f"{n_ok}/{len(result.outcomes)} guests ok in {result.wall_s:.1f}s wall "
             f"({serial_s:.1f}s of guest time, --parallel {result.parallel})")
    if result.interrupted:
        total += f"; {result.interrupted}"
    return "\n".join([*lines, total]) + "\n"
