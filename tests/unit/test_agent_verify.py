"""verify(): the real guest programs run on this host through a local runner.

This host has no DAX filesystem, so it is the negative control: the XIP and statx checks must
come out False here, while the payload checks must pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from nvmprov.agent import RegionState, verify
from nvmprov.agent.verify import PAYLOAD_BYTES, Job, parse_probe, run_jobs, sha256_of_files
from nvmprov.errors import GuestError
from nvmprov.ssh import Result, render_command

from .test_agent_steps import plan_of, region


class LocalProcess:
    """A command started in a local shell: what nvmprov.ssh.RemoteProcess is over SSH."""

    def __init__(self, command: str, stdin: bytes) -> None:
        self.proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(stdin)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip(b"\n"))
        self.lines.put(None)

    @property
    def stderr(self) -> str:
        return "" if self.proc.poll() is None or self.proc.stderr is None else self.proc.stderr.read().decode()

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # it exited: read_line() says so, as over SSH
            pass

    def read_line(self, timeout_s: float) -> bytes | None:
        line = self.lines.get(timeout=timeout_s)
        if line is None:
            self.proc.wait(timeout_s)
        return line

    def close(self, timeout_s: float = 30) -> int | None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.proc.stdin.close()
        return self.proc.wait(timeout_s)


class LocalRunner:
    """Runs the agent's commands in a local shell (as this user; `sudo` is not needed here)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def start(self, cmd: str, *args: object, sudo: bool = False, stdin: bytes = b"") -> LocalProcess:
        command = render_command(cmd, *args)
        self.commands.append(command)
        return LocalProcess(command, stdin)

    def run(
        self,
        cmd: str,
        *args: object,
        sudo: bool = False,
        check: bool = True,
        timeout_s: float = 300,
        stdin: bytes | None = None,
    ) -> Result:
        command = render_command(cmd, *args)
        self.commands.append(command)
        p = subprocess.run(["sh", "-c", command], input=stdin or b"", capture_output=True, timeout=timeout_s)
        result = Result(p.returncode, p.stdout.decode(), p.stderr.decode(), command)
        if check and p.returncode != 0:
            raise AssertionError(f"{command}: {p.stderr.decode()}")
        return result


def state(
    name: str,
    mountpoint: str | None,
    *,
    mount_dax: bool = False,
    fs: str | None = "ext4",
    device_dax: bool = False,
    mode: str | None = "fsdax",
) -> RegionState:
    return RegionState(
        name=name,
        model="nvdimm",
        guest_region="region0",
        namespace="namespace0.0",
        namespace_mode=mode,
        guest_device="/dev/pmem0",
        usable_bytes=500_000_000,
        device_dax=device_dax,
        filesystem=fs,
        fs_uuid="u",
        mountpoint=mountpoint,
        mount_dax=mount_dax,
    )


def test_verify_without_dax_fails_dax_and_xip_but_writes_data(tmp_path: Path) -> None:
    runner = LocalRunner()
    plan = plan_of(region(mount=str(tmp_path)))
    (report,) = verify(runner, plan, [state("data", str(tmp_path))])
    assert report.dax is False
    assert report.xip_ok is False  # the copy on a non-DAX filesystem sits in the page cache
    assert report.data_ok is True
    assert report.persisted is None and report.backing_path is None
    assert report.marker is not None and report.marker.startswith("NVMPROV-MARKER:g:data:")
    payload = Path(report.payload_path or "")
    data = payload.read_bytes()
    assert payload.parent == tmp_path
    assert data.startswith(report.marker.encode()) and len(data) == PAYLOAD_BYTES + len(report.marker)
    assert hashlib.sha256(data).hexdigest() == report.payload_sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == [payload.name]  # the probe cleaned up
    (command,) = runner.commands  # one guest program run, which ends with its own sync
    assert command.startswith("python3 -I -S -c ")


def test_probe_here_shows_pages_for_both_copies(tmp_path: Path) -> None:
    (result,) = run_jobs(LocalRunner(), [Job(region(mount=str(tmp_path)), probe_mount=str(tmp_path))])
    probe = result.probe
    assert probe is not None and result.payload is None
    assert (probe.exec_rc_dax, probe.exec_rc_root) == (0, 0)
    assert probe.pages_dax and probe.pages_dax > 0 and probe.pages_root and probe.pages_root > 0
    assert not probe.statx_dax and not probe.statx_dax_root and probe.error is None
    assert not probe.xip_ok


