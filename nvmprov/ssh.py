"""SSH to a guest: pinned host key, a deadline with backoff, quoted remote commands.

Only paramiko is used; nothing here reads ~/.ssh (no known_hosts, no agent, no default keys).
Remote commands are templates with `%s` placeholders; every argument is shell-quoted.
"""

from __future__ import annotations

import base64
import binascii
import logging
import select
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import paramiko

from nvmprov.errors import GuestError, GuestTimeout, RemoteCommandError
from nvmprov.textsafe import clean, clean_bytes

log = logging.getLogger(__name__)
# paramiko logs every failed banner exchange with a traceback at ERROR; without a handler Python
# prints that on stderr, and while a guest boots those failures are expected. An application that
# configures logging still receives them through propagation.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

Progress = Callable[[str], None]

RETRY_PAUSE_S = 0.25
# Attempts are cheap while nothing listens (QEMU's slirp answers the forward locally, the guest's
# kernel resets it): a longer pause only means noticing sshd that much late. An authentication
# failure is not cheap (sshd did a whole key exchange on the guest's one CPU, its seed not yet
# applied): after those the pause doubles, 0.25, 0.5, 1, 1 ... seconds.
AUTH_BACKOFF_CAP_S = 1.0
# With short pauses a TCG boot makes ~100 failed attempts: report the first, then one line per this
# many seconds, so progress stays a line per phase and not a line per attempt.
ATTEMPT_REPORT_EVERY_S = 15.0
# one TCP connect + banner + auth; slirp holds a connection silently until the guest listens
ATTEMPT_TIMEOUT_CAP_S = 12.0
# An attempt made before the guest has its address hangs in QEMU's slirp, which accepted it and
# retries its SYN to the guest 3 s, then 6 s later: sshd, up meanwhile, was noticed ~5 s late.
# So, unless the caller knows the guest has its address (`ready`), most attempts get this much time
# and are then made afresh; every FULL_ATTEMPT_EVERY-th gets the full ATTEMPT_TIMEOUT_CAP_S, for a
# guest too slow to answer within the short time.
SHORT_ATTEMPT_S = 4.0
FULL_ATTEMPT_EVERY = 4
READ_POLL_S = 0.05  # wake-up interval while a remote command runs
READ_CHUNK_BYTES = 65536
START_TIMEOUT_S = 30.0  # open a channel and send a started command its first input


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int
    user: str
    client_key_path: str
    host_public_key: str  # "ssh-ed25519 AAAA... [comment]"
    sock_factory: Callable[[], socket.socket] | None = None  # an already-connected socket (tunnels)

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH and paramiko file a host key under."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str
    command: str


