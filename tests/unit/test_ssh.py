"""nvmprov.ssh against a real, throwaway OpenSSH server on 127.0.0.1 (no VM needed).

The `host` tier: it needs OpenSSH's server, which scripts/setup.sh installs (tox -e host).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nvmprov import ssh
from nvmprov.errors import GuestError, GuestTimeout, RemoteCommandError

SSHD = "/usr/sbin/sshd"
SSHD_READY_S = 10.0


pytestmark = pytest.mark.host


def _require_sshd() -> None:
    """The tests are real: a missing sshd fails them (no skip), and no test installs anything."""
    if not os.path.exists(SSHD):
        pytest.fail(f"{SSHD} is missing; run scripts/setup.sh (it installs openssh-server)")


def _write_keypair(directory: Path, name: str) -> tuple[Path, str]:
    key = Ed25519PrivateKey.generate()
    private = directory / name
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + f" {name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, deadline_s: float) -> None:
    deadline = ssh.Deadline("sshd listening", deadline_s)
    while not deadline.expired:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {deadline_s} s")


@dataclass
class Sshd:
    directory: Path
    port: int
    host_public_key: str
    client_key: Path
    user: str

    def target(self, **changes: object) -> ssh.SshTarget:
        t = ssh.SshTarget("127.0.0.1", self.port, self.user, str(self.client_key), self.host_public_key)
        return replace(t, **changes)  # type: ignore[arg-type]

    def start(self, port: int) -> subprocess.Popen[bytes]:
        config = self.directory / f"sshd_config.{port}"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.directory / 'host_key'}",
                    f"AuthorizedKeysFile {self.directory / 'authorized_keys'}",
                    f"PidFile {self.directory / f'sshd.{port}.pid'}",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        return subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    _require_sshd()
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir sshd insists on
    directory = tmp_path_factory.mktemp("sshd")
    host_key, host_public = _write_keypair(directory, "host_key")
    client_key, client_public = _write_keypair(directory, "client_key")
    (directory / "authorized_keys").write_text(client_public + "\n")
    server = Sshd(directory, _free_port(), host_public, client_key, os.environ.get("USER") or _whoami())
    proc = server.start(server.port)
    try:
        _wait_listening(server.port, SSHD_READY_S)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def session(sshd: Sshd) -> Iterator[ssh.Session]:
    with ssh.connect(sshd.target(), deadline_s=10) as s:
        yield s


# --- pure parts -------------------------------------------------------------------------------

HOSTILE = [
    "plain",
    "two words",
    "$(touch /tmp/nvmprov-pwned)",
    "`touch /tmp/nvmprov-pwned`",
    "'; touch /tmp/nvmprov-pwned; '",
    '"; touch /tmp/nvmprov-pwned; "',
    "a\nb; touch /tmp/nvmprov-pwned",
    "-n",
    "*",
    "$HOME",
    "",
    "back\\slash",
    "%s %d",
]


@pytest.mark.parametrize("arg", HOSTILE)
def test_render_command_keeps_each_argument_one_word(arg: str) -> None:
    rendered = ssh.render_command("printf '%%s' %s", arg)
    out = subprocess.run(["sh", "-c", rendered], capture_output=True, text=True, check=True).stdout
    assert out == arg
    assert not os.path.exists("/tmp/nvmprov-pwned")


def test_render_command_without_args_leaves_percent_alone() -> None:
    assert ssh.render_command("date +%s") == "date +%s"
    assert ssh.render_command("echo %s %s", "a b", 3) == "echo 'a b' 3"


def test_wrap_sudo_keeps_redirection_inside(tmp_path: Path) -> None:
    # A stand-in sudo that drops "-n --" and runs the rest, to check the quoting really nests.
    fake = tmp_path / "sudo"
    fake.write_text('#!/bin/sh\n[ "$1" = -n ] && [ "$2" = -- ] || exit 99\nshift 2\nexec "$@"\n')
    fake.chmod(0o755)
    target = tmp_path / "out file"
    command = ssh.wrap_sudo(ssh.render_command("printf %s > %s", "x'y", str(target)))
    subprocess.run(["sh", "-c", command], check=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert target.read_text() == "x'y"


def test_parse_public_key_rejects_garbage() -> None:
    with pytest.raises(GuestError, match="not an OpenSSH public key"):
        ssh.parse_public_key("ssh-ed25519")
    with pytest.raises(GuestError, match="cannot be parsed"):
        ssh.parse_public_key("ssh-ed25519 !!!notbase64!!!")


def test_known_hosts_name() -> None:
    assert ssh.SshTarget("127.0.0.1", 2222, "u", "k", "h").known_hosts_name == "[127.0.0.1]:2222"
    assert ssh.SshTarget("127.0.0.1", 22, "u", "k", "h").known_hosts_name == "127.0.0.1"


# --- against the real sshd -----------------------------------------------------------------------


def test_run_returns_rc_stdout_stderr(session: ssh.Session) -> None:
    r = session.run("echo out; echo err >&2; exit 3", check=False)
    assert (r.rc, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert r.command == "echo out; echo err >&2; exit 3"


def test_run_check_raises_with_command_status_and_stderr_tail(session: ssh.Session) -> None:
    with pytest.raises(RemoteCommandError) as e:
        session.run("ls %s", "/nonexistent dir")
    assert e.value.exit_status == 2
    assert e.value.command == "ls '/nonexistent dir'"
    assert "No such file" in e.value.stderr
    assert "exit 2" in str(e.value)


@pytest.mark.parametrize("arg", HOSTILE)
def test_run_hostile_arguments_stay_data(session: ssh.Session, arg: str) -> None:
    r = session.run("printf '%%s' %s", arg)
    assert r.stdout == arg
    assert not os.path.exists("/tmp/nvmprov-pwned")


def test_run_stdin_roundtrip(session: ssh.Session) -> None:
    data = os.urandom(300_000)
    r = session.run("sha256sum", stdin=data)
    import hashlib

    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_run_reads_large_stdout_and_stderr_without_deadlock(session: ssh.Session) -> None:
    # 4 MiB on stderr first: more than the channel window, so a reader that waited on
    # stdout first would hang here.
    r = session.run("head -c 4194304 /dev/zero | tr '\\0' e >&2; head -c 4194304 /dev/zero | tr '\\0' o", timeout_s=60)
    assert len(r.stderr) == 4194304 and len(r.stdout) == 4194304
    assert set(r.stdout) == {"o"} and set(r.stderr) == {"e"}


def test_run_timeout_raises_guest_timeout(session: ssh.Session) -> None:
    start = time.monotonic()
    with pytest.raises(GuestTimeout, match="did not finish within 0.5 s"):
        session.run("sleep 10", timeout_s=0.5)
    assert time.monotonic() - start < 3
    assert session.run("echo still usable").stdout == "still usable\n"


def test_sock_factory_is_used(sshd: Sshd) -> None:
    made: list[socket.socket] = []

    def factory() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", sshd.port), timeout=5)
        made.append(s)
        return s

    # host is only a name now: the pinned key is looked up under it, the socket goes where the factory says
    with ssh.connect(sshd.target(host="guest.invalid", sock_factory=factory), deadline_s=10) as s:
        assert s.run("echo tunnel").stdout == "tunnel\n"
    assert len(made) == 1


def test_host_key_mismatch_fails_at_once(sshd: Sshd, tmp_path: Path) -> None:
    _, other_public = _write_keypair(tmp_path, "other")
    start = time.monotonic()
    with pytest.raises(GuestError, match="host key mismatch") as e:
        ssh.connect(sshd.target(host_public_key=other_public), deadline_s=30)
    assert time.monotonic() - start < 5  # not retried until the deadline
    assert not isinstance(e.value, GuestTimeout)
    expected = ssh.parse_public_key(other_public).fingerprint
    offered = ssh.parse_public_key(sshd.host_public_key).fingerprint
    assert f"expected ssh-ed25519 {expected}" in str(e.value)
    assert f"offered ssh-ed25519 {offered}" in str(e.value)


def test_wrong_port_times_out_within_deadline(sshd: Sshd) -> None:
    progress: list[str] = []
    start = time.monotonic()
    with pytest.raises(GuestTimeout, match="not ready after 2 s") as e:
        ssh.connect(sshd.target(port=_free_port()), deadline_s=2, progress=progress.append)
    elapsed = time.monotonic() - start
    assert 1.9 < elapsed < 3.5
    assert "refused" in str(e.value).lower()
    attempts = int(re.search(r"\((\d+) attempts\)", str(e.value)).group(1))
    assert attempts >= 3  # backoff retried several times, starting small
    assert len(progress) == 1, progress  # ... and said so once (a line per ATTEMPT_REPORT_EVERY_S)


def test_unknown_client_key_retries_then_says_authentication(sshd: Sshd, tmp_path: Path) -> None:
    stranger, _ = _write_keypair(tmp_path, "stranger")
    with pytest.raises(GuestTimeout, match="authentication as .* failed"):
        ssh.connect(sshd.target(client_key_path=str(stranger)), deadline_s=2)


def test_missing_client_key_is_a_guest_error(sshd: Sshd, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="cannot load SSH client key"):
        ssh.connect(sshd.target(client_key_path=str(tmp_path / "nope")), deadline_s=2)


def _reset_server(port: int, stop: threading.Event) -> threading.Thread:
    """Accept and drop connections at once, as QEMU's user-network forward does while the guest boots."""
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.1)

    def loop() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_waits_through_dropped_banners_until_sshd_comes_up(sshd: Sshd) -> None:
    port = _free_port()
    stop = threading.Event()
    dropper = _reset_server(port, stop)
    progress: list[str] = []
    late: list[subprocess.Popen[bytes]] = []

    def boot_finishes() -> None:
        time.sleep(1.5)
        stop.set()
        dropper.join()
        late.append(sshd.start(port))

    threading.Thread(target=boot_finishes, daemon=True).start()
    try:
        with ssh.connect(sshd.target(port=port), deadline_s=20, progress=progress.append) as s:
            assert s.run("echo booted").stdout == "booted\n"
        assert any("banner" in p.lower() or "eof" in p.lower() for p in progress), progress
    finally:
        for p in late:
            p.terminate()
            p.wait(timeout=10)


