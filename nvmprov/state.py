"""Per-guest local state (keys, known_hosts, console copy, last report) and the locks.

Root keeps it in /var/lib/nvmprov/state; other users in $XDG_STATE_HOME/nvmprov. Everything 0700/0600.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LockedError, UsageError

if TYPE_CHECKING:
    from .identity import Hypervisor


def state_root() -> Path:
    override = os.environ.get("NVMPROV_STATE_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/nvmprov/state")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "nvmprov"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@dataclass(frozen=True)
class GuestFiles:
    """Where one guest's local files live. Names are validated by the spec before they get here."""

    dir: Path

    @property
    def client_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def client_key_pub(self) -> Path:
        return self.dir / "id_ed25519.pub"

    @property
    def host_key_pub(self) -> Path:
        return self.dir / "host_ed25519.pub"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def report(self) -> Path:
        return self.dir / "report.json"

    @property
    def spec_json(self) -> Path:
        return self.dir / "spec.json"

    @property
    def console_copy(self) -> Path:
        return self.dir / "console.log"


# The spec's guest-name rule, checked again where a name becomes a path: names typed on the command
# line (start, destroy, ssh, ...) reach here without passing through the spec.
_GUEST_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def valid_name(name: str) -> bool:
    return _GUEST_NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    """NAME when it is a valid nvmprov guest name, else UsageError (before any file is touched)."""
    if not _GUEST_NAME.fullmatch(name):
        raise UsageError(
            f"{name!r} is not an nvmprov guest name; names are 1-63 lowercase letters, digits and '-' "
            "(`nvmprov list` shows the guests)"
        )
    return name


def hypervisor_dir(hv: Hypervisor) -> Path:
    return state_root() / "hypervisors" / hv.key


def guest_files(name: str, hv: Hypervisor | None = None, *, create: bool = True) -> GuestFiles:
    """The files of guest NAME of hypervisor HV (identity.py): state/hypervisors/KEY/guests/NAME, so
    one name on two hypervisors never shares them. HV None: the layout before hypervisors were
    told apart (state/guests/NAME), read only to migrate it (adopt_legacy)."""
    check_name(name)
    root = (state_root() if hv is None else hypervisor_dir(hv)) / "guests"
    path = root / name
    if create:
        _private_dir(root)
        _private_dir(path)
        if hv is not None:
            _remember(hv)
    return GuestFiles(path)


def _remember(hv: Hypervisor) -> None:
    """hypervisor.json: how this hypervisor was reached last (for `list --all`)."""
    record = hypervisor_dir(hv) / "hypervisor.json"
    text = json.dumps({"uri": hv.uri, "host_uuid": hv.host_uuid, "driver": hv.driver}, sort_keys=True) + "\n"
    with contextlib.suppress(OSError):
        if record.read_text() == text:
            return
    write_private(record, text)


def known_hypervisors() -> list[dict[str, str]]:
    """Every hypervisor nvmprov keeps guest state for: its hypervisor.json (uri, host_uuid, driver)."""
    found = []
    for record in sorted((state_root() / "hypervisors").glob("*/hypervisor.json")):
        with contextlib.suppress(OSError, ValueError):
            found.append({**json.loads(record.read_text()), "key": record.parent.name})
    return found


def adopt_legacy(name: str, hv: Hypervisor, domain_uuid: str) -> GuestFiles:
    """The files of NAME under HV, moving them there from the old layout (state/guests/NAME) when
    only that exists. Called once nvmprov's domain NAME is found on HV: the old layout did not say
    which hypervisor its files were for, and the first one that has the guest takes them."""
    legacy = guest_files(name, create=False)
    files = guest_files(name, hv, create=False)
    if legacy.dir.is_dir() and not files.dir.exists():
        _private_dir(files.dir.parent)
        os.rename(legacy.dir, files.dir)
    if files.dir.is_dir():
        _remember(hv)
        if recorded_domain_uuid(files) is None:
            record_domain(files, domain_uuid)
    return files


def current_files(name: str, hv: Hypervisor) -> GuestFiles:
    """Where NAME's files are, for commands that only read (list, show): under HV, or still in the
    old layout; nothing is moved (a command that acts on the guest moves them: adopt_legacy)."""
    files = guest_files(name, hv, create=False)
    legacy = guest_files(name, create=False)
    return legacy if not files.dir.exists() and legacy.dir.is_dir() else files


def record_domain(files: GuestFiles, domain_uuid: str) -> None:
    """The UUID of the domain these files belong to: a domain replaced under the same name differs."""
    write_private(files.dir / "domain.json", json.dumps({"uuid": domain_uuid}) + "\n")


def recorded_domain_uuid(files: GuestFiles) -> str | None:
    try:
        return str(json.loads((files.dir / "domain.json").read_text())["uuid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_private(path: Path, data: bytes | str) -> None:
    """Write a file readable by its owner only, replacing it atomically."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def _flocked(filename: str, operation: int, busy: Callable[[int], str] | None = None) -> Iterator[int]:
    """Hold flock OPERATION on locks/FILENAME (0600) while the block runs; closing drops it. With
    LOCK_NB, a lock held elsewhere raises LockedError(BUSY(fd)) at once."""
    locks = _private_dir(state_root() / "locks")
    fd = os.open(locks / filename, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, operation)
        except OSError as exc:
            if busy is None or exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(busy(fd)) from None
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock(name: str, *, what: str = "guest", hv: Hypervisor | None = None) -> Iterator[None]:
    """Hold the lock for one guest name (of hypervisor HV: one name on two hypervisors is two
    guests), failing at once (naming the holder) when it is taken."""
    if what == "guest":
        check_name(name)

    def busy(fd: int) -> str:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
        return (f"{what} {name!r} is busy: another nvmprov holds its lock ({holder}); "
                "wait for it to finish, or stop that process")

    filename = f"{what}-{name}.lock" if hv is None else f"{what}-{hv.key}-{name}.lock"
    with _flocked(filename, fcntl.LOCK_EX | fcntl.LOCK_NB, busy) as fd:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield


@contextlib.contextmanager
def host_lock(name: str) -> Iterator[None]:
    """A blocking host-wide lock (e.g. while choosing an SSH port)."""
    with _flocked(f"host-{name}.lock", fcntl.LOCK_EX):
        yield


@contextlib.contextmanager
def shared_lock(name: str, *, exclusive: bool) -> Iterator[None]:
    """A blocking host-wide readers-writer lock: many hold it shared, or one exclusively."""
    with _flocked(f"host-{name}.lock", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def pool_lock(hypervisor: str, pool: str, *, exclusive: bool = False) -> Iterator[None]:
    """create and attach hold a pool shared (waiting while a prune runs); prune holds it exclusively
    and fails at once while any create or attach runs. HYPERVISOR is identity.Hypervisor.key.
    A flock of this machine: another controller machine driving the same hypervisor is not held."""

    def busy(_fd: int) -> str:
        return f"pool {pool!r} is busy: an nvmprov create or attach is using it; run this again when it has finished"

    with _flocked(f"pool-{hypervisor}-{pool}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH,
                  busy):
        yield
