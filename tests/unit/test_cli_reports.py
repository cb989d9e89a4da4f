"""What the CLI prints and writes around a run: --json/--junit reports even when the run fails with
an error that leaves the workflow (host, lock, signal), fleet summaries, the final error line.

The workflow itself is replaced by small fakes here (test_workflow_testdriver.py runs the real one)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nvmprov import cli, fleet, guests, workflow
from nvmprov.errors import HostError, Interrupted, LockedError
from nvmprov.progress import Progress
from nvmprov.report import GuestReport, Report

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
    def create(_g: object, _opts: object, progress: Progress) -> None:
        with progress.phase("host"):
            pass
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
    outcomes = [fleet.Outcome(GuestReport(name=n), 130, 1.0) for n in ("a", "b")]
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

    def create(g: object, _opts: object, _progress: Progress) -> GuestReport:
        out_dir.rmdir()  # someone cleaned up the directory while the guest was being made
        report = GuestReport(name="demo")
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
        outcomes.append(fleet.Outcome(report, 0, 1.0))
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
