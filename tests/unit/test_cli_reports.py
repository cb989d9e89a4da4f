"""What the CLI prints and writes around a run: --json/--junit reports even when the run fails with
an error that leaves the workflow (host, lock, signal), fleet summaries, the final error line.

The workflow itself is replaced by small fakes here (test_workflow_testdriver.py runs the real one)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nvmprov import cli, guests, workflow
from nvmprov.errors import HostError, Interrupted, LockedError
from nvmprov.progress import Progress

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
