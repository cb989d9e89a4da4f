"""The guest half of one agent phase: answer the host's requests until it closes stdin.

One python3 start serves a whole phase (each start costs seconds under TCG). Each request is one
JSON object on one line of stdin, each answer one line of stdout, in order:
  {"op": "run", "modules": [...], "steps": [...]}   run_steps: load the missing modules, then run
                                                     the planned commands -> {"modprobe", "steps"}
  {"op": "facts"}                                   read_facts; the first read of a phase also
                                                     waits for udev and systemd's mount jobs
  {"op": "verify", "scratch", "program", "regions"} verify_regions
  {"op": "sha256", "paths": [...]}                  sha256_files -> {"sums": {path: hex | null}}
An answer is {"ok": true, "result": ...} or {"ok": false, "error": "Type: text"}; an error in one
request ends nothing. Only "run" and "verify" change the guest.
"""

import json
import sys
import traceback

from read_facts import read_facts
from run_steps import load_modules, run_steps
from verify_regions import sha256_files, verify_regions

OPS = ("facts", "run", "verify", "sha256")


class Phase:
    def __init__(self):
        self.settled = False

    def facts(self, request):
        facts = read_facts(settle_first=not self.settled)
        self.settled = True
        return facts

    def run(self, request):
        modprobe = load_modules(request.get("modules") or [])
        if modprobe is not None and modprobe["rc"] != 0:
            return {"modprobe": modprobe, "steps": []}
        return {"modprobe": modprobe, "steps": run_steps(request.get("steps") or [])}

    def verify(self, request):
        return verify_regions(request)

    def sha256(self, request):
        return {"sums": sha256_files(request["paths"])}


def answer(phase, line):
    try:
        request = json.loads(line)
        handler = getattr(phase, request["op"]) if request.get("op") in OPS else None
        if handler is None:
            return {"ok": False, "error": f"unknown op {request.get('op')!r}"}
        return {"ok": True, "result": handler(request)}
    except Exception as e:  # noqa: BLE001 - the host gets the error and decides
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}


def main():
    phase = Phase()
    stdin, stdout = sys.stdin.buffer, sys.stdout
    for line in iter(stdin.readline, b""):
        if line.strip():
            stdout.write(json.dumps(answer(phase, line)) + "\n")
            stdout.flush()
