"""What every guest program needs: read a sysfs/proc file, run a tool and keep what it printed.

A child never inherits stdin: that is the host's request stream (serve.py).
"""

import subprocess

TOOL_TIMEOUT_S = 120


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def run(argv, timeout=TOOL_TIMEOUT_S):
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except OSError as e:  # the tool is not installed
        return {"rc": 127, "stdout": "", "stderr": str(e)}
    except subprocess.TimeoutExpired:
        return {"rc": 124, "stdout": "", "stderr": f"timed out after {timeout:g} s"}
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr[-4000:]}
