"""Change the guest as the host planned it: load missing kernel modules, run planned commands.

load_modules(names): the missing ones of NAMES with one `modprobe -a` (idempotent); None when none
was missing, else {"command", "rc", "stdout", "stderr"}.
run_steps(steps): each {"command": str, "stdin_b64": str | null, "timeout_s": float}, in order with
`/bin/sh -c`; the first failure stops the rest. Returns [{"command", "rc", "stderr"}, ...].
"""

import base64
import subprocess

from proc import run
from read_facts import modules_present


def load_modules(wanted):
    missing = [m for m in wanted if m not in modules_present(wanted)]
    if not missing:
        return None
    result = run(["modprobe", "-a"] + missing)
    result["command"] = "modprobe -a " + " ".join(missing)
    return result


def run_step(step):
    """One planned command; rc 124 (as timeout(1) says) when it overran its time."""
    data = base64.b64decode(step["stdin_b64"]) if step.get("stdin_b64") else b""
    out = {"command": step["command"]}
    try:
        p = subprocess.run(
            ["/bin/sh", "-c", step["command"]], input=data, capture_output=True, timeout=float(step["timeout_s"])
        )
    except subprocess.TimeoutExpired:
        out.update(rc=124, stderr=f"timed out after {float(step['timeout_s']):g} s")
        return out
    out.update(rc=p.returncode, stderr=p.stderr.decode("utf-8", "replace")[-4000:])
    return out


def run_steps(steps):
    results = []
    for step in steps:
        results.append(run_step(step))
        if results[-1]["rc"] != 0:
            break
    return results
