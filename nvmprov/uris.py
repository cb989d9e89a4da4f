"""Which libvirt URI a command talks to, and where nvmprov's pool goes on that hypervisor.

Plain functions without a libvirt import: `render` uses them (it must start fast and needs no
connection), as do create, attach and the commands on existing guests (through workflow).
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from . import session

SYSTEM_URI = "qemu:///system"  # virt.DEFAULT_URI (virt imports libvirt; this module must not)
DEFAULT_POOL_DIR = "/var/lib/nvmprov/pool"


def is_session(uri: str) -> bool:
    """qemu:///session on this machine: a per-user libvirt, no root."""
    u = urlparse(uri)
    return u.path.rstrip("/") == "/session" and not u.hostname


def effective_uri(spec_uri: str, flag: str | None) -> str:
    """--connect beats the spec's `connect`, which beats LIBVIRT_DEFAULT_URI (only used when the
    spec kept the default)."""
    if flag:
        return flag
    env = os.environ.get("LIBVIRT_DEFAULT_URI")
    if env and spec_uri == SYSTEM_URI:
        return env
    return spec_uri


def pool_dir_for(pool_name: str, uri: str | None = None) -> str:
    """Where a new pool goes: /var/lib/nvmprov for the system libvirt, XDG dirs for qemu:///session."""
    if uri is not None and is_session(uri):
        return session.pool_dir(pool_name)
    return DEFAULT_POOL_DIR if pool_name == "nvmprov" else f"/var/lib/nvmprov/pools/{pool_name}"
