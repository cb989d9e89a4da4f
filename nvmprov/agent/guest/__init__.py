"""Programs that run inside the guest (python3 from the guest's own Debian; stdlib only).

They are sent over SSH on stdin (`python3 - ARGS`), print one JSON object and change nothing
except where their docstring says so. The host parses what they print in nvmprov.agent.facts.
"""
