"""Watching a guest boot: its serial log, kernel panics, a domain that died, and SSH port choice."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from . import session, uris
from .domain import SSH_FORWARD_HOST
from .errors import GuestError, HostError
from .state import write_private
from .textsafe import clean

PANIC_MARKERS = ("Kernel panic", "end Kernel panic", "Unable to mount root fs")
# The built-in image's seed applier (apply_seed.sh) ends with this line on the console once eth0 has
# its address, or stops with the second; the serial log starts empty at each start (domain.py:
# append='off'), so either is about this boot.
SEED_APPLIED_MARKER = "nvmprov-seed: applied"
SEED_FAILED_MARKER = "nvmprov-seed: error:"
LOG_DIR = "/var/log/libvirt/qemu"
SSH_PORT_RANGE = range(40022, 40922)
COPY_MAX_BYTES = 4 * 1024 * 1024  # virtlogd rotates at 2 MiB; a guest could print without end


def console_log_path(name: str, uri: str | None = None) -> str:
    """Where virtlogd keeps the guest's serial output (on the hypervisor; a session's in the user's
    own directory, as its virtlogd runs as the user)."""
    if uri is not None and uris.is_session(uri):
        return session.console_log_path(name)
    return f"{LOG_DIR}/{name}-nvmprov-serial.log"


def read_tail(path: str, *, max_lines: int = 25) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return tail_lines(text, max_lines)


def panic_in(log_text: str) -> bool:
    return any(marker in log_text for marker in PANIC_MARKERS)


def tail_lines(text: str, max_lines: int) -> str:
    """The last MAX_LINES lines of a serial log, without the guest's escape sequences and controls."""
    return "\n".join(clean(text.replace("\r", "")).splitlines()[-max_lines:])


def check_boot_text(name: str, tail: str, *, active: bool) -> None:
    """Raise at once when the serial log's tail (read here, or on a remote hypervisor over its SSH)
    shows a panic, or the domain is no longer running."""
    if panic_in(tail):
        raise GuestError(
            f"guest {name} panicked while booting; last console lines:\n" + "\n".join(tail.splitlines()[-20:])
        )
    if SEED_FAILED_MARKER in tail:
        raise GuestError(
            f"guest {name} could not apply its seed (no login will work); last console lines:\n"
            + "\n".join(tail.splitlines()[-20:])
        )
    if not active:
        raise GuestError(
            f"guest {name} stopped while booting; last console lines:\n" + "\n".join(tail.splitlines()[-20:])
        )


def seed_applied(tail: str) -> bool:
    """The built-in image's console says its seed is applied: its network address is set, and sshd
    starts next."""
    return SEED_APPLIED_MARKER in tail


# The gate waits for the seed line no longer than this: a boot that never prints it fails or
# succeeds as it did before the gate existed.
SEED_LINE_WAIT_S = 90.0
# A console log that stays empty this long cannot be read (a remote hypervisor's log belongs to
# root, read_tail gives ''): the gate opens, as the kernel prints within a second or two of start.
CONSOLE_SILENT_S = 10.0


class SeedLineGate:
    """ssh.connect's `ready` for the built-in image on a domain started just now: yes once the
    console (READ gives its tail) says the seed is applied, or it stayed empty CONSOLE_SILENT_S, or
    SEED_LINE_WAIT_S have passed."""

    def __init__(self, read: Callable[[], str], now: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._now = now
        self._began = now()
        self._seen_text = False

    def __call__(self) -> bool:
        tail = self._read()
        self._seen_text = self._seen_text or bool(tail)
        waited = self._now() - self._began
        if seed_applied(tail) or waited >= SEED_LINE_WAIT_S:
            return True
        return not self._seen_text and waited >= CONSOLE_SILENT_S


def copy_log(log_path: str, dest: Path) -> None:
    """Keep the end of the serial log (at most COPY_MAX_BYTES) as cleaned text, mode 0600."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - COPY_MAX_BYTES))
            write_private(dest, clean(fh.read().decode(errors="replace")))
    except OSError:
        pass


def free_port(taken: Iterable[int], candidates: Iterable[int] = SSH_PORT_RANGE) -> int:
    """A loopback TCP port nobody listens on and no other nvmprov guest has claimed."""
    claimed = set(taken)
    for port in candidates:
        if port in claimed:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((SSH_FORWARD_HOST, port))
            except OSError:
                continue
            return port
    raise HostError(f"no free SSH port on {SSH_FORWARD_HOST} in the nvmprov range; destroy unused guests")
