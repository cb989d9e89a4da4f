"""The guest program: one python3 start per agent phase, requests and answers over its stdin/stdout.

The program is the package resources nvmprov/agent/guest/*.py (stdlib only, run by the guest's own
python3). They travel on stdin, ahead of the requests, behind a fixed loader given to `python3 -c`:
nothing a request carries goes on a command line, so a request has no size limit. guest/serve.py
then answers one JSON line per request until stdin closes.

    with agent.program.started(session) as guest:   # one python3 start
        states = agent.apply(guest, plan)           # its fact rounds
        reports = agent.verify(guest, plan, states) # and the verification
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from importlib import resources
from typing import Any, Protocol

from nvmprov.errors import GuestError
from nvmprov.ssh import Result

# The modules, dependencies first; the last one's main() serves the phase.
MODULES = ("proc", "read_facts", "run_steps", "verify_regions", "serve")
# Reads the modules from stdin ("COUNT\n", then "NAME SIZE\n" + source, each), then serves.
LOADER = (
    "import sys, types\n"
    "r = sys.stdin.buffer\n"
    "for _ in range(int(r.readline())):\n"
    "    name, size = r.readline().decode().split()\n"
    "    m = sys.modules[name] = types.ModuleType(name)\n"
    "    exec(compile(r.read(int(size)), name + '.py', 'exec'), m.__dict__)\n"
    "m.main()\n"
)
# -S: no site module (the program uses the standard library alone; a third of python3's start-up
# here); -I: isolated from PYTHON* variables and the user's site directory, as a root program should be
COMMAND = "python3 -I -S -c %s"
START_S = 60.0  # python3's start and the first answer's wait beyond the request's own time
CLOSE_S = 30.0


class Process(Protocol):
    """A command running in the guest (nvmprov.ssh.RemoteProcess; tests pass their own)."""

    @property
    def stderr(self) -> str: ...

    def send(self, data: bytes) -> None: ...

    def read_line(self, timeout_s: float) -> bytes | None: ...

    def close(self, timeout_s: float = ...) -> int | None: ...


class Runner(Protocol):
    """What the agent needs of nvmprov.ssh.Session (tests pass a fake guest)."""

    def run(
        self,
        cmd: str,
        *args: object,
        sudo: bool = False,
        check: bool = True,
        timeout_s: float = 300,
        stdin: bytes | None = None,
    ) -> Result: ...

    def start(self, cmd: str, *args: object, sudo: bool = False, stdin: bytes = b"") -> Process: ...


def source(name: str) -> bytes:
    return resources.files("nvmprov.agent.guest").joinpath(f"{name}.py").read_bytes()


def bundle() -> bytes:
    """What the loader reads from stdin before the first request."""
    parts = [f"{len(MODULES)}\n".encode()]
    for name in MODULES:
        text = source(name)
        parts += [f"{name} {len(text)}\n".encode(), text]
    return b"".join(parts)


class GuestProgram:
    """guest/serve.py running in the guest as root: ask() it one request after another."""

    def __init__(self, process: Process) -> None:
        self._process = process
        self._first = True
        self.requests = 0  # asked so far (tests count round trips)

    def ask(self, op: str, timeout_s: float, **fields: Any) -> Any:
        """Send one request; its result, or GuestError with the guest program's error."""
        self.requests += 1
        self._process.send(json.dumps({"op": op, **fields}).encode() + b"\n")
        wait_s = timeout_s + (START_S if self._first else 0.0)
        self._first = False
        line = self._process.read_line(wait_s)
        if line is None:
            stderr = self._process.stderr.strip()[-600:] or "no stderr"
            raise GuestError(f"the guest program ended before it answered {op!r}: {stderr} (has the guest python3?)")
        try:
            answer = json.loads(line)
        except ValueError as e:
            raise GuestError(f"the guest program answered {op!r} with no JSON: {e}: {line[:200]!r}") from e
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise GuestError(f"the guest program failed on {op!r}: {error}")
        return answer.get("result")

    def close(self) -> None:
        self._process.close(CLOSE_S)


@contextlib.contextmanager
def started(runner: Runner | GuestProgram) -> Iterator[GuestProgram]:
    """The guest program for one phase: started here (one python3 start), or the one already running."""
    if isinstance(runner, GuestProgram):
        yield runner
        return
    program = GuestProgram(runner.start(COMMAND, LOADER, sudo=True, stdin=bundle()))
    try:
        yield program
    finally:
        program.close()