class Deadline:
    """A named point in time; `remaining_s` never goes below zero."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    @property
    def remaining_s(self) -> float:
        return max(0.0, self._end - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.remaining_s <= 0.0


def parse_public_key(text: str) -> paramiko.PKey:
    """Parse one OpenSSH public key line ("TYPE BASE64 [comment]") into a paramiko key."""
    fields = text.split()
    if len(fields) < 2:
        raise GuestError(f"pinned host key is not an OpenSSH public key line: {text[:40]!r}")
    key_type, blob = fields[0], fields[1]
    try:
        return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob, validate=True))
    except (binascii.Error, ValueError, paramiko.SSHException) as e:
        raise GuestError(f"pinned host key ({key_type}) cannot be parsed: {e}") from e


def render_command(cmd: str, *args: object) -> str:
    """Fill `%s` placeholders with shell-quoted arguments (testinfra style).

    Without arguments the template is returned as is, so `%` needs no escaping then.
    """
    if not args:
        return cmd
    return cmd % tuple(shlex.quote(str(a)) for a in args)


def wrap_sudo(command: str) -> str:
    """Run `command` as root through a non-interactive sudo, keeping redirections inside."""
    return f"sudo -n -- sh -c {shlex.quote(command)}"


def connect(
    target: SshTarget,
    *,
    deadline_s: float,
    progress: Progress | None = None,
    abort_check: Callable[[], None] | None = None,
    ready: Callable[[], bool] | None = None,
) -> Session:
    """Wait for the guest's SSH server and log in, until `deadline_s` seconds have passed.

    Refused/reset/EOF/timeouts and authentication failures are retried (the guest may still be
    booting, or its seed not yet applied); a host key other than the pinned one fails at once.
    `abort_check` runs between attempts and may raise to give up early (a kernel panic on the
    console, the domain gone). `ready`, when given, says whether the guest has its network address
    yet (the built-in image says so on its console): until it does no attempt is made, since one
    made earlier sits in slirp until a SYN retry reaches the guest, seconds late, or reaches sshd
    after it was given up (an sshd started for nothing on the guest's one CPU); once it does, every
    attempt gets the full time.
    """
    pinned = parse_public_key(target.host_public_key)
    client_key = _load_client_key(target.client_key_path)
    deadline = Deadline("ssh", deadline_s)
    auth_pause_s = RETRY_PAUSE_S
    waiting = ready is not None  # for `ready`; asked until it says yes once
    attempt = 0
    last_error = "no attempt made"
    next_report_s = 0.0  # monotonic time of the next progress line
    while True:
        if waiting and ready is not None and not ready():
            last_error = "the guest has not said it has its network address yet"
            pause_s = RETRY_PAUSE_S
        else:
            waiting = False
            attempt += 1
            full = ready is not None or attempt % FULL_ATTEMPT_EVERY == 0
            cap_s = ATTEMPT_TIMEOUT_CAP_S if full else SHORT_ATTEMPT_S
            try:
                return Session(_connect_once(target, pinned, client_key, deadline, cap_s), target)
            except _Retry as e:
                last_error = clean(str(e))  # may quote the guest's SSH banner
                pause_s = RETRY_PAUSE_S
                if e.costly:
                    pause_s = auth_pause_s
                    auth_pause_s = min(auth_pause_s * 2, AUTH_BACKOFF_CAP_S)
        if progress is not None and time.monotonic() >= next_report_s:
            progress(f"ssh {target.host}:{target.port} attempt {attempt}: {last_error}")
            next_report_s = time.monotonic() + ATTEMPT_REPORT_EVERY_S
        if abort_check is not None:
            abort_check()
        if deadline.remaining_s <= 0:
            break
        time.sleep(min(pause_s, deadline.remaining_s))
    raise GuestTimeout(
        f"SSH to {target.user}@{target.host}:{target.port} not ready after {deadline_s:.0f} s "
        f"({attempt} attempts); last error: {last_error}"
    )


class _Retry(Exception):
    """An attempt failed in a way that is normal while a guest boots. `costly`: the guest's sshd
    did a whole key exchange for it (an authentication failure), so the next one waits longer."""

    def __init__(self, message: str, *, costly: bool = False) -> None:
        super().__init__(message)
        self.costly = costly


def _load_client_key(path: str) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise GuestError(f"cannot load SSH client key {path}: {e}") from e


def _connect_once(
    target: SshTarget,
    pinned: paramiko.PKey,
    client_key: paramiko.PKey,
    deadline: Deadline,
    cap_s: float = ATTEMPT_TIMEOUT_CAP_S,
) -> paramiko.SSHClient:
    timeout_s = max(0.1, min(deadline.remaining_s, cap_s))
    client = paramiko.SSHClient()
    # Only the pinned key is known; anything else is rejected (never AutoAddPolicy).
    client.get_host_keys().add(target.known_hosts_name, pinned.get_name(), pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        sock = _open_socket(target, timeout_s)
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            pkey=client_key,
            sock=sock,
            timeout=timeout_s,
            banner_timeout=timeout_s,
            auth_timeout=timeout_s,
            look_for_keys=False,
            allow_agent=False,
        )
        return client
    except paramiko.BadHostKeyException as e:
        client.close()
        raise GuestError(
            f"host key mismatch for {target.host}:{target.port}: expected {pinned.get_name()} "
            f"{pinned.fingerprint}, the server offered {e.key.get_name()} {e.key.fingerprint}. "
            "Refusing to connect: this is not the guest nvmprov created, or its keys were replaced."
        ) from e
    except paramiko.AuthenticationException as e:
        client.close()
        raise _Retry(
            f"authentication as {target.user} with {target.client_key_path} failed ({e}); "
            "the guest's seed (cloud-init, or nvmprov-seed in the built-in image) may not have installed the key yet",
            costly=True,
        ) from e
    except (OSError, EOFError, paramiko.SSHException) as e:
        client.close()
        raise _Retry(_describe(e)) from e
    except BaseException:
        client.close()
        raise


def _open_socket(target: SshTarget, timeout_s: float) -> socket.socket:
    # Opened here rather than by paramiko so "connection refused" reads as such.
    if target.sock_factory is not None:
        return target.sock_factory()
    return socket.create_connection((target.host, target.port), timeout=timeout_s)


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (sshd not listening yet)"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Session:
    """One logged-in SSH connection. Use as a context manager or call close()."""

    def __init__(self, client: paramiko.SSHClient, target: SshTarget) -> None:
        self._client = client
        self.target = target

    @property
    def is_root(self) -> bool:
        return self.target.user == "root"

    def run(
        self,
        cmd: str,
        *args: object,
        sudo: bool = False,
        check: bool = True,
        timeout_s: float = 300,
        stdin: bytes | None = None,
    ) -> Result:
        """Run a command template in the guest's shell; raise RemoteCommandError if check and rc != 0."""
        command = render_command(cmd, *args)
        wire = wrap_sudo(command) if sudo and not self.is_root else command
        log.debug("guest %s:%s run: %s", self.target.host, self.target.port, wire)
        rc, out, err = self._exec(wire, stdin, Deadline(f"command {command[:60]}", timeout_s))
        result = Result(rc, clean_bytes(out), clean_bytes(err), command)  # guest text: no escapes, no controls
        if check and rc != 0:
            raise RemoteCommandError(command, rc, result.stderr)
        return result

    def start(self, cmd: str, *args: object, sudo: bool = False, stdin: bytes = b"") -> RemoteProcess:
        """Start a command template that keeps running: write to it and read its lines as you go.

        `stdin` is sent first. The caller closes it (RemoteProcess.close) to end the command.
        """
        command = render_command(cmd, *args)
        wire = wrap_sudo(command) if sudo and not self.is_root else command
        log.debug("guest %s:%s start: %s", self.target.host, self.target.port, wire)
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"SSH connection to {self.target.host}:{self.target.port} is closed")
        chan = transport.open_session(timeout=START_TIMEOUT_S)
        try:
            chan.settimeout(START_TIMEOUT_S)
            chan.exec_command(wire)
        except BaseException:
            chan.close()
            raise
        process = RemoteProcess(chan, command)
        process.send(stdin)
        return process

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _exec(self, wire: str, stdin: bytes | None, deadline: Deadline) -> tuple[int, bytes, bytes]:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"SSH connection to {self.target.host}:{self.target.port} is closed")
        chan = transport.open_session(timeout=max(0.1, deadline.remaining_s))
        try:
            chan.settimeout(max(0.1, deadline.remaining_s))
            chan.exec_command(wire)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            return self._collect(chan, deadline)
        except TimeoutError as e:
            raise GuestTimeout(f"guest command did not finish within {deadline.seconds:g} s: {wire}") from e
        finally:
            chan.close()

    @staticmethod
    def _collect(chan: paramiko.Channel, deadline: Deadline) -> tuple[int, bytes, bytes]:
        # Read both streams as data arrives: reading one to its end first can deadlock
        # once the other fills the channel window.
        out: list[bytes] = []
        err: list[bytes] = []
        while True:
            if chan.recv_ready():
                out.append(chan.recv(READ_CHUNK_BYTES))
            elif chan.recv_stderr_ready():
                err.append(chan.recv_stderr(READ_CHUNK_BYTES))
            elif chan.closed or (chan.exit_status_ready() and chan.eof_received):
                return chan.recv_exit_status(), b"".join(out), b"".join(err)
            elif deadline.expired:
                raise TimeoutError
            else:
                select.select([chan], [], [], min(READ_POLL_S, deadline.remaining_s))


