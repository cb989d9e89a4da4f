#!/usr/bin/python3
"""nvmprov built-in image: apply the guest's NoCloud seed at boot, in place of cloud-init.

Under TCG cloud-init cost about 80 s of boot before sshd could start (each of its Python stages
spends ~10 s importing itself); this program applies the subset of cloud-config that nvmprov's
seed (nvmprov.seed) writes, in about a second: hostname and /etc/hosts, the login user with sudo
and its key, the pinned host key, the NIC renamed eth0 by MAC with DHCP, the root filesystem
grown to the disk. A seed key it does not implement stops it before it changes anything, with
the key named on the console: a seed asking for more never boots half-applied quietly.

Runs as root from nvmprov-seed.service, every boot; the per-instance part (user, keys, resize)
only when the seed's instance-id differs from the one recorded at the last run.
Pure parsing (parse_seed) is separate from the side effects (apply) so the host can test it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
from collections import namedtuple

# Imports are kept to what runs anyway (no dataclasses, tempfile): this runs on sshd's critical
# path, while the rest of the boot competes for the guest's one emulated CPU.

LABEL = "cidata"
DEVICE_WAIT_S = 180.0  # the seed's SATA CD appears once udev has loaded ahci/sr_mod: slow under TCG
INSTANCE_RECORD = "/var/lib/nvmprov/seed-instance-id"
MOUNT_DIR = "/run/nvmprov-seed"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
NIC_CONFIG = "/etc/network/interfaces.d/50-nvmprov"

# Settings the image already has (sshd_config.d, no baked host keys): the seed may only ask for
# these values. Anything else would need code here.
_FIXED = {
    "disable_root": True,
    "ssh_pwauth": False,
    "ssh_deletekeys": True,
    "ssh_genkeytypes": [],
    "preserve_hostname": False,
    "manage_etc_hosts": True,
    "package_upgrade": False,
}
_APPLIED = {"hostname", "users", "ssh_keys", "resize_rootfs"}
# Outbound guests ask for packages: the built-in image has them baked in, checked with dpkg.
_CHECKED = {"packages", "package_update", "ssh_quiet_keygen"}
_USER_KEYS = {"name", "shell", "sudo", "groups", "lock_passwd", "ssh_authorized_keys"}
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class SeedError(Exception):
    """The seed asks for something this program does not do, or is malformed."""


User = namedtuple("User", "name shell sudo groups authorized_keys")
# nic_mac: the NIC to rename nic_name and configure with DHCP
Seed = namedtuple("Seed", "instance_id hostname user host_private_key host_public_key resize_rootfs packages "
                          "nic_mac nic_name")


def _mapping(doc: object, what: str) -> dict:
    if not isinstance(doc, dict):
        raise SeedError(f"{what} is not a YAML mapping")
    return doc


def _parse_user(users: object) -> User:
    if not isinstance(users, list) or len(users) != 1:
        raise SeedError("user-data: users must list exactly one user")
    u = _mapping(users[0], "user-data: users[0]")
    unknown = sorted(set(u) - _USER_KEYS)
    if unknown:
        raise SeedError(f"user-data: users[0] keys not implemented by the built-in image: {', '.join(unknown)}")
    name = u.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SeedError(f"user-data: users[0].name {name!r} is not a login name")
    if u.get("lock_passwd", True) is not True:
        raise SeedError("user-data: users[0].lock_passwd must be true (keys only)")
    keys = u.get("ssh_authorized_keys") or []
    if not keys or not all(isinstance(k, str) and k.startswith("ssh-") and "\n" not in k for k in keys):
        raise SeedError("user-data: users[0].ssh_authorized_keys must be one or more OpenSSH public keys")
    groups = u.get("groups") or []
    if not all(isinstance(g, str) and _NAME_RE.match(g) for g in groups):
        raise SeedError(f"user-data: users[0].groups {groups!r} are not group names")
    sudo = u.get("sudo")
    if sudo is not None and (not isinstance(sudo, str) or "\n" in sudo):
        raise SeedError("user-data: users[0].sudo must be one sudoers rule")
    return User(name=name, shell=str(u.get("shell", "/bin/sh")), sudo=sudo, groups=tuple(groups),
                authorized_keys=tuple(keys))


def _parse_network(net: dict) -> tuple[str, str]:
    if net.get("version") != 2:
        raise SeedError("network-config: only version 2 is implemented")
    eths = _mapping(net.get("ethernets"), "network-config: ethernets")
    if len(eths) != 1 or set(net) - {"version", "ethernets"}:
        raise SeedError("network-config: the built-in image implements exactly one ethernet and nothing else")
    (name, eth), = eths.items()
    eth = _mapping(eth, f"network-config: ethernets.{name}")
    mac = _mapping(eth.get("match"), f"network-config: ethernets.{name}.match").get("macaddress")
    if set(eth) != {"match", "set-name", "dhcp4"} or eth.get("set-name") != name or eth.get("dhcp4") is not True:
        raise SeedError(f"network-config: ethernets.{name} must be match.macaddress + set-name {name} + dhcp4: true")
    if not isinstance(mac, str) or not _MAC_RE.match(mac) or not _NAME_RE.match(name):
        raise SeedError(f"network-config: ethernets.{name}: bad MAC {mac!r} or interface name")
    return mac, name


def parse_seed(user_data: str, meta_data: str, network_config: str) -> Seed:
    """The seed's three documents, checked against what apply() implements; no side effects."""
    import yaml

    if not user_data.startswith("#cloud-config\n"):
        raise SeedError("user-data is not a #cloud-config document")
    ud = _mapping(yaml.safe_load(user_data), "user-data")
    md = _mapping(yaml.safe_load(meta_data), "meta-data")
    unknown = sorted(set(ud) - set(_FIXED) - _APPLIED - _CHECKED)
    if unknown:
        raise SeedError(f"user-data keys not implemented by the built-in image: {', '.join(unknown)}")
    for key, value in _FIXED.items():
        if key in ud and ud[key] != value:
            raise SeedError(f"user-data: {key}: {ud[key]!r} is not implemented (the image has {value!r})")
    hostname = ud.get("hostname", md.get("local-hostname"))
    if not isinstance(hostname, str) or not _HOST_RE.match(hostname):
        raise SeedError(f"seed: hostname {hostname!r} is not a host name")
    instance_id = md.get("instance-id")
    if not isinstance(instance_id, str) or not instance_id or "\n" in instance_id:
        raise SeedError("meta-data: instance-id missing")
    keys = _mapping(ud.get("ssh_keys"), "user-data: ssh_keys")
    if set(keys) != {"ed25519_private", "ed25519_public"}:
        raise SeedError("user-data: ssh_keys must hold exactly ed25519_private and ed25519_public")
    private, public = keys["ed25519_private"], keys["ed25519_public"]
    if not (isinstance(private, str) and "OPENSSH PRIVATE KEY" in private and isinstance(public, str)
            and public.startswith("ssh-ed25519 ")):
        raise SeedError("user-data: ssh_keys are not an OpenSSH ed25519 key pair")
    packages = ud.get("packages") or []
    if not all(isinstance(p, str) and _NAME_RE.match(p.replace(".", "-")) for p in packages):
        raise SeedError(f"user-data: packages {packages!r} are not package names")
    mac, nic = _parse_network(_mapping(yaml.safe_load(network_config), "network-config"))
    return Seed(instance_id=instance_id, hostname=hostname, user=_parse_user(ud.get("users")),
                host_private_key=private if private.endswith("\n") else private + "\n",
                host_public_key=public.strip() + "\n", resize_rootfs=ud.get("resize_rootfs", False) is True,
                packages=tuple(packages), nic_mac=mac, nic_name=nic)


