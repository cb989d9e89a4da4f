"""nvmprov.api on libvirt's test:///default driver (the fixtures of test_workflow_testdriver: no
QEMU, no guest; SSH fails or is replaced). What the library promises beyond the workflow: the same
exceptions and reports, progress to a callback or logging and never to stdout/stderr, rollback on
KeyboardInterrupt, no signal handlers, and no libvirt/paramiko at import."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nvmprov import api, proof, state, storage
from nvmprov.errors import GuestError, Interrupted, SpecError, UsageError, VirtError
from nvmprov.progress import CancelToken
from nvmprov.report import GuestReport, Report

from .test_workflow_testdriver import URI, conn  # noqa: F401 - the test driver fixture

ROOT = Path(__file__).resolve().parents[2]


def mapping(name: str) -> dict:
    return {"name": name, "memory": "1GiB", "vcpus": 1,
            "pmem": [{"name": "data", "size": "1GiB", "filesystem": "ext4", "mount": "/mnt/data"}]}


def test_importing_the_api_imports_neither_libvirt_nor_paramiko() -> None:
    code = ("import json, sys, nvmprov.api; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('libvirt', 'libvirtmod', 'paramiko', 'cryptography', 'pycdlib'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    assert json.loads(proc.stdout) == []


def test_create_from_a_mapping_reports_to_the_callback_and_prints_nothing(conn, capsys) -> None:  # noqa: F811
    lines: list[str] = []
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGINT))
    report = api.create(mapping("api-map"), until="define", connect=URI, progress=lines.append)
    conn.made.append("api-map")
    assert isinstance(report, Report) and report.ok, report
    assert [g.name for g in report.guests] == ["api-map"]
    assert "define ..." in lines and any(line.startswith("define done in") for line in lines), lines
    assert capsys.readouterr() == ("", "")
    # the library installs no signal handlers: SIGTERM is its caller's business
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGINT)) \
        == before
    assert api.exists("api-map", connect=URI)


def test_without_a_callback_progress_goes_to_logging(conn, caplog, capsys) -> None:  # noqa: F811
    with caplog.at_level(logging.INFO, logger="nvmprov"):
        api.create(mapping("api-log"), until="define", connect=URI)
    conn.made.append("api-log")
    assert "define ..." in [r.getMessage() for r in caplog.records if r.name == "nvmprov"]
    assert capsys.readouterr() == ("", "")


def test_a_failing_guest_is_reported_not_raised(conn, monkeypatch) -> None:  # noqa: F811
    def no_ssh(*_a: object, **_k: object) -> None:
        raise GuestError("no SSH answer on 127.0.0.1:2222 within 600s")

    monkeypatch.setattr(proof, "open_session", no_ssh)
    conn.made.append("api-fails")  # the test driver refuses undefine's NVRAM flag: the domain stays
    report = api.create(mapping("api-fails"), connect=URI, progress=lambda _line: None)
    assert report.ok is False
    assert report.guests[0].error == {"phase": "ssh", "message": "no SSH answer on 127.0.0.1:2222 within 600s"}
    assert not state.guest_files("api-fails", create=False).dir.exists()  # rolled back


def test_keyboard_interrupt_rolls_back_and_goes_on_to_the_caller(conn, monkeypatch) -> None:  # noqa: F811
    def ctrl_c(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(proof, "open_session", ctrl_c)
    conn.made.append("api-ctrlc")
    lines: list[str] = []
    filled = GuestReport(name="api-ctrlc")
    with pytest.raises(KeyboardInterrupt):
        api.create(mapping("api-ctrlc"), connect=URI, progress=lines.append, report=filled)
    # what the run had learned, for a caller that prints a report anyway (the CLI's --json)
    assert filled.error == {"phase": "ssh", "message": "interrupted by SIGINT"}
    assert filled.ssh is not None and filled.accel is not None
    names = [v.name() for v in storage.pool_of(conn, "nvmprov").listAllVolumes(0)]
    assert not [n for n in names if n.startswith("api-ctrlc")], names
    assert not state.guest_files("api-ctrlc", create=False).dir.exists()
    assert any(line.startswith("rolled back") or "rolling back" in line for line in lines), lines


def test_a_cancelled_token_stops_the_run_before_it_makes_anything(conn) -> None:  # noqa: F811
    token = CancelToken()
    token.cancel("interrupted: the caller stopped it")
    with pytest.raises(Interrupted, match="the caller stopped it"):
        api.create(mapping("api-cancel"), connect=URI, cancel=token, progress=lambda _line: None)
    assert not api.exists("api-cancel", connect=URI)


def test_bad_input_raises_the_clis_exceptions() -> None:
    bad = mapping("api-bad")
    bad["vcpus"] = 0
    with pytest.raises(SpecError) as info:
        api.load_spec(bad)
    assert str(info.value).startswith(api.MAPPING_NAME) and "vcpus" in str(info.value)
    with pytest.raises(UsageError, match="a path or a mapping"):
        api.load_spec(42)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="no such file"):
        api.load_spec("/nonexistent/guest.yaml")
    with pytest.raises(UsageError, match="not an nvmprov guest name"):
        api.destroy("Bad Name!")


def test_a_fleet_file_needs_the_guest_named(tmp_path) -> None:
    assert api.load_spec(ROOT / "examples" / "fleet.yaml", guest="ci-2").name == "ci-2"
    with pytest.raises(UsageError, match="pick one"):
        api.load_spec(ROOT / "examples" / "fleet.yaml")


def test_destroy_of_a_missing_guest(conn) -> None:  # noqa: F811
    assert api.destroy("api-nothing", missing_ok=True, connect=URI) is False
    with pytest.raises(VirtError, match="no domain named 'api-nothing'"):
        api.destroy("api-nothing", connect=URI)


def test_console_tail_never_raises() -> None:
    assert api.console_tail("api-no-such-guest-anywhere") == ""


def test_a_callback_that_fails_does_not_stop_the_run(conn, capsys) -> None:  # noqa: F811
    def broken(_line: str) -> None:
        raise RuntimeError("the caller's logging is broken")

    report = api.create(mapping("api-broken-cb"), until="define", connect=URI, progress=broken)
    conn.made.append("api-broken-cb")
    assert report.ok, report
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("size", [64 << 20, "64MiB"])
def test_attach_takes_bytes_or_a_size_text(size: int | str) -> None:
    # the domain cannot take it (no maxMemory): the request got that far, its size understood
    with pytest.raises(UsageError, match="maxMemory"):
        api.attach("test", size, region="nv", config=True, connect=URI)
    with pytest.raises(UsageError, match="not a positive size"):
        api.attach("test", 0, region="nv", config=True, connect=URI)


def test_the_cli_attach_hands_the_api_its_parsed_size() -> None:
    proc = subprocess.run([sys.executable, "-m", "nvmprov", "attach", "test", "--size", "64MiB", "--name", "nv",
                           "--config", "--connect", URI], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "maxMemory" in proc.stderr and "no unit" not in proc.stderr, proc.stderr
