"""CLI latency guard: `nvmprov --help`, `validate` and `render` must not import the heavy libraries
(libvirt, paramiko, cryptography, pycdlib, rich) -- they cost 0.05-0.1 s each at start-up and
those commands need none of them. `--help` must not even import what only commands need (the
spec's pydantic and yaml, the reports). Checked in a fresh interpreter, as a user starts the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("libvirt", "libvirtmod", "paramiko", "cryptography", "pycdlib", "rich")

PROBE = """
import json, sys
from nvmprov import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m in {names!r} or m.split(".")[0] in {names!r})),
      file=sys.stderr)
"""


def modules_after(argv: tuple[str, ...], names: tuple[str, ...]) -> list[str]:
    """Which of these modules (or packages, with their submodules) `nvmprov ARGV` imported."""
    code = PROBE.format(names=set(names))
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    return list(json.loads(last))


def heavy_modules_after(*argv: str) -> list[str]:
    return modules_after(argv, HEAVY)


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["render", "examples/guest.yaml"],
    ["render", "examples/mixed.yaml"],
    ["validate", "examples/fleet.yaml"],
])
def test_fast_commands_import_no_heavy_library(argv: list[str]) -> None:
    assert heavy_modules_after(*argv) == []


def test_the_probe_sees_a_heavy_import_when_there_is_one() -> None:
    # The guard must be able to fail: `list` talks to libvirt, so libvirt is imported (and the
    # command may then fail for want of a daemon; the import is what counts here).
    assert "libvirt" in heavy_modules_after("list", "--connect", "test:///default")


def test_help_imports_none_of_what_the_commands_need() -> None:
    needed_by_commands = ("pydantic", "pydantic_core", "yaml", "importlib.metadata", "nvmprov.spec",
                          "nvmprov.report", "nvmprov.state", "nvmprov.plan", "nvmprov.domain", "traceback")
    assert modules_after(("--help",), needed_by_commands) == []


def test_render_imports_only_what_it_uses() -> None:
    # nvmprov.image is imported for builtin_volume_names(): what a build runs stays unimported;
    # uris.is_session is enough of nvmprov.remote; difflib only suggests a key for an unknown one
    unneeded = ("nvmprov.report", "nvmprov.state", "subprocess", "tempfile", "nvmprov.remote", "difflib")
    assert modules_after(("render", "examples/guest.yaml"), unneeded) == []


def test_render_does_not_discover_pydantic_plugins() -> None:
    # nvmprov.spec builds its models without pydantic's plugin loader (importlib.metadata and a
    # scan of every installed distribution's entry points, ~25 ms)
    assert modules_after(("render", "examples/guest.yaml"), ("importlib.metadata", "pydantic.plugin._loader")) == []


NO_STUB_LEFT = """
import sys
from nvmprov import spec
from pydantic import BaseModel
from pydantic_core import SchemaValidator
assert type(spec.GuestSpec.__pydantic_validator__) is SchemaValidator
class Other(BaseModel):  # anyone else's model: pydantic's own loader, plugins and all
    n: int
from pydantic.plugin import _loader
assert _loader.__file__ and _loader.PYDANTIC_ENTRY_POINT_GROUP == "pydantic", _loader
assert Other.model_validate({"n": 1}).n == 1
print("ok")
"""


def test_models_built_after_the_spec_still_get_pydantic_plugin_discovery() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_STUB_LEFT], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.stdout.strip() == "ok", proc.stderr
