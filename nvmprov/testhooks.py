"""Test-only hooks that let the fault tests put a real `create` into a known state.

Both are inert unless their environment variable is set; docs/reliability.md documents them.
- NVMPROV_TEST_PAUSE_AT=<phase>: on entering that phase, print a line naming it and wait (up to
  PAUSE_MAX_S) so a test can send SIGINT/SIGTERM/SIGKILL at exactly that point.
- NVMPROV_TEST_KERNEL_CMDLINE_APPEND=<args>: append to a direct-boot kernel command line (e.g.
  `rdinit=/nonexistent` to make the guest panic), to prove a boot that cannot succeed fails fast.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import Plan

PAUSE_ENV = "NVMPROV_TEST_PAUSE_AT"
CMDLINE_ENV = "NVMPROV_TEST_KERNEL_CMDLINE_APPEND"
PAUSE_MAX_S = 300.0  # a forgotten variable delays a run, it never hangs it
PAUSED_LINE = "test hook: paused at phase"


def pause_at(phase: str, say: Callable[[str], None]) -> None:
    """Wait at PHASE when the test asked for it; a signal's handler raises out of the sleep."""
    if os.environ.get(PAUSE_ENV) != phase:
        return
    say(f"{PAUSED_LINE} {phase} (pid {os.getpid()}); waiting up to {PAUSE_MAX_S:.0f}s for a signal")
    time.sleep(PAUSE_MAX_S)
    say(f"test hook: no signal within {PAUSE_MAX_S:.0f}s; continuing {phase}")


def kernel_cmdline(the_plan: Plan) -> Plan:
    """The plan with the test's kernel arguments appended (direct kernel boot only)."""
    extra = os.environ.get(CMDLINE_ENV, "").strip()
    if not extra or the_plan.kernel_cmdline is None:
        return the_plan
    return replace(the_plan, kernel_cmdline=f"{the_plan.kernel_cmdline} {extra}")
