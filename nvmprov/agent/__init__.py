"""The in-guest agent: facts in, only the missing commands out, then verification.

states = agent.apply(session, plan, reformat=False)
reports = agent.verify(session, plan, states)
... power cut, boot ...
agent.after_power_cycle(session, plan, reports)   # never creates a namespace or filesystem
"""

from nvmprov.agent.converge import Recheck, RegionState, Runner, apply, describe, gather, recheck
from nvmprov.agent.verify import (
    after_power_cycle,
    new_marker,
    sync,
    verify,
)
from nvmprov.report import RegionReport

__all__ = [
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
    "sync",
    "verify",
]
