"""A stand-in for nvmprov.api in the pytest plugin's own tests (tests/unit/test_pytest_plugin.py).

An inner pytest session (pytester, in this process or in xdist worker processes) installs it from
its conftest.py: nvmprov.api's functions are replaced until that session ends. Its state lives in
files under $NVMPROV_FAKE_DIR so every process of an xdist run shares it: guests.json (the guests
that "exist"), conf.json (how create behaves, what the console shows) and calls.jsonl (every call,
with the process it came from).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nvmprov import api
from nvmprov.errors import HostError, RemoteCommandError
from nvmprov.progress import Progress
from nvmprov.report import GuestReport, RegionReport, Report, SshInfo

NAMES = ("create", "verify", "destroy", "exists", "open_ssh", "console_tail")
_saved: dict[str, Any] = {}


def _dir() -> Path:
    return Path(os.environ["NVMPROV_FAKE_DIR"])


def _log(call: str, **fields: Any) -> None:
    fields.update(call=call, worker=os.environ.get("PYTEST_XDIST_WORKER", "controller"), pid=os.getpid())
    with open(_dir() / "calls.jsonl", "a") as fh:
        fh.write(json.dumps(fields) + "\n")


def calls(fake_dir: Path) -> list[dict[str, Any]]:
    path = fake_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _conf() -> dict[str, Any]:
    path = _dir() / "conf.json"
    return json.loads(path.read_text()) if path.exists() else {}


def guests(fake_dir: Path | None = None) -> set[str]:
    path = (fake_dir or _dir()) / "guests.json"
    return set(json.loads(path.read_text())) if path.exists() else set()


def _set_guests(names: set[str]) -> None:
    (_dir() / "guests.json").write_text(json.dumps(sorted(names)))


def _report(name: str, spec: Any, *, persisted: bool | None) -> GuestReport:
    regions = [
        RegionReport(name=r.name, model=r.model, size_bytes=r.size_bytes, usable_bytes=r.size_bytes,
                     backing_path=f"/pool/{name}-pmem-{r.name}.raw", guest_device=f"/dev/pmem{i}",
                     namespace_mode="fsdax", filesystem=r.filesystem, mountpoint=r.mount or f"/mnt/{r.name}",
                     dax=True, xip_ok=True, data_ok=True, persisted=persisted)
        for i, r in enumerate(spec.pmem)
    ]
    return GuestReport(name=name, accel="tcg", regions=regions,
                       ssh=SshInfo("127.0.0.1", 40022, "nvmprov", f"/state/{name}/id_ed25519",
                                   f"/state/{name}/known_hosts"))


def create(spec: api.SpecSource, *, guest: str | None = None, power_cycle: bool = True, connect: str | None = None,
           keep_on_failure: bool = False, progress: Any = None, report: GuestReport | None = None,
           **_: Any) -> Report:
    g = api.load_spec(spec, guest=guest)
    existed = g.name in guests()
    _log("create", name=g.name, power_cycle=power_cycle, connect=connect, keep=keep_on_failure, existed=existed)
    conf = _conf()
    run = progress if isinstance(progress, Progress) else Progress(sink=progress or (lambda _line: None))
    with run.phase("host"):
        pass
    filled = report if report is not None else GuestReport(name=g.name)
    if "raise" in conf:
        filled.notes.append("rollback left: volume x")
        try:
            with run.phase("start"):
                raise HostError(conf["raise"])
        except HostError as exc:
            filled.fail(run.last_phase("create"), str(exc))  # as workflow.create does before it re-raises
            raise
    made = _report(g.name, g, persisted=None if existed or not power_cycle else True)
    filled.accel, filled.ssh, filled.regions = made.accel, made.ssh, made.regions
    if "fail" in conf:
        filled.fail(**conf["fail"])
        return Report(guests=[filled])  # a new guest that failed was rolled back
    _set_guests(guests() | {g.name})
    if conf.get("check_fails"):  # a check that fails leaves the guest, as workflow.create does
        filled.regions[0].dax = False
    filled.settle()
    return Report(guests=[filled])


def verify(name: str, *, power_cycle: bool = False, connect: str | None = None, **_: Any) -> Report:
    _log("verify", name=name, power_cycle=power_cycle, connect=connect)
    report = _report(name, api.load_spec(_conf()["spec"]) if "spec" in _conf() else SimpleNamespace(pmem=[]),
                     persisted=True if power_cycle else None)
    report.settle()
    return Report(guests=[report])


def destroy(name: str, *, purge: bool = False, missing_ok: bool = False, connect: str | None = None,
            **_: Any) -> bool:
    _log("destroy", name=name, purge=purge, missing_ok=missing_ok, connect=connect)
    present = name in guests()
    _set_guests(guests() - {name})
    return present


def exists(name: str, *, connect: str | None = None) -> bool:
    return name in guests()


class FakeSession:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, cmd: str, *args: object, sudo: bool = False, check: bool = True, timeout_s: float = 300,
            stdin: bytes | None = None) -> SimpleNamespace:
        command = cmd % tuple(shlex.quote(str(a)) for a in args) if args else cmd
        _log("run", name=self.name, command=command, sudo=sudo, check=check)
        rc = 1 if command.startswith("false") else 0
        if check and rc:
            raise RemoteCommandError(command, rc, "it failed")
        return SimpleNamespace(rc=rc, stdout=f"ran: {command}\n", stderr="", command=command)

    def close(self) -> None:
        _log("close", name=self.name)


def open_ssh(name: str, *, connect: str | None = None, **_: Any) -> FakeSession:
    _log("open_ssh", name=name, connect=connect)
    return FakeSession(name)


def console_tail(name: str, *, connect: str | None = None, max_lines: int = 20) -> str:
    return str(_conf().get("console", ""))


def install() -> None:
    for name in NAMES:
        _saved[name] = getattr(api, name)
        setattr(api, name, globals()[name])


def uninstall() -> None:
    for name, fn in _saved.items():
        setattr(api, name, fn)
    _saved.clear()
