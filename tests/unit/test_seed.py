"""nvmprov.seed: keys, the three NoCloud documents and the ISO, read back with real parsers."""

from __future__ import annotations

import io

import paramiko
import pycdlib
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from nvmprov import seed
from nvmprov.errors import UsageError


@pytest.fixture(scope="module")
def keys() -> tuple[seed.KeyPair, seed.KeyPair]:
    return seed.generate_keypair("client"), seed.generate_keypair()


@pytest.fixture
def cfg(keys: tuple[seed.KeyPair, seed.KeyPair]) -> seed.SeedConfig:
    client, host = keys
    return seed.SeedConfig(
        hostname="demo",
        user="nvmprov",
        client_public_key=client.public_openssh,
        host_private_key=host.private_openssh,
        host_public_key=host.public_openssh,
        outbound=False,
        instance_id="i-0123",
        mac="52:54:00:ab:cd:ef",
    )


def _cloud_config(text: str) -> dict:
    first, _, _ = text.partition("\n")
    assert first == "#cloud-config"
    return yaml.safe_load(text)


def test_keypair_is_ed25519_and_loads_in_paramiko(keys):
    client, _ = keys
    assert client.public_openssh.startswith("ssh-ed25519 ")
    assert client.public_openssh.endswith(" client")
    pkey = paramiko.Ed25519Key(file_obj=io.StringIO(client.private_openssh.decode()))
    assert client.public_openssh.split()[1] == pkey.get_base64()


def test_keypairs_differ():
    assert seed.generate_keypair().public_openssh != seed.generate_keypair().public_openssh


def test_user_data_pins_host_key_and_locks_down_login(cfg):
    doc = _cloud_config(seed.user_data(cfg))
    assert doc["ssh_keys"]["ed25519_public"] == cfg.host_public_key
    private = doc["ssh_keys"]["ed25519_private"].encode()
    assert private == cfg.host_private_key
    loaded = serialization.load_ssh_private_key(private, password=None)
    public = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.decode() == cfg.host_public_key
    assert doc["ssh_deletekeys"] is True
    assert doc["ssh_genkeytypes"] == []
    assert doc["disable_root"] is True
    assert doc["ssh_pwauth"] is False
    assert doc["hostname"] == "demo"


def test_host_private_key_as_text_gives_the_same_user_data(cfg):
    from dataclasses import replace

    as_text = replace(cfg, host_private_key=cfg.host_private_key.decode())
    assert seed.user_data(as_text) == seed.user_data(cfg)


def test_user_data_user_has_client_key_and_passwordless_sudo(cfg):
    (user,) = _cloud_config(seed.user_data(cfg))["users"]
    assert user["name"] == "nvmprov"
    assert user["ssh_authorized_keys"] == [cfg.client_public_key]
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True


def test_no_packages_without_outbound(cfg):
    doc = _cloud_config(seed.user_data(cfg))
    assert "packages" not in doc
    assert doc["package_update"] is False


def test_outbound_installs_ndctl(cfg):
    from dataclasses import replace

    doc = _cloud_config(seed.user_data(replace(cfg, outbound=True)))
    assert "ndctl" in doc["packages"]
    assert doc["package_update"] is True


def test_hostile_values_stay_values(cfg):
    """Values are YAML-dumped, never formatted in: a newline cannot add a key."""
    from dataclasses import replace

    evil = replace(cfg, hostname="x\nruncmd: [reboot]", instance_id="id: 1\nfoo: bar")
    doc = _cloud_config(seed.user_data(evil))
    assert "runcmd" not in doc
    assert doc["hostname"] == "x\nruncmd: [reboot]"
    meta = yaml.safe_load(seed.meta_data(evil))
    assert meta == {"instance-id": "id: 1\nfoo: bar", "local-hostname": "x\nruncmd: [reboot]"}


def test_meta_data(cfg):
    assert yaml.safe_load(seed.meta_data(cfg)) == {"instance-id": "i-0123", "local-hostname": "demo"}


def test_network_config_matches_mac_with_dhcp(cfg):
    doc = yaml.safe_load(seed.network_config(cfg))
    assert doc["version"] == 2
    assert doc["ethernets"] == {
        "eth0": {"match": {"macaddress": "52:54:00:ab:cd:ef"}, "set-name": "eth0", "dhcp4": True}
    }


@pytest.mark.parametrize("mac", ["52:54:00:AB:CD:EF", "52-54-00-ab-cd-ef", "52:54:00:ab:cd", ""])
def test_bad_mac_rejected(cfg, mac):
    from dataclasses import replace

    with pytest.raises(UsageError, match="MAC"):
        replace(cfg, mac=mac)


def _read_iso(data: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    return iso


def _get(iso: pycdlib.PyCdlib, **path: str) -> str:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue().decode()


def test_iso_has_label_and_all_three_names(cfg):
    ud, md, nc = seed.user_data(cfg), seed.meta_data(cfg), seed.network_config(cfg)
    iso = _read_iso(seed.build_iso(ud, md, nc))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        for name, text in (("user-data", ud), ("meta-data", md), ("network-config", nc)):
            assert _get(iso, rr_path=f"/{name}") == text
            assert _get(iso, joliet_path=f"/{name}") == text
        rr_names = sorted(
            c.rock_ridge.name().decode()
            for c in iso.list_children(rr_path="/")
            if c.rock_ridge is not None and c.is_file()
        )
        assert rr_names == ["meta-data", "network-config", "user-data"]
    finally:
        iso.close()


def test_iso_without_network_config(cfg):
    iso = _read_iso(seed.build_iso(seed.user_data(cfg), seed.meta_data(cfg), None))
    try:
        names = sorted(c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/") if c.is_file())
        assert names == ["meta-data", "user-data"]
    finally:
        iso.close()


def test_iso_with_blkid_when_available(cfg, tmp_path):
    """The host's blkid (what the guest's cloud-init uses) sees the label."""
    import shutil
    import subprocess

    blkid = shutil.which("blkid") or "/usr/sbin/blkid"
    if not shutil.which(blkid):
        pytest.skip("blkid not installed")
    path = tmp_path / "seed.iso"
    path.write_bytes(seed.build_iso(seed.user_data(cfg), seed.meta_data(cfg), None))
    out = subprocess.run([blkid, "-o", "export", str(path)], capture_output=True, text=True, check=True).stdout
    assert "LABEL=cidata" in out.splitlines()
    assert "TYPE=iso9660" in out.splitlines()
