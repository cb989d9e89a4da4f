"""`nvmprov list --format ansible`: the managed guests as an Ansible inventory, usable as is.

The output is JSON in the layout of Ansible's YAML inventory plugin (JSON is YAML): save it as
`inventory.json` (or .yml) and run `ansible -i inventory.json nvmprov -m ping`. Each host gets
the guest's pinned known_hosts with StrictHostKeyChecking=yes; a guest on a remote hypervisor
also gets a ProxyCommand through the hypervisor's SSH (its forward listens on the hypervisor's
loopback only).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from . import remote

GROUP = "nvmprov"
GUEST_PYTHON = "/usr/bin/python3"  # the built-in image's; spares Ansible its interpreter discovery


def ssh_common_args(known_hosts: str, uri: str) -> str:
    options = [
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes", *remote.ssh_proxy_options(uri),
    ]
    return shlex.join(options)


def host_vars(row: Mapping[str, Any], uri: str) -> dict[str, Any]:
    ssh = row["ssh"]
    return {
        "ansible_host": ssh["host"],
        "ansible_port": ssh["port"],
        "ansible_user": ssh["user"],
        "ansible_ssh_private_key_file": ssh["identity_file"],
        "ansible_ssh_common_args": ssh_common_args(ssh["known_hosts"], uri),
        "ansible_python_interpreter": GUEST_PYTHON,
        "nvmprov_state": row["state"],
        "nvmprov_libvirt_uri": uri,
        "nvmprov_regions": list(row.get("regions", [])),
    }


def ansible(rows: Iterable[Mapping[str, Any]], uri: str) -> dict[str, Any]:
    """Rows of guests.list_guests -> {"all": {"children": {"nvmprov": {"hosts": {...}}}}}."""
    hosts = {str(row["name"]): host_vars(row, uri) for row in rows}
    return {"all": {"children": {GROUP: {"hosts": hosts}}}}


def render(rows: Iterable[Mapping[str, Any]], uri: str) -> str:
    return json.dumps(ansible(rows, uri), indent=2) + "\n"
