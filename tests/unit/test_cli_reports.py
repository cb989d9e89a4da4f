"""What the CLI prints and writes around a run: --json/--junit reports even when the run fails with
an error that leaves the workflow (host, lock, signal), fleet summaries, the final error line.

The workflow itself is replaced by small fakes here (test_workflow_testdriver.py runs the real one)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nvmprov import cli, fleet, guests, workflow
from nvmprov.errors import HostError, Interrupted, LockedError, SpecError, UsageError
from nvmprov.progress import Progress
from nvmprov.report import GuestReport, RegionReport, Report, SshInfo

GUEST_YAML = """\
version: 1
name: demo
memory: 1GiB
pmem:
  - {name: data, size: 1GiB, filesystem: ext4, mount: /mnt/data}
"""


@pytest.fixture
def spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "guest.yaml"
    path.write_text(GUEST_YAML)
    return path


FLEET_YAML = """\
version: 1
defaults:
  memory: 1GiB
  pmem:
    - {name: data, size: 512MiB, filesystem: ext4, mount: /mnt/data}
guests:
  - name: a
  - name: b
"""


@pytest.fixture
def fleet_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET_YAML)
    return path


def failing_create(exc: BaseException, phase: str = "volumes"):
    """A create that fills its report as the real one does (accel, ssh, a region, a note), then raises."""
    def create(_g: object, _opts: object, progress: Progress, *, report: GuestReport) -> None:
        with progress.phase("host"):
            report.accel = "tcg"
        report.ssh = SshInfo("127.0.0.1", 40022, "nvmprov", "/k", "/kh")
        report.regions.append(RegionReport(
            name="data", model="nvdimm", size_bytes=1 << 30, usable_bytes=None, backing_path="/p/demo-data.raw",
            guest_device=None, namespace_mode=None, filesystem="ext4", mountpoint=None, dax=None, xip_ok=None,
            data_ok=None,
        ))
        report.notes.append("rollback left: volume demo-pmem-data.raw: in use")
        with progress.phase(phase):
            raise exc
    return create


@pytest.mark.parametrize(("exc", "code"), [
    (HostError("storage pool 'nvmprov' is full"), 3),
    (Interrupted("interrupted by SIGTERM"), 130),
    (KeyboardInterrupt(), 130),
], ids=["host", "sigterm", "sigint"])
def test_create_that_raises_still_writes_json_and_junit(spec_file: Path, tmp_path: Path, monkeypatch, capsys,
                                                        exc: BaseException, code: int) -> None:
    monkeypatch.setattr(workflow, "create", failing_create(exc))
    junit = tmp_path / "report.xml"
    assert cli.main(["create", str(spec_file), "--json", "--junit", str(junit)]) == code
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["ok"] is False
    (g,) = report["guests"]
    assert g["name"] == "demo" and g["ok"] is False
    assert g["error"]["phase"] == "volumes" and g["error"]["message"]
    assert set(g["timings_s"]) == {"host", "volumes"}
    # the report the run filled, not a new empty one
    assert g["accel"] == "tcg" and g["ssh"]["port"] == 40022
    assert [r["name"] for r in g["regions"]] == ["data"] and g["regions"][0]["backing_path"] == "/p/demo-data.raw"
    assert g["notes"] == ["rollback left: volume demo-pmem-data.raw: in use"]
    assert "nvmprov: error:" in err
    suite = ET.parse(junit).getroot().find("testsuite")  # noqa: S314 - our own file
    assert suite is not None and suite.get("name") == "demo" and suite.get("failures") == "1"


def test_create_that_raises_without_json_prints_only_the_error(spec_file: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(workflow, "create", failing_create(HostError("pool full")))
    assert cli.main(["create", str(spec_file)]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == "nvmprov: error: pool full"


def test_verify_that_raises_still_writes_json(spec_file: Path, monkeypatch, capsys) -> None:
    def verify_one(name: str, **_kw: object) -> None:
        raise LockedError(f"guest {name!r} is busy: another nvmprov holds its lock (pid 1)")

    monkeypatch.setattr(guests, "verify_one", verify_one)
    assert cli.main(["verify", "demo", "--json"]) == 3
    out, _err = capsys.readouterr()
    (g,) = json.loads(out)["guests"]
    assert g["error"] == {"phase": "verify", "message": "guest 'demo' is busy: another nvmprov holds its lock (pid 1)"}


# 5: the final line says what became of the run


@pytest.mark.parametrize("exc", [Interrupted("interrupted by SIGTERM"), KeyboardInterrupt()], ids=["sigterm", "sigint"])
@pytest.mark.parametrize("keep", [False, True], ids=["rollback", "keep"])
def test_interrupted_create_says_whether_it_rolled_back_or_kept(spec_file: Path, monkeypatch, capsys,
                                                                exc: BaseException, keep: bool) -> None:
    monkeypatch.setattr(workflow, "create", failing_create(exc))
    argv = ["create", str(spec_file), *(["--keep-on-failure"] if keep else [])]
    assert cli.main(argv) == 130
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("nvmprov: error: interrupted")
    if keep:
        assert "kept (--keep-on-failure)" in last and "rolled back" not in last, last
    else:
        assert "what this run made was rolled back" in last, last


def _interrupted_fleet(*_a: object, parallel: int, **_k: object) -> fleet.FleetResult:
    outcomes = [fleet.Outcome(GuestReport(name=n), Interrupted("interrupted by SIGTERM"), 1.0) for n in ("a", "b")]
    for o in outcomes:
        o.report.fail("start", "interrupted: the fleet was cancelled")
    return fleet.FleetResult(Report(guests=[o.report for o in outcomes]), outcomes, 2.0, parallel,
                             interrupted="interrupted by SIGTERM")


def test_interrupted_fleet_with_keep_on_failure_says_kept(fleet_file: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(fleet, "create", _interrupted_fleet)
    assert cli.main(["create", str(fleet_file), "--keep-on-failure"]) == 130
    last = capsys.readouterr().err.splitlines()[-1]
    assert "interrupted by SIGTERM" in last and "kept (--keep-on-failure)" in last and "rolled back" not in last


def test_junit_dir_gone_after_the_check_is_an_error_line_not_a_traceback(spec_file: Path, tmp_path: Path,
                                                                        monkeypatch, capsys) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def create(g: object, _opts: object, _progress: Progress, *, report: GuestReport) -> GuestReport:
        out_dir.rmdir()  # someone cleaned up the directory while the guest was being made
        report.settle()
        return report

    monkeypatch.setattr(workflow, "create", create)
    assert cli.main(["create", str(spec_file), "--json", "--junit", str(out_dir / "r.xml")]) == 3
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is True  # the JSON report went out first
    assert err.splitlines()[-1].startswith("nvmprov: error: cannot write the JUnit report to ")


# 7: a fleet with --json keeps its summary table, on stderr


def _finished_fleet(guests: list, _opts: object, *, parallel: int, **_k: object) -> fleet.FleetResult:
    outcomes = []
    for g in guests:
        report = GuestReport(name=g.name)
        report.settle()
        outcomes.append(fleet.Outcome(report, None, 1.0))
    return fleet.FleetResult(Report(guests=[o.report for o in outcomes]), outcomes, 1.5, parallel)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_fleet_summary_goes_to_stderr_with_json(fleet_file: Path, monkeypatch, capsys, as_json: bool) -> None:
    monkeypatch.setattr(fleet, "create", _finished_fleet)
    assert cli.main(["create", str(fleet_file), *(["--json"] if as_json else [])]) == 0
    out, err = capsys.readouterr()
    summary_in, other = (err, out) if as_json else (out, err)
    assert "GUEST" in summary_in and "2/2 guests ok" in summary_in
    assert "2/2 guests ok" not in other
    if as_json:
        assert [g["name"] for g in json.loads(out)["guests"]] == ["a", "b"]  # stdout stays pure JSON


# the exit map: an exception nvmprov did not expect has its own status, one line, a traceback on --debug


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_unexpected_exception_exits_70_with_one_line(spec_file: Path, monkeypatch, capsys, debug: bool) -> None:
    monkeypatch.setattr(workflow, "create", failing_create(ZeroDivisionError("division by zero")))
    argv = [*(["--debug"] if debug else []), "create", str(spec_file), "--json"]
    assert cli.main(argv) == cli.EXIT_SOFTWARE == 70
    out, err = capsys.readouterr()
    (g,) = json.loads(out)["guests"]  # CI still gets the report
    assert g["error"] == {"phase": "volumes", "message": "unexpected ZeroDivisionError: division by zero"}
    lines = err.splitlines()
    assert lines[-1].startswith("nvmprov: error: unexpected ZeroDivisionError: division by zero (a bug in nvmprov")
    if debug:
        assert "Traceback (most recent call last):" in err
    else:
        assert "Traceback" not in err and lines[-1].endswith("run again with --debug for the traceback)")


@pytest.mark.parametrize(("outcome", "status"), [
    (HostError("x"), 3), (LockedError("x"), 3), (Interrupted("x"), 130), (KeyboardInterrupt(), 130),
    (ValueError("x"), 70), (UsageError("x"), 2), (SpecError("x"), 2),
])
def test_exit_map_by_exception(outcome: BaseException, status: int) -> None:
    assert cli.exit_status(outcome) == status


def test_exit_map_by_report() -> None:
    ok, failed, check = GuestReport(name="a"), GuestReport(name="b"), GuestReport(name="c")
    ok.settle()
    failed.fail("ssh", "refused")
    check.regions.append({"name": "r", "dax": False})
    check.settle()
    assert [cli.exit_status(Report(guests=gs)) for gs in ([ok], [ok, failed], [ok, check], [])] == [0, 4, 1, 1]


def test_a_recorded_spec_that_no_longer_validates_is_a_host_error(monkeypatch) -> None:
    from nvmprov import domain, managed

    md = domain.Metadata.__new__(domain.Metadata)
    object.__setattr__(md, "spec_json", '{"name": "demo", "pmem": "not a list"}')
    object.__setattr__(md, "version", "0.0.1")
    with pytest.raises(HostError, match="does not validate"):
        managed.plan_from_metadata(None, md)  # type: ignore[arg-type]
