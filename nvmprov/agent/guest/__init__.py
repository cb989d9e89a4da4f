"""The guest program: modules that run inside the guest (python3 from the guest's own Debian; stdlib only).

nvmprov.agent.program sends them over SSH on stdin behind a fixed loader (`python3 -I -S -c LOADER`),
then its requests, one JSON line each; serve.py answers each with one line. Each module imports
its siblings by their bare names (the loader registers them so). Nothing changes the guest except
run_steps.py and verify_regions.py, where their docstrings say. The host parses the facts in
nvmprov.agent.facts.
"""
