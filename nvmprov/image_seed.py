"""The built-in image's seed in final form: the cloud-config the seed carries, checked against what
the image implements and turned into plain files, one value each, in the seed ISO's nvmprov/.

The built-in image has no cloud-init and no Python on its boot path: its nvmprov-seed service
(templates/image/files/usr/local/lib/nvmprov/apply_seed.sh) copies these files into place with
a few shell commands (a Python start costs 10-25 s of the one emulated CPU under TCG). The
refusal of anything it does not implement happens twice: here, on the host, where the seed is
made (final_files raises UsageError naming the key, before the guest exists), and in the guest,
where the applier refuses any file of nvmprov/ it does not know, before it changes anything.
tests/unit/test_image_seed_applier.py keeps the two lists in step.

User cloud images (`image: PATH`) read the same ISO's user-data with their own cloud-init;
NoCloud ignores the nvmprov/ directory.

Pure: text in, text out.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from nvmprov.errors import UsageError

FORMAT = "1"  # bump when the files' meaning changes; the applier refuses another
DIRECTORY = "nvmprov"  # on the seed ISO

# Every file of the final form, in the order the applier lists them (apply_seed.sh: KNOWN).
FILES = (
    "format",
    "instance-id",
    "hostname",
    "user",
    "shell",
    "groups",
    "sudo",
    "authorized_keys",
    "ssh_host_ed25519_key",
    "ssh_host_ed25519_key.pub",
    "nic",
    "resize_rootfs",
    "packages",
)

# QEMU user networking (network.mode user; domain.py: `-netdev user` without net=, host=, dns=)
# always gives its one guest these: the built-in image sets them statically instead of running a
# DHCP client, which put ifupdown, a udev settle and DHCP (~20 s under TCG) on sshd's path. On a
# libvirt network (network.mode network) the guest asks by DHCP (systemd-networkd), off sshd's path.
SLIRP_ADDRESS = "10.0.2.15/24"
SLIRP_GATEWAY = "10.0.2.2"
SLIRP_DNS = "10.0.2.3"

# Settings the image already has (sshd_config.d, no baked host keys): the seed may only ask for
# these values. Anything else would need code in the applier.
_FIXED: dict[str, Any] = {
    "disable_root": True,
    "ssh_pwauth": False,
    "ssh_deletekeys": True,
    "ssh_genkeytypes": [],
    "preserve_hostname": False,
    "manage_etc_hosts": True,
    "package_upgrade": False,
}
_APPLIED = {"hostname", "users", "ssh_keys", "resize_rootfs"}
# Outbound guests ask for packages: the built-in image has them baked in; the applier checks them with dpkg.
_CHECKED = {"packages", "package_update", "ssh_quiet_keygen"}
_USER_KEYS = {"name", "shell", "sudo", "groups", "lock_passwd", "ssh_authorized_keys"}
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_SHELL_RE = re.compile(r"^/[A-Za-z0-9_./-]+$")
# One sudoers rule after the user's name, as the applier writes it unchecked (no visudo on the boot
# path): host list = (runas list) [NOPASSWD:] command list.
_SUDO_RE = re.compile(r"^[A-Za-z0-9_,!]+ ?= ?\([A-Za-z0-9_,!:]+\) ?(NOPASSWD: ?)?[A-Za-z0-9_,!/ .-]+$")


def _refuse(message: str) -> UsageError:
    return UsageError(f"seed for the built-in image: {message}")


def _mapping(doc: object, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _refuse(f"{what} is not a YAML mapping")
    return doc


def _user_files(users: object) -> dict[str, str]:
    if not isinstance(users, list) or len(users) != 1:
        raise _refuse("user-data: users must list exactly one user")
    u = _mapping(users[0], "user-data: users[0]")
    unknown = sorted(set(u) - _USER_KEYS)
    if unknown:
        raise _refuse(f"user-data: users[0] keys not implemented by the built-in image: {', '.join(unknown)}")
    name = u.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _refuse(f"user-data: users[0].name {name!r} is not a login name")
    if u.get("lock_passwd", True) is not True:
        raise _refuse("user-data: users[0].lock_passwd must be true (keys only)")
    keys = u.get("ssh_authorized_keys") or []
    if not keys or not all(isinstance(k, str) and k.startswith("ssh-") and "\n" not in k for k in keys):
        raise _refuse("user-data: users[0].ssh_authorized_keys must be one or more OpenSSH public keys")
    groups = u.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) and _NAME_RE.fullmatch(g) for g in groups):
        raise _refuse(f"user-data: users[0].groups {groups!r} are not group names")
    sudo = u.get("sudo")
    if sudo is not None and (not isinstance(sudo, str) or not _SUDO_RE.fullmatch(sudo)):
        raise _refuse("user-data: users[0].sudo must be one sudoers rule")
    shell = u.get("shell", "/bin/sh")
    if not isinstance(shell, str) or not _SHELL_RE.fullmatch(shell):
        raise _refuse(f"user-data: users[0].shell {shell!r} is not a path")
    return {
        "user": name,
        "shell": shell,
        "groups": ",".join(groups),
        "sudo": sudo or "",
        "authorized_keys": "".join(k + "\n" for k in keys),
    }


def _nic_file(net: dict[str, Any], static: bool) -> str:
    if net.get("version") != 2:
        raise _refuse("network-config: only version 2 is implemented")
    eths = _mapping(net.get("ethernets"), "network-config: ethernets")
    if len(eths) != 1 or set(net) - {"version", "ethernets"}:
        raise _refuse("network-config: the built-in image implements exactly one ethernet and nothing else")
    ((name, eth),) = eths.items()
    eth = _mapping(eth, f"network-config: ethernets.{name}")
    mac = _mapping(eth.get("match"), f"network-config: ethernets.{name}.match").get("macaddress")
    if set(eth) != {"match", "set-name", "dhcp4"} or eth.get("set-name") != name or eth.get("dhcp4") is not True:
        raise _refuse(f"network-config: ethernets.{name} must be match.macaddress + set-name {name} + dhcp4: true")
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac) or not _NAME_RE.fullmatch(name):
        raise _refuse(f"network-config: ethernets.{name}: bad MAC {mac!r} or interface name")
    if not static:
        return f"{mac} {name} dhcp\n"
    # dhcp4 on QEMU's user network always yields the same lease: set it statically.
    return f"{mac} {name} {SLIRP_ADDRESS} {SLIRP_GATEWAY} {SLIRP_DNS}\n"


def final_files(user_data: str, meta_data: str, network_config: str, *, static: bool = True) -> dict[str, str]:
    """The seed's three documents as the built-in image's files (name -> content, every name of
    FILES); UsageError naming the first key the image does not implement. STATIC: the guest is on
    QEMU's user network (its DHCP lease is known: set it without DHCP)."""
    if not user_data.startswith("#cloud-config\n"):
        raise _refuse("user-data is not a #cloud-config document")
    ud = _mapping(yaml.safe_load(user_data), "user-data")
    md = _mapping(yaml.safe_load(meta_data), "meta-data")
    unknown = sorted(set(ud) - set(_FIXED) - _APPLIED - _CHECKED)
    if unknown:
        raise _refuse(f"user-data keys not implemented by the built-in image: {', '.join(unknown)}")
    for key, value in _FIXED.items():
        if key in ud and ud[key] != value:
            raise _refuse(f"user-data: {key}: {ud[key]!r} is not implemented (the image has {value!r})")
    hostname = ud.get("hostname", md.get("local-hostname"))
    if not isinstance(hostname, str) or not _HOST_RE.fullmatch(hostname):
        raise _refuse(f"hostname {hostname!r} is not a host name")
    instance_id = md.get("instance-id")
    if not isinstance(instance_id, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", instance_id):
        raise _refuse("meta-data: instance-id missing or not a plain name")
    keys = _mapping(ud.get("ssh_keys"), "user-data: ssh_keys")
    if set(keys) != {"ed25519_private", "ed25519_public"}:
        raise _refuse("user-data: ssh_keys must hold exactly ed25519_private and ed25519_public")
    private, public = keys["ed25519_private"], keys["ed25519_public"]
    if not (
        isinstance(private, str)
        and "OPENSSH PRIVATE KEY" in private
        and isinstance(public, str)
        and public.startswith("ssh-ed25519 ")
    ):
        raise _refuse("user-data: ssh_keys are not an OpenSSH ed25519 key pair")
    packages = ud.get("packages") or []
    if not isinstance(packages, list) or not all(
        isinstance(p, str) and _NAME_RE.fullmatch(p.replace(".", "-")) for p in packages
    ):
        raise _refuse(f"user-data: packages {packages!r} are not package names")
    files = {
        "format": FORMAT + "\n",
        "instance-id": instance_id + "\n",
        "hostname": hostname + "\n",
        **{k: v if k == "authorized_keys" else v + "\n" for k, v in _user_files(ud.get("users")).items()},
        "ssh_host_ed25519_key": private if private.endswith("\n") else private + "\n",
        "ssh_host_ed25519_key.pub": public.strip() + "\n",
        "nic": _nic_file(_mapping(yaml.safe_load(network_config), "network-config"), static),
        "resize_rootfs": ("yes" if ud.get("resize_rootfs", False) is True else "no") + "\n",
        "packages": " ".join(packages) + "\n",
    }
    assert tuple(files) == FILES, "final_files and FILES out of step"
    return files
