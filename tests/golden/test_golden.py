"""Golden domain XML for every guest of every example; each validates against libvirt's schema."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .render_examples import GOLDEN, Case, cases

CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_render_matches_golden(case: Case, regen_golden: bool) -> None:
    xml = case.render()
    if regen_golden:
        case.golden.write_text(xml)
    assert case.golden.exists(), f"{case.golden.name} missing: run pytest tests/golden --regen-golden"
    assert xml == case.golden.read_text(), f"{case.golden.name} differs: check the change, then --regen-golden"


def test_no_stale_golden_files() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.xml")) == sorted(c.golden.name for c in CASES)


def test_every_example_has_a_golden_file() -> None:
    assert {c.example for c in CASES} == {"guest.yaml", "mixed.yaml", "fleet.yaml", "numa.yaml", "namespaces.yaml",
                                          "cxl.yaml"}


def test_split_region_plan_matches_golden(regen_golden: bool) -> None:
    """The units a split region becomes (issue 19): what the agent makes, verifies and reports on."""
    (case,) = [c for c in CASES if c.example == "namespaces.yaml"]
    units = [{k: v for k, v in dataclasses.asdict(u).items() if k not in ("notes", "namespaces")}
             for u in case.plan().units]
    text = json.dumps(units, indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / "namespaces-units.json"
    if regen_golden:
        golden.write_text(text)
    assert text == golden.read_text(), "namespaces-units.json differs: check the change, then --regen-golden"


def _validate(xml: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate missing: apt-get install libvirt-clients libxml2-utils"
    f = tmp_path / "domain.xml"
    f.write_text(xml)
    return subprocess.run([tool, str(f), "domain"], capture_output=True, text=True, timeout=60)


@pytest.mark.host  # virt-xml-validate: libvirt-clients and libxml2-utils (scripts/setup.sh)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("virtio_in_config", [False, True], ids=["defined", "with-virtio-pmem"])
def test_virt_xml_validate(case: Case, virtio_in_config: bool, tmp_path: Path) -> None:
    result = _validate(case.render(include_virtio_pmem=virtio_in_config), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validates" in result.stdout + result.stderr


def test_virt_xml_validate_can_fail(tmp_path: Path) -> None:
    # the check above would catch a broken document (xmllint missing makes it fail too)
    broken = CASES[0].render().replace("<on_crash>destroy</on_crash>", "<on_crash>explode</on_crash>")
    assert _validate(broken, tmp_path).returncode != 0