class RemoteProcess:
    """A command started in the guest (Session.start): send input, read its output line by line."""

    def __init__(self, chan: paramiko.Channel, command: str) -> None:
        self._chan = chan
        self.command = command
        self._out = bytearray()
        self._err = bytearray()

    def send(self, data: bytes) -> None:
        """Write to its stdin. A command that already exited takes nothing: read_line() then says so."""
        self._chan.settimeout(START_TIMEOUT_S)
        try:
            self._chan.sendall(data)
        except (OSError, EOFError) as e:
            log.debug("guest command took no more input (%s): %s", e, self.command)

    def read_line(self, timeout_s: float) -> bytes | None:
        """The next line of stdout (without its newline); None once the command has exited."""
        deadline = Deadline(f"command {self.command[:60]}", timeout_s)
        while b"\n" not in self._out:
            if not self._pump(deadline):
                if not self._out:
                    return None
                break
        line, _, rest = bytes(self._out).partition(b"\n")
        self._out[:] = rest
        return line

    @property
    def stderr(self) -> str:
        return clean_bytes(bytes(self._err[-4000:]))

    def close(self, timeout_s: float = START_TIMEOUT_S) -> int | None:
        """End its input, wait for it to exit; its exit status (None when it did not exit in time)."""
        try:
            self._chan.shutdown_write()
            deadline = Deadline(f"command {self.command[:60]}", timeout_s)
            while self._pump(deadline):
                pass
            return self._chan.recv_exit_status() if self._chan.exit_status_ready() else None
        except (OSError, EOFError, GuestTimeout):
            return None
        finally:
            self._chan.close()

    def _pump(self, deadline: Deadline) -> bool:
        """Read what arrived (both streams, so neither fills the window); False once it exited."""
        chan = self._chan
        if chan.recv_ready():
            self._out += chan.recv(READ_CHUNK_BYTES)
        elif chan.recv_stderr_ready():
            self._err += chan.recv_stderr(READ_CHUNK_BYTES)
        elif chan.closed or (chan.exit_status_ready() and chan.eof_received):
            return False
        elif deadline.expired:
            raise GuestTimeout(f"guest command gave no answer within {deadline.seconds:g} s: {self.command}")
        else:
            select.select([chan], [], [], min(READ_POLL_S, deadline.remaining_s))
        return True
