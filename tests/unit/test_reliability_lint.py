"""Security lint as a test: ruff's S rules and bandit find nothing unexplained in nvmprov/.

Skipped bandit checks are listed with their reasons in pyproject.toml ([tool.bandit]); each of
them is enforced per call site by the ruff S rule of the same name (a noqa with its reason).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.host  # ruff and bandit: the lint extra (tox -e host), not .[test]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    assert exe.exists(), f"{tool} is not installed in {BIN}; pip install -e '.[lint]'"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_bandit_finds_nothing() -> None:
    proc = _run("bandit", "-q", "-c", "pyproject.toml", "-r", "nvmprov")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_security_rules_find_nothing() -> None:
    proc = _run("ruff", "check", "nvmprov")  # the S rules are selected in pyproject.toml
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_every_security_noqa_says_why() -> None:
    # A bare noqa for an S rule hides a finding; the reason sits after it or in a comment just above.
    unexplained = []
    for path in sorted((REPO / "nvmprov").rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.search(r"#\s*noqa:\s*(S\d+)(.*)$", line)
            if m is None:
                continue
            above = [ln.strip() for ln in lines[max(0, i - 4):i]]  # a comment just above the statement
            said_why = m.group(2).strip(" -,") or any(ln.startswith("#") for ln in above)
            if not said_why:
                unexplained.append(f"{path.relative_to(REPO)}:{i + 1}: {line.strip()}")
    assert unexplained == []


def test_no_shell_strings_in_local_commands() -> None:
    offenders = []
    for path in sorted((REPO / "nvmprov").rglob("*.py")):
        text = path.read_text()
        for pattern in (r"shell\s*=\s*True", r"os\.system\(", r"os\.popen\(", r"subprocess\.getoutput"):
            offenders += [f"{path.relative_to(REPO)}: {pattern}" for _ in re.finditer(pattern, text)]
    assert offenders == []
