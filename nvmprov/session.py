"""Without root: qemu:///session, a libvirt per user (autostarted by the first client).

Its pool and the guests' serial logs live under the user's XDG directories (the state directory
already does, see state.py); QEMU runs as the user, so nothing needs root. The built-in image is
built with mmdebstrap as root; a user imports a copy with `nvmprov image import DIR` (the three
files a root build left in /var/lib/nvmprov/pool, or copies of them), uploaded through the storage
API like a build would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HostError, UsageError

if TYPE_CHECKING:
    import libvirt

Progress = Callable[[str], None]


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / default


def pool_dir(pool_name: str) -> str:
    """$XDG_DATA_HOME/nvmprov/pool (the default pool) or .../pools/NAME."""
    base = _xdg("XDG_DATA_HOME", ".local/share") / "nvmprov"
    return str(base / "pool") if pool_name == "nvmprov" else str(base / "pools" / pool_name)


def console_log_dir() -> Path:
    """Where the session's virtlogd writes serial logs: a directory of the user's own."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "nvmprov" / "console"


def console_log_path(name: str) -> str:
    path = console_log_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(path / f"{name}-nvmprov-serial.log")


def import_image(conn: libvirt.virConnect, pool_name: str, src_dir: str, progress: Progress) -> tuple[str, str, str]:
    """Upload the built-in image's three files from SRC_DIR (named as `nvmprov image build` names
    them for the current recipe) into the pool; already present volumes are kept."""
    from . import image, state, storage

    names = image.builtin_volume_names()
    src = Path(src_dir)
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        raise UsageError(
            f"{src_dir} lacks {', '.join(missing)} (the built-in image of this nvmprov's recipe); "
            "point at a pool where `nvmprov image build` ran as root (e.g. /var/lib/nvmprov/pool)"
        )
    unreadable = [n for n in names if not os.access(src / n, os.R_OK)]
    if unreadable:
        raise HostError(f"cannot read {', '.join(str(src / n) for n in unreadable)}; copy them somewhere you can")
    pool = storage.pool_of(conn, pool_name)
    with state.host_lock("image-build"):
        for name, fmt in zip(names, ("qcow2", "raw", "raw"), strict=True):
            if storage.volume_exists(pool, name):
                progress(f"image: {name} already in pool {pool_name}")
                continue
            storage.upload(pool, name, src / name, fmt, mode=0o644)
            progress(f"image: imported {name} ({(src / name).stat().st_size} bytes)")
    return names
