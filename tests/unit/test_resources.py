"""templates/ lives beside the package: without it (a non-editable install) nvmprov must say so,
not digest an empty recipe into a different image name or crash on a missing cloud-init file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvmprov import image, resources, seed
from nvmprov.cli import exit_status
from nvmprov.errors import HostError

REPO = Path(__file__).resolve().parents[2]


def test_the_checkout_has_its_templates() -> None:
    assert resources.require(image.RECIPE_DIR, *image.RECIPE_REQUIRED) == image.RECIPE_DIR
    assert resources.require(seed.TEMPLATES_DIR, "user-data.yaml") == seed.TEMPLATES_DIR


def test_missing_recipe_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "templates" / "image"
    monkeypatch.setattr(image, "RECIPE_DIR", gone)
    for call in (image.recipe_digest, image.builtin_volume_names, image.packages):
        with pytest.raises(HostError) as info:
            call()
        assert str(info.value).startswith(f"{gone} does not exist: ")
        assert "reinstall nvmprov (pip install CHECKOUT, or scripts/setup.sh" in str(info.value)
        assert exit_status(info.value) == 3


def test_a_recipe_without_its_files_is_not_digested(tmp_path: Path) -> None:
    (tmp_path / "image").mkdir()
    with pytest.raises(HostError, match=r"image/packages.txt does not exist"):
        image.recipe_digest(tmp_path / "image")


def test_missing_cloud_init_templates_fail_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "templates" / "cloud-init"
    monkeypatch.setattr(seed, "TEMPLATES_DIR", gone)
    with pytest.raises(HostError, match=f"^{gone} does not exist: .*scripts/setup.sh"):
        seed._template("user-data.yaml")


def test_templates_come_from_the_package_when_it_has_them(tmp_path: Path) -> None:
    package = tmp_path / "site" / "nvmprov"
    (package / "templates").mkdir(parents=True)
    assert resources.templates_root(package) == package / "templates"  # an installed wheel
    (package / "templates").rmdir()
    assert resources.templates_root(package) == tmp_path / "site" / "templates"  # a checkout
    assert resources.TEMPLATES_ROOT == REPO / "templates"  # this checkout (no nvmprov/templates/ in it)


def test_a_copy_of_the_package_without_templates_says_how_to_install(tmp_path: Path) -> None:
    # a damaged copy: the package in site-packages without its templates/
    site = tmp_path / "site"
    shutil.copytree(REPO / "nvmprov", site / "nvmprov", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "nvmprov", "render", str(REPO / "examples" / "guest.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)})
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert f"{site / 'templates' / 'image'} does not exist" in proc.stderr
    assert "scripts/setup.sh" in proc.stderr
