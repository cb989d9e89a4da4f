"""Files nvmprov reads from its templates (image recipe, cloud-init).

They live in the checkout's top-level templates/, and the wheel ships that directory inside the
package as nvmprov/templates/ (pyproject.toml maps it as package data). TEMPLATES_ROOT is the
package's copy when there is one (an installed wheel), else the checkout's (a checkout, an editable
install). require() still checks: a copy without them must say so, not digest an empty recipe into
a different image name.
"""

from __future__ import annotations

from pathlib import Path

from .errors import HostError

_PACKAGE = Path(__file__).resolve().parent


def templates_root(package: Path = _PACKAGE) -> Path:
    """PACKAGE/templates when it exists (installed), else templates/ beside the package (checkout)."""
    installed = package / "templates"
    return installed if installed.is_dir() else package.parent / "templates"


TEMPLATES_ROOT = templates_root()


def require(directory: Path, *files: str) -> Path:
    """DIRECTORY, after checking that it and FILES in it exist; HostError naming what is missing."""
    missing = [directory] if not directory.is_dir() else [directory / f for f in files if not (directory / f).is_file()]
    if missing:
        raise HostError(
            f"{missing[0]} does not exist: nvmprov reads its templates from nvmprov/templates/ in an installed "
            "package, or from templates/ in its checkout; reinstall nvmprov (pip install CHECKOUT, or "
            "scripts/setup.sh for an editable install), or restore the missing file"
        )
    return directory
