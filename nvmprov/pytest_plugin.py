"""pytest plugin (entry point pytest11): a guest with verified persistent memory as a fixture.

    # conftest.py
    from nvmprov.pytest_plugin import nvmprov_guest

    pmem = nvmprov_guest("tests/guest.yaml", scope="session", power_cycle=False)

    # test_pmem.py
    def test_dax(pmem):
        assert pmem.regions["data"].dax
        r = pmem.sudo("findmnt -no OPTIONS %s", pmem.regions["data"].mountpoint)
        assert r.rc == 0 and "dax" in r.stdout

nvmprov_guest(SPEC) makes a fixture (named after the variable it is assigned to) that creates the
guest of SPEC (a file or a mapping, as nvmprov.api.create takes) or, when a guest of that name
exists with the same spec, re-verifies it (no boot, no power cycle). It yields a Guest. A guest
that fails fails every test that asks for it, with the phase and the serial console's last lines;
the spec's timeouts bound every wait. The built-in fixture `nvmprov_spec_guest` is the guest of
`--nvmprov-spec FILE` (session scope).

Teardown destroys with purge (backing volumes included) only the guests this pytest run created;
a guest that existed before is left as it was. `--nvmprov-keep` keeps everything (and what a
failed create made). `--nvmprov-connect URI` overrides the spec's libvirt URI.

pytest-xdist: one guest per spec for the whole run, shared by the workers behind a lock. The first
worker to ask creates it (or re-verifies it) while the others wait on a file lock in a directory
the controller hands to every worker; they then take its report from there, without a round trip
to the guest. Only the controller destroys, after all workers ended: under xdist a guest made by
the run lives until the run ends, whatever the fixture's scope. Tests on a shared guest share its
state: keep tests that power-cycle it or change its mounts in one group (`--dist loadgroup` with
`@pytest.mark.xdist_group`), or give them a guest of their own (another spec, another name).

Loading the plugin imports neither libvirt nor paramiko: a suite that never asks for a guest pays
nothing. Progress lines go to the `nvmprov` logger (INFO: shown under "Captured log setup" of a
failing test) and, with -v, to the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

from . import api
from .errors import NvmprovError
from .progress import Progress
from .report import GuestReport, RegionReport, SshInfo, error_message

if TYPE_CHECKING:
    from .ssh import Result, Session

__all__ = ["Guest", "nvmprov_guest"]

log = logging.getLogger("nvmprov")
Scope = Literal["session", "package", "module", "class", "function"]
RUN_DIR_KEY = "nvmprov_run_dir"  # workerinput: the directory the xdist controller shares with its workers
CONSOLE_LINES = 20
_REGISTRY = pytest.StashKey["_Registry"]()


# ---------------------------------------------------------------------------------------------
# options and hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nvmprov", "nvmprov: guests with persistent memory (nvmprov.pytest_plugin)")
    group.addoption("--nvmprov-spec", metavar="FILE",
                    help="spec of the nvmprov_spec_guest fixture, and of nvmprov_guest() fixtures made without one")
    group.addoption("--nvmprov-connect", metavar="URI", help="libvirt URI, overrides the specs' `connect`")
    group.addoption("--nvmprov-keep", action="store_true",
                    help="destroy nothing at the end, also what a failed create made (for debugging)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REGISTRY] = _Registry(config)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)  # the phases of a failing guest's setup under "Captured log setup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in the controller: every worker gets the run's shared directory."""
    node.workerinput[RUN_DIR_KEY] = str(node.config.stash[_REGISTRY].run_dir(distributed=True))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The last word on what the run created: under xdist the controller destroys every guest the
    workers made; without it, whatever a fixture's teardown did not get to (an interrupted run)."""
    registry = session.config.stash.get(_REGISTRY, None)
    if registry is None or registry.is_worker:
        return
    problems = registry.destroy_leftovers()
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            if reporter is not None:
                reporter.write_line(f"nvmprov: {problem}", red=True)
            log.error("%s", problem)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    registry = config.stash.get(_REGISTRY, None)
    if registry is not None:
        registry.close()


