#!/bin/bash
# The README demo: set up this Debian 12 host (as root), then create the example guest: builds the
# built-in image when missing, boots the guest with its NVDIMM, makes and verifies a DAX
# filesystem, prints the report. Extra arguments go to `nvmprov create` (e.g. --json).
set -euo pipefail
checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$checkout/scripts/setup.sh" >&2  # set-up lines on stderr: stdout is the report (--json)
cd "$checkout"
exec .venv/bin/nvmprov create examples/guest.yaml "$@"
