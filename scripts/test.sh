#!/bin/bash
# Every test, unit and e2e (real libvirtd, QEMU and guests), after setting up this Debian 12 host
# (as root). Extra arguments go to pytest (e.g. -m 'not e2e', -x, -k NAME).
set -uo pipefail
checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$checkout/scripts/setup.sh" || exit 1
cd "$checkout"
# The built-in guest image, outside any test's timeout: quick when it is cached in the pool.
.venv/bin/nvmprov image build </dev/null || exit 1

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
.venv/bin/pytest tests --durations=20 "$@" </dev/null 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"

# pytest's last line, e.g. "==== 3 failed, 40 passed in 81.2s ====" (no '=' with -q)
summary="$(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s' "$log" \
    | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"
if [ "$status" -eq 5 ]; then
    echo "test: error: pytest collected no tests (exit status 5): the suite is missing or deselected" >&2
    exit 1
fi
echo "test: ${summary:-no pytest summary line} (pytest exit status $status)"
exit "$status"