def hosts_file(old: str, hostname: str) -> str:
    """/etc/hosts with the 127.0.1.1 line naming this host (sudo resolves the hostname)."""
    lines = [line for line in old.splitlines() if not line.startswith("127.0.1.1")]
    if not any(line.split()[:1] == ["127.0.0.1"] for line in lines):
        lines.insert(0, "127.0.0.1\tlocalhost")
    lines.insert(1, f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


# --- side effects below -----------------------------------------------------------------------

def _say(msg: str) -> None:
    print(f"nvmprov-seed: {msg}", flush=True)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _write(path: str, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Write via a temporary file in the same directory, then rename: never a half-written key."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".nvmprov-new")
    if os.path.lexists(tmp):
        os.unlink(tmp)  # left by a run cut short
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _find_seed_device() -> str:
    deadline = time.monotonic() + DEVICE_WAIT_S
    while True:
        for dev in [f"/dev/disk/by-label/{LABEL}", *sorted(glob.glob("/dev/sr*"))]:
            if not os.path.exists(dev):
                continue
            probe = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", dev], capture_output=True, text=True)
            if probe.stdout.strip() == LABEL:
                return os.path.realpath(dev)
        if time.monotonic() > deadline:
            raise SeedError(f"no device labelled {LABEL} after {DEVICE_WAIT_S:.0f} s: is the seed ISO attached?")
        time.sleep(0.2)


def read_seed() -> tuple[str, str, str]:
    dev = _find_seed_device()
    os.makedirs(MOUNT_DIR, mode=0o700, exist_ok=True)
    _run("mount", "-t", "iso9660", "-o", "ro", dev, MOUNT_DIR)
    try:
        docs = []
        for name in ("user-data", "meta-data", "network-config"):
            with open(os.path.join(MOUNT_DIR, name), encoding="utf-8") as f:
                docs.append(f.read())
    finally:
        _run("umount", MOUNT_DIR)
    return docs[0], docs[1], docs[2]


def _set_hostname(hostname: str) -> None:
    _write("/etc/hostname", hostname + "\n", 0o644)
    with open("/etc/hosts", encoding="utf-8") as f:
        old = f.read()
    _write("/etc/hosts", hosts_file(old, hostname), 0o644)
    _run("hostname", hostname)


def _name_nic(mac: str, name: str) -> None:
    """The image keeps kernel names (99-default.link masked), so the one NIC is eth0 already once
    udev has loaded virtio_net; rename it only if it exists under another name."""
    for path in glob.glob("/sys/class/net/*/address"):
        with open(path) as f:
            if f.read().strip().lower() != mac:
                continue
        current = path.split("/")[4]
        if current != name:
            _run("ip", "link", "set", "dev", current, "down")
            _run("ip", "link", "set", "dev", current, "name", name)
    _write(NIC_CONFIG, f"# written by nvmprov-seed from the seed's network-config\nauto {name}\n"
                       f"iface {name} inet dhcp\n", 0o644)


def _add_user(user: User) -> None:
    import pwd

    try:
        pw = pwd.getpwnam(user.name)
    except KeyError:
        _run("useradd", "--create-home", "--shell", user.shell, "--user-group", user.name)
        pw = pwd.getpwnam(user.name)
    _run("passwd", "--lock", user.name)
    for group in user.groups:
        _run("usermod", "--append", "--groups", group, user.name)
    if user.sudo:
        rule = f"/etc/sudoers.d/90-nvmprov-{user.name}"
        _write(rule, f"{user.name} {user.sudo}\n", 0o440)
        _run("visudo", "--check", "--quiet", "--file", rule)
    ssh_dir = os.path.join(pw.pw_dir, ".ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
    _write(os.path.join(ssh_dir, "authorized_keys"), "".join(k + "\n" for k in user.authorized_keys), 0o600,
           pw.pw_uid, pw.pw_gid)


def _missing_packages(packages: tuple[str, ...]) -> list[str]:
    missing = []
    for p in packages:
        q = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status}", p], capture_output=True, text=True)
        if q.stdout.strip() != "installed":
            missing.append(p)
    return missing


def apply(seed: Seed) -> None:
    _set_hostname(seed.hostname)
    _name_nic(seed.nic_mac, seed.nic_name)
    try:
        with open(INSTANCE_RECORD) as f:
            done = f.read().strip() == seed.instance_id
    except FileNotFoundError:
        done = False
    if done:
        return
    missing = _missing_packages(seed.packages)
    if missing:
        raise SeedError(f"packages not in the built-in image: {', '.join(missing)}")
    _write(HOST_KEY, seed.host_private_key, 0o600)
    _write(HOST_KEY + ".pub", seed.host_public_key, 0o644)
    _add_user(seed.user)
    if seed.resize_rootfs:
        root = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True, text=True, check=True)
        _run("resize2fs", root.stdout.strip())
    os.makedirs(os.path.dirname(INSTANCE_RECORD), exist_ok=True)
    _write(INSTANCE_RECORD, seed.instance_id + "\n", 0o644)


def main() -> int:
    started = time.monotonic()
    try:
        seed = parse_seed(*read_seed())
        apply(seed)
    except (SeedError, OSError, subprocess.CalledProcessError) as e:
        _say(f"error: {e}")
        return 1
    _say(f"applied (host {seed.hostname}, user {seed.user.name}, instance {seed.instance_id}) "
         f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