def test_payload_roundtrip_and_check(tmp_path: Path) -> None:
    """What verify writes and what the power-cycle re-check reads back: the same product paths."""
    runner = LocalRunner()
    r = region(mount=str(tmp_path))
    (result,) = run_jobs(runner, [Job(r, marker=b"NVMPROV-MARKER:test:1234")])
    assert result.payload is not None and result.payload.ok and result.probe is None
    path, sha = result.payload.path, result.payload.sha256
    assert sha256_of_files(runner, [path]) == {path: sha}
    with open(path, "r+b") as f:  # one flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    missing = str(tmp_path / "missing")
    sums = sha256_of_files(runner, [path, missing])
    assert sums[path] not in (None, sha) and sums[missing] is None


@pytest.mark.parametrize("marker", [b"short", b"has space in it", b"quote'injection;rm -rf", b"\x00\x01nul-bytes"])
def test_marker_must_be_plain_ascii(tmp_path: Path, marker: bytes) -> None:
    runner = LocalRunner()
    with pytest.raises(GuestError, match="marker must be"):
        run_jobs(runner, [Job(region(mount=str(tmp_path)), marker=marker)])
    assert runner.commands == []  # refused before the guest program starts


def test_filesystem_none_and_readonly_write_nothing(tmp_path: Path) -> None:
    runner = LocalRunner()
    plan = plan_of(region("raw", fs="none", mount=None), region("ro", slot=1, readonly=True, mount=str(tmp_path)))
    raw, ro = verify(
        runner, plan, [state("raw", None, fs=None, device_dax=True), state("ro", str(tmp_path), mount_dax=True)]
    )
    assert (raw.dax, raw.xip_ok, raw.data_ok, raw.filesystem) == (True, None, None, "none")
    # a readonly nvdimm stays a raw namespace: not DAX by design, so dax does not apply (None, not False)
    assert (ro.dax, ro.xip_ok, ro.data_ok) == (None, None, None)
    (command,) = runner.commands  # the guest program's verify of no region: only its closing sync
    assert command.startswith("python3 -I -S -c ")
    assert list(tmp_path.iterdir()) == []


def test_unmounted_region_fails_its_checks() -> None:
    (report,) = verify(LocalRunner(), plan_of(region()), [state("data", None)])
    assert (report.dax, report.xip_ok, report.data_ok) == (False, False, False)


def _probe_output(pages_dax: int, pages_root: int, attr_dax: int, attr_root: int, rc: int = 0) -> str:
    def raw(attrs: int) -> dict[str, str]:
        buf = bytearray(256)
        buf[8:16] = attrs.to_bytes(8, "little")
        return {"raw": buf.hex()}

    copies = {"dax": "/mnt/d/.nvmprov-xip-x/true", "root": "/var/tmp/.nvmprov-xip-y/true"}
    fincore = {"fincore": [{"pages": pages_dax, "file": copies["dax"]}, {"pages": pages_root, "file": copies["root"]}]}
    return json.dumps(
        {
            "copies": copies,
            "exec": {"dax": rc, "root": 0},
            "fincore": {"rc": 0, "stdout": json.dumps(fincore), "stderr": ""},
            "statx": {"dax": raw(attr_dax), "root": raw(attr_root)},
        }
    )


@pytest.mark.parametrize(
    ("pages_dax", "pages_root", "rc", "xip_ok"),
    [(0, 37, 0, True), (9, 37, 0, False), (0, 0, 0, False), (0, 37, 126, False)],
)
def test_parse_probe_xip_rule(pages_dax: int, pages_root: int, rc: int, xip_ok: bool) -> None:
    probe = parse_probe(_probe_output(pages_dax, pages_root, 0x00200000, 0, rc))
    assert probe.xip_ok is xip_ok
    assert probe.statx_dax and not probe.statx_dax_root


def test_parse_probe_fincore_failure_is_not_ok() -> None:
    raw = json.loads(_probe_output(0, 37, 0x00200000, 0))
    raw["fincore"] = {"rc": 1, "stdout": "", "stderr": "fincore: failed to open: x"}
    probe = parse_probe(json.dumps(raw))
    assert not probe.xip_ok and "fincore: failed to open" in (probe.error or "")


REAL_PROBE = json.loads((Path(__file__).parent / "fixtures" / "agent" / "real-probe-mnt-plain.json").read_text())


