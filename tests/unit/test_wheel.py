"""nvmprov installed from its wheel, outside the checkout: validate, render and `image build --help`.

The wheel is built offline from a copy of the sources (setuptools' PEP 517 backend, no build
isolation), installed with --no-deps into a fresh venv that sees this interpreter's installed
dependencies through a .pth file (no network), and run from a directory with nothing of the
checkout in it. The `host` tier: the build needs setuptools and wheel, which scripts/setup.sh
provides (Debian's python3-setuptools and python3-wheel) when this interpreter lacks them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
UUID = "6f1c9d3e-0b7a-4c55-9e21-3a8d5b7c9f10"
BUILD_TIMEOUT_S = 180


def _builder() -> str:
    """A python that can build the wheel offline: this one when it has setuptools and wheel, else Debian's."""
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([python, "-c", "import setuptools.build_meta, wheel"], capture_output=True)
        if probe.returncode == 0:
            return python
    pytest.fail("no python with setuptools and wheel to build nvmprov's wheel offline; run scripts/setup.sh")


class Installed:
    def __init__(self, venv: Path, workdir: Path) -> None:
        self.venv = venv
        self.workdir = workdir

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NVMPROV_", "VIRTUAL_ENV"))}
        return subprocess.run([str(self.venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True,
                              cwd=self.workdir, env=env, timeout=120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("nvmprov", "templates"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    build = subprocess.run(
        [_builder(), "-c", "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))", str(dist)],
        cwd=src, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = dist / build.stdout.strip().splitlines()[-1]

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", where], capture_output=True, text=True,
                                  check=True).stdout.strip())
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                          "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    # Only now the project's dependencies, as this interpreter has them installed (before, pip would
    # have seen an nvmprov installed there and skipped the wheel): appended after the venv's own
    # site-packages, and their .pth files (an editable nvmprov among them) are not run.
    (purelib / "zz-nvmprov-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    workdir = tmp / "elsewhere"
    workdir.mkdir()
    shutil.copy2(REPO / "examples" / "guest.yaml", workdir / "guest.yaml")
    return Installed(venv, workdir)


def test_the_wheel_carries_the_templates(installed: Installed) -> None:
    proc = installed.run("python", "-c", "import nvmprov, nvmprov.resources as r; print(nvmprov.__file__); "
                         "print(r.TEMPLATES_ROOT)")
    assert proc.returncode == 0, proc.stderr
    module, templates = proc.stdout.split()
    assert module.startswith(str(installed.venv)), module  # the installed copy, not the checkout
    assert templates == str(Path(module).parent / "templates")
    assert (Path(templates) / "image" / "customize.sh").stat().st_mode & 0o111  # the recipe digests its modes


def test_validate_from_another_directory(installed: Installed) -> None:
    proc = installed.run("nvmprov", "validate", "guest.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("guest.yaml: ok (1 guest")


def test_render_from_another_directory_matches_the_checkout(installed: Installed) -> None:
    proc = installed.run("nvmprov", "render", "guest.yaml", "--uuid", UUID)
    assert proc.returncode == 0, proc.stderr
    here = subprocess.run([sys.executable, "-m", "nvmprov", "render", str(REPO / "examples" / "guest.yaml"),
                           "--uuid", UUID], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert here.returncode == 0, here.stderr
    assert proc.stdout == here.stdout  # same image name: the recipe digest is the same installed or not


def test_image_build_help_from_another_directory(installed: Installed) -> None:
    proc = installed.run("nvmprov", "image", "build", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: nvmprov image build" in proc.stdout


def test_the_wheels_guest_program_answers(installed: Installed) -> None:
    """The agent's guest programs are package resources: the installed wheel must carry them, and
    its loader and bundle must run (here, as python3 would in a guest) and answer a request."""
    script = (
        "import subprocess, sys\n"
        "from nvmprov.agent import program\n"
        "request = b'{\"op\": \"sha256\", \"paths\": [\"guest.yaml\"]}\\n'\n"
        "p = subprocess.run([sys.executable, '-I', '-S', '-c', program.LOADER], input=program.bundle() + request,\n"
        "                   capture_output=True, timeout=60)\n"
        "sys.stdout.write(program.__file__ + '\\n' + p.stdout.decode())\n"
    )
    proc = installed.run("python", "-c", script)
    assert proc.returncode == 0, proc.stderr
    where, answer = proc.stdout.split("\n", 1)
    assert where.startswith(str(installed.venv)), where  # the installed copy, not the checkout
    want = hashlib.sha256((installed.workdir / "guest.yaml").read_bytes()).hexdigest()
    assert json.loads(answer) == {"ok": True, "result": {"sums": {"guest.yaml": want}}}, answer
