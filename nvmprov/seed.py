"""cloud-init NoCloud seed of a guest: keys, user-data, meta-data, network-config, the ISO.

A user's cloud image reads it with cloud-init; the built-in image has no cloud-init: its ISO also
carries the same seed in final form (nvmprov.image_seed: plain files, checked on the host against
what the image implements), which templates/image/files/usr/local/lib/nvmprov/apply_seed.sh puts
in place (tests/unit/test_image_seed_applier.py keeps the two in step).

Pure apart from the randomness of key generation: values go into YAML documents loaded from
templates/cloud-init/ and are dumped with yaml.safe_dump, never formatted into strings.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import yaml

from nvmprov import image_seed
from nvmprov.errors import UsageError
from nvmprov.resources import TEMPLATES_ROOT, require

TEMPLATES_DIR = TEMPLATES_ROOT / "cloud-init"

# The guest's one NIC gets this name (renamed by MAC before networking starts, by cloud-init or
# the built-in image's nvmprov-seed).
GUEST_NIC_NAME = "eth0"

ISO_VOLUME_LABEL = "cidata"  # NoCloud finds its seed by this label

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class KeyPair:
    private_openssh: bytes  # "-----BEGIN OPENSSH PRIVATE KEY-----" PEM, unencrypted
    public_openssh: str  # "ssh-ed25519 AAAA... [comment]"


@dataclass(frozen=True)
class SeedConfig:
    hostname: str
    user: str
    client_public_key: str  # OpenSSH public key nvmprov logs in with
    host_private_key: bytes | str  # the guest's ed25519 host key (OpenSSH PEM), pinned by nvmprov
    host_public_key: str
    outbound: bool  # the guest can reach a package mirror
    instance_id: str
    mac: str  # MAC of the guest's virtio NIC, lower case, e.g. 52:54:00:12:34:56

    def __post_init__(self) -> None:
        if not _MAC_RE.match(self.mac):
            raise UsageError(f"seed: MAC address {self.mac!r} is not of the form 52:54:00:12:34:56")
        for what, key in (("client", self.client_public_key), ("host", self.host_public_key)):
            if not key.startswith("ssh-"):
                raise UsageError(f"seed: {what} public key is not in OpenSSH format: {key[:20]!r}")


def generate_keypair(comment: str = "") -> KeyPair:
    """A fresh ed25519 key pair in OpenSSH formats (paramiko cannot generate ed25519)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )
    if comment:
        public = f"{public} {comment}"
    return KeyPair(private_openssh=private, public_openssh=public)


def _template(name: str) -> dict[str, Any]:
    data = yaml.safe_load((require(TEMPLATES_DIR, name) / name).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UsageError(f"template {TEMPLATES_DIR / name} is not a YAML mapping")
    return data


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


def _text(key: bytes | str) -> str:
    return key.decode("ascii") if isinstance(key, bytes) else key


def user_data(cfg: SeedConfig) -> str:
    doc = _template("user-data.yaml")
    if cfg.outbound:
        doc.update(_template("outbound.yaml"))
    user = {"name": cfg.user, **_template("user.yaml"), "ssh_authorized_keys": [cfg.client_public_key]}
    doc["hostname"] = cfg.hostname
    doc["users"] = [user]
    doc["ssh_keys"] = {
        "ed25519_private": _text(cfg.host_private_key),
        "ed25519_public": cfg.host_public_key,
    }
    return "#cloud-config\n" + _dump(doc)


def meta_data(cfg: SeedConfig) -> str:
    return _dump({"instance-id": cfg.instance_id, "local-hostname": cfg.hostname})


def network_config(cfg: SeedConfig) -> str:
    doc = _template("network-config.yaml")
    doc["ethernets"] = {
        GUEST_NIC_NAME: {"match": {"macaddress": cfg.mac}, "set-name": GUEST_NIC_NAME, "dhcp4": True},
    }
    return _dump(doc)


# ISO 9660 names (8.3, upper case) for the strict readers; NoCloud reads the Rock Ridge and
# Joliet names.
_ISO_FILES = (
    ("user-data", "/USERDATA.;1"),
    ("meta-data", "/METADATA.;1"),
    ("network-config", "/NETCFG.;1"),
)


def build_iso(
    user_data: str, meta_data: str, network_config: str | None, *, final: dict[str, str] | None = None
) -> bytes:
    """The NoCloud seed as an ISO 9660 image (label cidata, Joliet and Rock Ridge names); with
    FINAL (image_seed.final_files, for the built-in image) also its files in nvmprov/."""
    import pycdlib

    contents = {"user-data": user_data, "meta-data": meta_data}
    if network_config is not None:
        contents["network-config"] = network_config
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=ISO_VOLUME_LABEL)
    try:
        for name, iso_path in _ISO_FILES:
            if name not in contents:
                continue
            data = contents[name].encode("utf-8")
            iso.add_fp(io.BytesIO(data), len(data), iso_path, rr_name=name, joliet_path=f"/{name}")
        if final is not None:
            d = image_seed.DIRECTORY
            iso.add_directory(f"/{d.upper()}", rr_name=d, joliet_path=f"/{d}")
            for i, (name, text) in enumerate(sorted(final.items())):
                data = text.encode("utf-8")
                iso.add_fp(
                    io.BytesIO(data), len(data), f"/{d.upper()}/F{i:02d}.;1", rr_name=name, joliet_path=f"/{d}/{name}"
                )
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()