# ---------------------------------------------------------------------------------------------
# the Guest a fixture yields


class Guest:
    """A guest nvmprov made and verified. `run(cmd, *args)` quotes each argument for the shell
    (testinfra's rule: `run("ls -l %s", path)`); neither run nor sudo raises for a non-zero exit
    status: look at `.rc` (check_output does raise)."""

    def __init__(self, name: str, report: GuestReport, *, created: bool, connect: str | None,
                 progress: Callable[[str], None]) -> None:
        self.name = name
        self.report = report  # nvmprov.report.GuestReport: what `nvmprov create --json` prints for it
        self.created = created  # this pytest run created it (and destroys it at the end)
        self.connect = connect
        self._progress = progress
        self._session: Session | None = None

    @property
    def ssh(self) -> SshInfo:
        """host, port, user, identity_file, known_hosts: for OpenSSH, Ansible, ..."""
        assert self.report.ssh is not None, "a verified guest has SSH coordinates"
        return self.report.ssh

    @property
    def regions(self) -> dict[str, RegionReport]:
        """The regions by name: guest_device, mountpoint, filesystem, dax, xip_ok, data_ok, persisted, ..."""
        return {r.name: r for r in self.report.regions}

    @property
    def session(self) -> Session:
        """The SSH session (nvmprov.ssh.Session), opened on first use."""
        if self._session is None:
            self._session = api.open_ssh(self.name, connect=self.connect, progress=self._progress)
        return self._session

    def run(self, cmd: str, *args: object, timeout_s: float = 300, stdin: bytes | None = None) -> Result:
        """Run CMD in the guest, its `%s` filled with ARGS, each shell-quoted -> Result(rc, stdout, stderr)."""
        return self.session.run(cmd, *args, check=False, timeout_s=timeout_s, stdin=stdin)

    def sudo(self, cmd: str, *args: object, timeout_s: float = 300, stdin: bytes | None = None) -> Result:
        """run() as root (non-interactive sudo around `sh -c`, so redirections run as root too)."""
        return self.session.run(cmd, *args, sudo=True, check=False, timeout_s=timeout_s, stdin=stdin)

    def check_output(self, cmd: str, *args: object, sudo: bool = False, timeout_s: float = 300) -> str:
        """stdout without its trailing newline; a non-zero exit raises RemoteCommandError (command, status,
        stderr's tail)."""
        return self.session.run(cmd, *args, sudo=sudo, check=True, timeout_s=timeout_s).stdout.rstrip("\n")

    def power_cycle(self) -> GuestReport:
        """Cut the guest's power, boot it again and prove every region's data survived (`nvmprov verify
        --power-cycle`); fails the test, with the phase and the console's last lines, when it did not."""
        self.close()
        report = api.verify(self.name, power_cycle=True, connect=self.connect, progress=self._progress).guests[0]
        if not report.ok:
            pytest.fail(_failure_text(report, self.connect), pytrace=False)
        self.report = report
        return report

    def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"<nvmprov Guest {self.name} ssh {self.report.ssh.port if self.report.ssh else '-'}>"


# ---------------------------------------------------------------------------------------------
# the fixture factory


def nvmprov_guest(
    spec: api.SpecSource | None = None,
    *,
    scope: Scope = "session",
    guest: str | None = None,
    power_cycle: bool = True,
) -> Any:
    """A fixture yielding the Guest of SPEC (a path or a mapping; None: --nvmprov-spec), made at the
    start of SCOPE and, if this run created it, destroyed with purge at its end (under xdist: at the
    end of the run). GUEST picks one guest of a fleet file. POWER_CYCLE: a new guest also gets the
    power-cycle proof (a second boot); an existing one is re-verified without."""

    def fixture(request: pytest.FixtureRequest) -> Iterator[Guest]:
        yield from _guest_fixture(request, spec, guest=guest, power_cycle=power_cycle)

    return pytest.fixture(scope=scope)(fixture)


@pytest.fixture(scope="session")
def nvmprov_spec_guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """The guest of --nvmprov-spec FILE (session scope): nvmprov_guest(None) ready-made."""
    yield from _guest_fixture(request, None, guest=None, power_cycle=True)


