"""The in-guest agent: facts in, only the missing commands out, then verification.

states = agent.apply(session, plan, reformat=False)
reports = agent.verify(session, plan, states)
"""

from nvmprov.agent.converge import RegionState, Runner, apply, describe, gather
from nvmprov.agent.verify import RegionReport, check_payload, new_marker, sync, verify, write_payload

__all__ = [
    "RegionReport",
    "RegionState",
    "Runner",
    "apply",
    "check_payload",
    "describe",
    "gather",
    "new_marker",
    "sync",
    "verify",
    "write_payload",
]
