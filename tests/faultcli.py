"""nvmprov's command line with fault injection: a test-only entry point (never shipped, never
imported by nvmprov). The fault tests run it in a child process as `python -m tests.faultcli ARGS`
from the checkout; it patches what it needs in this process only and then runs nvmprov.cli.main.

- NVMPROV_TEST_PAUSE_AT=<phase>: on entering that phase (after its line, before its body), print
  PAUSED_LINE naming it and wait (up to PAUSE_MAX_S) so a test can send SIGINT/SIGTERM/SIGKILL at
  exactly that point.
- NVMPROV_TEST_KERNEL_CMDLINE_APPEND=<args>: append to a direct-boot kernel command line (e.g.
  `rdinit=/nonexistent` to make the guest panic), to prove a boot that cannot succeed fails fast.

The plain `nvmprov` (and `python -m nvmprov`) reads neither variable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from nvmprov import cli, domain
from nvmprov.plan import Plan
from nvmprov.progress import Progress

PAUSE_ENV = "NVMPROV_TEST_PAUSE_AT"
CMDLINE_ENV = "NVMPROV_TEST_KERNEL_CMDLINE_APPEND"
PAUSE_MAX_S = 300.0  # a forgotten variable delays a run, it never hangs it
PAUSED_LINE = "test hook: paused at phase"


def pause_at(phase: str, wanted: str | None, say: Callable[[str], None]) -> None:
    """Wait at PHASE when it is the one WANTED; a signal's handler raises out of the sleep."""
    if phase != wanted:
        return
    say(f"{PAUSED_LINE} {phase} (pid {os.getpid()}); waiting up to {PAUSE_MAX_S:.0f}s for a signal")
    time.sleep(PAUSE_MAX_S)
    say(f"test hook: no signal within {PAUSE_MAX_S:.0f}s; continuing {phase}")


def kernel_cmdline(the_plan: Plan, extra: str) -> Plan:
    """The plan with EXTRA appended to its kernel command line (direct kernel boot only)."""
    extra = extra.strip()
    if not extra or the_plan.kernel_cmdline is None:
        return the_plan
    return replace(the_plan, kernel_cmdline=f"{the_plan.kernel_cmdline} {extra}")


def install(environ: Mapping[str, str]) -> Callable[[], None]:
    """Patch Progress.phase and domain.render as ENVIRON asks; returns the undo (for in-process tests)."""
    undo: list[Callable[[], None]] = []
    wanted = environ.get(PAUSE_ENV)
    if wanted:
        original_phase = Progress.phase

        @contextlib.contextmanager
        def phase(self: Progress, name: str, detail: str = "") -> Iterator[None]:
            with original_phase(self, name, detail):
                pause_at(name, wanted, self.line)
                yield

        Progress.phase = phase  # type: ignore[method-assign]
        undo.append(lambda: setattr(Progress, "phase", original_phase))
    extra = environ.get(CMDLINE_ENV, "")
    if extra.strip():
        original_render = domain.render

        def render(the_plan: Plan, *args: Any, **kwargs: Any) -> str:
            return original_render(kernel_cmdline(the_plan, extra), *args, **kwargs)

        domain.render = render  # type: ignore[assignment]
        undo.append(lambda: setattr(domain, "render", original_render))

    def restore() -> None:
        for u in reversed(undo):
            u()

    return restore


def main(argv: list[str] | None = None) -> int:
    install(os.environ)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