def _guest_fixture(request: pytest.FixtureRequest, spec: api.SpecSource | None, *, guest: str | None,
                   power_cycle: bool) -> Iterator[Guest]:
    registry = request.config.stash[_REGISTRY]
    g = registry.provide(spec, guest=guest, power_cycle=power_cycle)
    try:
        yield g
    finally:
        registry.release(g)


# ---------------------------------------------------------------------------------------------
# the run's guests: who made what, shared with xdist workers through files


class _Registry:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.connect: str | None = config.getoption("nvmprov_connect", None)
        self.keep: bool = bool(config.getoption("nvmprov_keep", False))
        self.spec_option: str | None = config.getoption("nvmprov_spec", None)
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.is_worker = workerinput is not None
        shared = (workerinput or {}).get(RUN_DIR_KEY)
        self._run_dir: Path | None = Path(shared) if shared else None
        self._own_dir = False
        self.distributed = False  # the xdist controller: workers create, it destroys at the end
        self._users: dict[str, int] = {}

    def run_dir(self, *, distributed: bool = False) -> Path:
        self.distributed = self.distributed or distributed
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="nvmprov-pytest-"))
            self._own_dir = True
        return self._run_dir

    def close(self) -> None:
        if self._own_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    # -- progress

    def progress(self, name: str) -> Callable[[str], None]:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if self.is_worker or self.config.get_verbosity() < 1:
            reporter = None
        capture = self.config.pluginmanager.get_plugin("capturemanager")

        def line(text: str) -> None:
            log.info("%s: %s", name, text)
            if reporter is not None:
                # past pytest's output capture (it holds fd 1 while a fixture sets up), as live logging does
                with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                    reporter.write_line(f"nvmprov {name}: {text}")

        return line

    # -- the record of one guest in the run directory

    def _record_path(self, name: str) -> Path:
        return self.run_dir() / f"{name}.json"

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._record_path(name).read_text())
            return data
        except FileNotFoundError:
            return None

    def _write(self, name: str, record: dict[str, Any]) -> None:
        tmp = self._record_path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self._record_path(name))

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """One process at a time per guest name (blocking: the holder's create is bounded by the spec's
        timeouts)."""
        fd = os.open(self.run_dir() / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- provide and release

    def provide(self, spec: api.SpecSource | None, *, guest: str | None, power_cycle: bool) -> Guest:
        source = spec if spec is not None else self.spec_option
        if source is None:
            pytest.fail("nvmprov: this fixture has no spec: give --nvmprov-spec FILE, or nvmprov_guest(SPEC) "
                        "in a conftest.py", pytrace=False)
        try:
            loaded = api.load_spec(source, guest=guest)
        except NvmprovError as exc:
            pytest.fail(f"nvmprov: {exc}", pytrace=False)
        name = loaded.name
        spec_json = loaded.model_dump_json(by_alias=True)
        progress = self.progress(name)
        with self._locked(name):
            record = self._read(name)
            if record is None:
                record = self._create(source, name, guest=guest, power_cycle=power_cycle, spec_json=spec_json,
                                      progress=progress)
            if "failed" in record:
                pytest.fail(record["failed"], pytrace=False)
            if record["spec_json"] != spec_json:
                pytest.fail(f"nvmprov: two fixtures of this run ask for guest {name} with different specs; "
                            "give one of them another name", pytrace=False)
        self._users[name] = self._users.get(name, 0) + 1
        return Guest(name, _guest_report(record["report"]), created=record["created"], connect=self.connect,
                     progress=progress)

    def _create(self, source: api.SpecSource, name: str, *, guest: str | None, power_cycle: bool, spec_json: str,
                progress: Callable[[str], None]) -> dict[str, Any]:
        """Create or re-verify NAME (the lock held); the record says what became of it, a failure included
        (the other workers fail at once with the same words instead of trying again)."""
        run = Progress(sink=progress)
        report = GuestReport(name=name)
        existed = False
        try:
            existed = api.exists(name, connect=self.connect)
            progress("exists: re-verifying it (no boot)" if existed else
                     "creating it (under TCG a boot takes a minute or two" + (", the power-cycle proof another)"
                                                                              if power_cycle else ")"))
            api.create(source, guest=guest, power_cycle=power_cycle, connect=self.connect, keep_on_failure=self.keep,
                       progress=run, report=report)
        except Exception as exc:  # noqa: BLE001 - a bug too fails the tests that need the guest, once
            if report.error is None:  # create marks its own failures; not one before it began
                report.fail(run.last_phase("create"), error_message(exc))
        # A new guest that failed is rolled back by create (kept with --nvmprov-keep), but one whose
        # checks failed stays, as with the CLI: it is this run's, and destroyed at its end.
        created = not existed and (report.ok or self._still_there(name))
        record: dict[str, Any] = {"created": created, "spec_json": spec_json}
        if report.ok:
            record["report"] = dataclasses.asdict(report)
        else:
            record["failed"] = _failure_text(report, self.connect)
        self._write(name, record)
        return record

    def _still_there(self, name: str) -> bool:
        try:
            return api.exists(name, connect=self.connect)
        except NvmprovError:
            return False

    def release(self, g: Guest) -> None:
        """The end of a fixture's scope: without xdist, the last user of a guest this run created destroys
        it (with purge); under xdist the controller does, at the end of the run."""
        g.close()
        self._users[g.name] -= 1
        if self._users[g.name] > 0 or self.is_worker or self.distributed:
            return
        with self._locked(g.name):
            record = self._read(g.name)
            if record is None or not record.get("created") or self.keep:
                return
            try:
                api.destroy(g.name, purge=True, missing_ok=True, connect=self.connect, progress=self.progress(g.name))
            except NvmprovError as exc:
                pytest.fail(f"nvmprov: could not destroy guest {g.name} this run created: {exc}", pytrace=False)
            finally:
                self._record_path(g.name).unlink(missing_ok=True)

    def destroy_leftovers(self) -> list[str]:
        """Every guest the run created and no teardown destroyed; returns what could not be destroyed."""
        if self._run_dir is None or self.keep:
            return []
        problems = []
        for path in sorted(self._run_dir.glob("*.json")):
            name = path.stem
            record = self._read(name)
            if not record or not record.get("created"):
                continue
            try:
                api.destroy(name, purge=True, missing_ok=True, connect=self.connect, progress=self.progress(name))
            except NvmprovError as exc:
                problems.append(f"could not destroy guest {name} this run created: {exc}")
            path.unlink(missing_ok=True)
        return problems


def _failure_text(report: GuestReport, connect: str | None) -> str:
    error = report.error or {"phase": "verify", "message": "a check failed"}
    lines = [f"nvmprov guest {report.name} failed in phase {error['phase']}: {error['message']}"]
    lines += [f"  note: {note}" for note in report.notes]  # e.g. "rollback left: ..."
    for r in report.regions:
        failed = [c for c in ("dax", "xip_ok", "data_ok", "persisted") if getattr(r, c, None) is False]
        if failed:
            lines.append(f"  region {r.name}: {', '.join(failed)} false"
                         + (f" ({r.persisted_reason})" if getattr(r, "persisted_reason", None) else ""))
    if "console lines" not in error["message"]:
        tail = api.console_tail(report.name, connect=connect, max_lines=CONSOLE_LINES)
        lines.append(f"last console lines:\n{tail}" if tail else "(no serial console output to show)")
    return "\n".join(lines)


def _guest_report(data: Mapping[str, Any]) -> GuestReport:
    """A GuestReport back from its dataclasses.asdict (the record other xdist workers read)."""
    ssh = data.get("ssh")
    regions = [RegionReport(**{f.name: r.get(f.name) for f in dataclasses.fields(RegionReport)})
               for r in data.get("regions", [])]
    known = {f.name for f in dataclasses.fields(GuestReport)} - {"ssh", "regions"}
    return GuestReport(**{k: v for k, v in data.items() if k in known},
                       ssh=SshInfo(**ssh) if ssh else None, regions=regions)

