"""The in-guest agent: facts in, only the missing commands out, then verification.

with agent.started(session) as guest:            # one guest python3 start for the phase
    states = agent.apply(guest, plan, reformat=False)
    reports = agent.verify(guest, plan, states)
... power cut, boot ...
agent.after_power_cycle(session, plan, reports)   # never creates a namespace or filesystem

Each function also takes the session itself and then starts the guest program for that call alone.
"""

from nvmprov.agent.converge import Recheck, RegionState, apply, describe, gather, recheck
from nvmprov.agent.program import GuestProgram, Runner, started
from nvmprov.agent.verify import (
    after_power_cycle,
    new_marker,
    sync,
    verify,
)
from nvmprov.report import RegionReport

__all__ = [
    "GuestProgram",
    "Recheck",
    "RegionReport",
    "RegionState",
    "Runner",
    "after_power_cycle",
    "apply",
    "describe",
    "gather",
    "new_marker",
    "recheck",
    "started",
    "sync",
    "verify",
]