def test_abort_check_stops_the_wait_early(sshd: Sshd) -> None:
    calls: list[int] = []

    def abort_check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise GuestError("kernel panic on the console")

    start = time.monotonic()
    with pytest.raises(GuestError, match="kernel panic"):
        ssh.connect(sshd.target(port=_free_port()), deadline_s=30, abort_check=abort_check)
    assert time.monotonic() - start < 3
    assert len(calls) == 2


def test_dropped_banners_print_nothing_on_stderr(sshd: Sshd) -> None:
    """paramiko logs each failed banner with a traceback; a boot wait must not spray them on a terminal.

    In a child process: pytest's own log capture would hide the problem here.
    """
    port = _free_port()
    stop = threading.Event()
    dropper = _reset_server(port, stop)
    script = (
        "import sys\n"
        "from nvmprov import ssh\n"
        "from nvmprov.errors import GuestTimeout\n"
        f"t = ssh.SshTarget('127.0.0.1', {port}, 'u', {str(sshd.client_key)!r}, {sshd.host_public_key!r})\n"
        "try:\n"
        "    ssh.connect(t, deadline_s=1.5)\n"
        "except GuestTimeout as e:\n"
        "    print(e)\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    finally:
        stop.set()
        dropper.join()
    assert "not ready after" in proc.stdout
    assert proc.stderr == ""


def _refusing_guest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list[float], list[float], ssh.SshTarget]:
    """A simulated clock (sleep advances it) and a guest whose every SSH attempt is refused at once."""
    clock = [1000.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        clock[0] += seconds

    def refused(*_args: object) -> object:
        raise ssh._Retry("connection refused (sshd not listening yet)")

    monkeypatch.setattr(ssh.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ssh.time, "sleep", sleep)
    monkeypatch.setattr(ssh, "_connect_once", refused)
    key, public = _write_keypair(tmp_path, "k")
    return clock, pauses, ssh.SshTarget("127.0.0.1", 1, "u", str(key), public)


def test_refused_attempts_are_retried_every_quarter_second_until_the_deadline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Simulated clock: every attempt is refused at once (cheap for the guest): a pause of 0.25 s
    each, no growth, stopping exactly at the deadline."""
    clock, pauses, target = _refusing_guest(monkeypatch, tmp_path)
    with pytest.raises(GuestTimeout, match="not ready after 10 s"):
        ssh.connect(target, deadline_s=10)
    assert set(pauses) == {ssh.RETRY_PAUSE_S} == {0.25}
    assert sum(pauses) == pytest.approx(10.0)  # waited exactly until the deadline, not past it
    assert clock[0] == pytest.approx(1010.0)


def test_authentication_failures_back_off_to_one_second(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An authentication failure cost the guest a key exchange: the pauses after those double up to
    1 s, while a refused attempt in between still waits only 0.25 s."""
    _clock, pauses, target = _refusing_guest(monkeypatch, tmp_path)
    outcomes = iter([True, True, False, True, True, True] + [True] * 100)

    def fails(*_args: object) -> object:
        costly = next(outcomes)
        raise ssh._Retry("authentication failed" if costly else "connection refused", costly=costly)

    monkeypatch.setattr(ssh, "_connect_once", fails)
    with pytest.raises(GuestTimeout, match="authentication failed"):
        ssh.connect(target, deadline_s=10)
    assert pauses[:6] == [0.25, 0.5, 0.25, 1.0, 1.0, 1.0]
    assert max(pauses) == ssh.AUTH_BACKOFF_CAP_S == 1.0


def test_no_attempt_until_ready_then_each_gets_the_full_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With `ready` (the built-in image's console line): no connection is tried while it says no,
    the abort check still runs every 0.25 s, it is not asked again once it said yes, and every
    attempt then gets ATTEMPT_TIMEOUT_CAP_S (the guest has its address: nothing hangs in slirp)."""
    clock, pauses, target = _refusing_guest(monkeypatch, tmp_path)
    caps: list[float] = []
    asked: list[float] = []
    checks: list[float] = []

    def refused(*args: object) -> object:
        caps.append(args[4])  # type: ignore[arg-type]
        raise ssh._Retry("connection refused (sshd not listening yet)")

    def ready() -> bool:
        asked.append(clock[0])
        return clock[0] >= 1003.0

    monkeypatch.setattr(ssh, "_connect_once", refused)
    with pytest.raises(GuestTimeout, match=r"not ready after 5 s \((\d+) attempts\)") as failure:
        ssh.connect(target, deadline_s=5, ready=ready, abort_check=lambda: checks.append(clock[0]))
    assert asked[-1] == pytest.approx(1003.0) and len(asked) == 13  # 0, 0.25 ... 3.0 s; then no more
    assert set(caps) == {ssh.ATTEMPT_TIMEOUT_CAP_S}
    assert len(caps) == int(re.search(r"\((\d+) attempts\)", str(failure.value)).group(1)) == 9  # 3.0 ... 5.0 s
    assert set(pauses) == {0.25} and len(checks) == len(pauses) + 1


def test_never_ready_says_so_at_the_deadline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clock, _pauses, target = _refusing_guest(monkeypatch, tmp_path)
    with pytest.raises(GuestTimeout, match=r"\(0 attempts\); last error: the guest has not said it has its network"):
        ssh.connect(target, deadline_s=3, ready=lambda: False)


def test_most_attempts_are_short_and_every_fourth_gets_the_full_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An attempt stuck in slirp's SYN retries is made afresh after SHORT_ATTEMPT_S; a guest too
    slow for that still gets ATTEMPT_TIMEOUT_CAP_S every FULL_ATTEMPT_EVERY attempts."""
    clock, _pauses, target = _refusing_guest(monkeypatch, tmp_path)
    caps: list[float] = []

    def refused(*args: object) -> object:
        caps.append(args[4])  # type: ignore[arg-type]
        raise ssh._Retry("connection refused (sshd not listening yet)")

    monkeypatch.setattr(ssh, "_connect_once", refused)
    with pytest.raises(GuestTimeout):
        ssh.connect(target, deadline_s=10)
    short, full = ssh.SHORT_ATTEMPT_S, ssh.ATTEMPT_TIMEOUT_CAP_S
    assert caps[:8] == [short, short, short, full, short, short, short, full]


def test_attempt_lines_are_throttled_while_the_guest_boots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """60 s of refused attempts (about 60 of them) give one line per 15 s, not one per attempt."""
    clock, _pauses, target = _refusing_guest(monkeypatch, tmp_path)
    lines: list[tuple[float, str]] = []
    with pytest.raises(GuestTimeout, match=r"not ready after 60 s \((\d+) attempts\)") as failure:
        ssh.connect(target, deadline_s=60, progress=lambda text: lines.append((clock[0], text)))
    attempts = int(re.search(r"\((\d+) attempts\)", str(failure.value)).group(1))
    assert attempts > 50
    assert 4 <= len(lines) <= 5, lines  # at 0, 15, 30, 45 (and 60) s
    assert lines[0][1].startswith("ssh 127.0.0.1:1 attempt 1: connection refused")
    gaps = [b[0] - a[0] for a, b in zip(lines, lines[1:], strict=False)]
    assert all(gap >= ssh.ATTEMPT_REPORT_EVERY_S for gap in gaps), gaps


def test_run_strips_the_guests_escape_sequences(session: ssh.Session) -> None:
    """Guest output is untrusted (issue 12): no terminal escapes or controls reach nvmprov's text."""
    hostile = r"\033]0;pwned\007\033[31mred\033[0m\001\015ok"
    r = session.run(f"printf '{hostile}\\n'; printf '{hostile}' >&2", check=False)
    assert (r.stdout, r.stderr) == ("redok\n", "redok")
    with pytest.raises(RemoteCommandError) as e:
        session.run(f"printf '{hostile}' >&2; exit 1")
    assert "\x1b" not in str(e.value) and str(e.value).endswith(": redok")
