"""Files nvmprov reads from the checkout's top-level templates/ (image recipe, cloud-init).

templates/ sits beside the package, not inside it, so only an editable install (scripts/setup.sh:
`pip install -e CHECKOUT`) can find it. A wheel or plain `pip install .` leaves it out; without this
check recipe_digest() globbed nothing and silently named a different image.
"""

from __future__ import annotations

from pathlib import Path

from .errors import HostError

TEMPLATES_ROOT = Path(__file__).resolve().parent.parent / "templates"


def require(directory: Path, *files: str) -> Path:
    """DIRECTORY, after checking that it and FILES in it exist; HostError naming what is missing."""
    missing = [directory] if not directory.is_dir() else [directory / f for f in files if not (directory / f).is_file()]
    if missing:
        raise HostError(
            f"{missing[0]} does not exist: nvmprov reads its templates from the templates/ directory of its "
            "checkout, which a non-editable install leaves out; install nvmprov editable from a checkout "
            "(scripts/setup.sh, or pip install -e CHECKOUT)"
        )
    return directory
