"""One exception tree. Only the CLI entry point turns these into a message and an exit status
(cli.exit_status: the exit map; an exception outside this tree is a bug there)."""

from __future__ import annotations

from .textsafe import clean


class NvmprovError(Exception):
    """Base of every error nvmprov raises on purpose; raise one of its subclasses."""


class UsageError(NvmprovError):
    """Bad command-line arguments or an operation that makes no sense for the given guest."""


class SpecError(NvmprovError):
    """A guest file that does not validate. Printed as FILE:LINE:COL: field.path: problem; fix."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        col: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.col = col
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.col is not None:
                    where += f":{self.col}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"


class HostError(NvmprovError):
    """The hypervisor side failed: libvirt unreachable, pool full, a volume in the way, ..."""


class VirtError(HostError):
    """A libvirt call failed (define, start, attach, ...)."""


class StorageError(HostError):
    """A storage pool or volume problem (space, size mismatch, volume in use)."""


class LockedError(HostError):
    """Another nvmprov process holds the lock for this guest."""


class GuestError(NvmprovError):
    """Inside the guest: boot failed, SSH refused or timed out, a remote command failed."""


class GuestTimeout(GuestError):
    """A named deadline passed while waiting on the guest."""


class RemoteCommandError(GuestError):
    """A command run in the guest exited non-zero."""

    def __init__(self, command: str, exit_status: int, stderr: str) -> None:
        self.command = command
        self.exit_status = exit_status
        self.stderr = stderr
        tail = "\n".join(clean(stderr).strip().splitlines()[-5:])  # the guest's words, no escapes
        super().__init__(f"guest command failed (exit {exit_status}): {command}" + (f": {tail}" if tail else ""))


class Interrupted(NvmprovError):
    """SIGINT or SIGTERM arrived; what this run made has been rolled back (unless --keep-on-failure)."""