class DaxGuest:
    """Answers the guest program's verify request as a real DAX guest did: the captured probe, a
    matching payload."""

    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        self.execs = 0
        self.answers: list[bytes] = []
        self.stderr = ""

    def start(self, cmd: str, *args: object, **_kw: object) -> DaxGuest:
        self.execs += 1
        return self

    def send(self, data: bytes) -> None:
        request = json.loads(data)
        assert request.pop("op") == "verify"
        self.requests.append(request)
        regions = []
        for r in request["regions"]:
            p = r["payload"]
            payload = {"path": p["path"], "bytes": 1, "sha256": "a" * 64, "sha256_read": "a" * 64} if p else None
            regions.append({"name": r["name"], "probe": REAL_PROBE if r["probe"] else None, "payload": payload})
        self.answers.append(json.dumps({"ok": True, "result": {"regions": regions, "synced": True}}).encode())

    def read_line(self, timeout_s: float) -> bytes | None:
        return self.answers.pop(0) if self.answers else None

    def close(self, timeout_s: float = 0) -> int | None:
        return 0


@pytest.mark.parametrize(
    ("model", "mode", "dax"),
    [
        ("nvdimm", "fsdax", True),
        ("nvdimm", "raw", False),  # a raw pmem device mounted -o dax is not what the spec asked for
        ("nvdimm", "sector", False),
        ("nvdimm", None, False),
        ("virtio-pmem", "fsdax", True),  # ndctl's name for virtio-pmem's label-less namespace
        ("virtio-pmem", None, True),  # virtio-pmem has no namespace modes to require
    ],
)
def test_dax_of_an_nvdimm_region_requires_an_fsdax_namespace(model: str, mode: str | None, dax: bool) -> None:
    r = region() if model == "nvdimm" else region(model="virtio-pmem", pci=0x10)
    st = replace(state("data", "/mnt/data", mount_dax=True, mode=mode), model=model)
    (report,) = verify(DaxGuest(), plan_of(r), [st])  # a real guest's DAX-positive probe
    assert (report.dax, report.xip_ok, report.data_ok) == (dax, True, True)
    # the same rule for the regions verify does not write to
    none = replace(r, filesystem="none", mount=None)
    (raw,) = verify(DaxGuest(), plan_of(none), [replace(st, mountpoint=None, device_dax=True)])
    assert raw.dax is dax
    ro = replace(r, readonly=True)
    (read_only,) = verify(DaxGuest(), plan_of(ro), [st])
    # a readonly nvdimm is a raw namespace (issue 17): DAX does not apply
    assert read_only.dax is (None if model == "nvdimm" else dax)


def test_verify_of_three_regions_is_one_guest_program_run(tmp_path: Path) -> None:
    """Was two python3 runs per region and a sync; the checks themselves are the same (see above)."""
    mounts = [tmp_path / n for n in ("a", "b", "c")]
    for m in mounts:
        m.mkdir()
    plan = plan_of(*(region(n, slot=i, mount=str(m)) for i, (n, m) in enumerate(zip("abc", mounts, strict=True))))
    runner = LocalRunner()
    reports = verify(runner, plan, [state(n, str(m)) for n, m in zip("abc", mounts, strict=True)])
    assert len(runner.commands) == 1 and runner.commands[0].startswith("python3 -I -S -c ")
    for report, m in zip(reports, mounts, strict=True):
        assert report.data_ok is True and report.xip_ok is False  # no DAX on this host
        assert report.payload_path == str(m / ".nvmprov-payload")
        data = Path(report.payload_path).read_bytes()
        assert data.startswith((report.marker or "").encode()) and len(data) == PAYLOAD_BYTES + len(report.marker or "")
        assert hashlib.sha256(data).hexdigest() == report.payload_sha256
        assert [p.name for p in m.iterdir()] == [".nvmprov-payload"]  # each probe cleaned up
    assert len({r.marker for r in reports}) == 3
    guest = DaxGuest()
    verify(guest, plan, [state(n, str(m), mount_dax=True) for n, m in zip("abc", mounts, strict=True)])
    assert guest.execs == 1  # the program's own final sync replaces the separate `sync` exec
    (request,) = guest.requests
    assert request["scratch"] == "/var/tmp" and request["program"] == "/usr/bin/true"
    assert [(r["name"], r["probe"], r["payload"]["size_bytes"]) for r in request["regions"]] == [  # type: ignore[index,union-attr]
        (n, str(m), PAYLOAD_BYTES) for n, m in zip("abc", mounts, strict=True)
    ]


def test_the_region_node_is_checked_against_sysfs_target_node() -> None:
    on_one = replace(region("raw", fs="none", mount=None), numa_node=1)
    plan = plan_of(on_one, region("far", slot=1, fs="none", mount=None))
    got = verify(LocalRunner(), plan, [replace(state("raw", None, fs=None, device_dax=True), target_node=1),
                                       replace(state("far", None, fs=None, device_dax=True), target_node=1)])
    assert [(r.numa_node, r.target_node, r.node_ok) for r in got] == [(1, 1, True), (0, 1, False)]
