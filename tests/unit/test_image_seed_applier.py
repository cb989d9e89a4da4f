"""The built-in image's seed applier (apply_seed.py, run in the guest in place of cloud-init)
against the seeds nvmprov.seed really writes: everything they ask for is implemented, and a key
it does not implement stops it before it changes anything."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from nvmprov import image, seed

APPLIER = image.RECIPE_DIR / "files/usr/local/lib/nvmprov/apply_seed.py"


@pytest.fixture(scope="module")
def applier() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nvmprov_image_apply_seed", APPLIER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def keys() -> tuple[seed.KeyPair, seed.KeyPair]:
    return seed.generate_keypair("nvmprov"), seed.generate_keypair()


def _docs(keys: tuple[seed.KeyPair, seed.KeyPair], outbound: bool = False) -> tuple[str, str, str]:
    client, host = keys
    cfg = seed.SeedConfig(
        hostname="demo", user="nvmprov", client_public_key=client.public_openssh,
        host_private_key=host.private_openssh, host_public_key=host.public_openssh,
        outbound=outbound, instance_id="demo-0123456789ab", mac="52:54:00:12:34:56",
    )
    return seed.user_data(cfg), seed.meta_data(cfg), seed.network_config(cfg)


@pytest.mark.parametrize("outbound", [False, True])
def test_applies_every_key_the_real_seed_has(applier: ModuleType, keys, outbound: bool) -> None:
    client, host = keys
    got = applier.parse_seed(*_docs(keys, outbound))
    assert got.hostname == "demo"
    assert got.instance_id == "demo-0123456789ab"
    assert got.user.name == "nvmprov" and got.user.shell == "/bin/bash"
    assert got.user.sudo == "ALL=(ALL) NOPASSWD:ALL" and got.user.groups == ("sudo",)
    assert got.user.authorized_keys == (client.public_openssh,)
    assert got.host_private_key == host.private_openssh.decode()
    assert got.host_public_key == host.public_openssh + "\n"
    assert (got.nic_mac, got.nic_name) == ("52:54:00:12:34:56", seed.GUEST_NIC_NAME)
    assert got.resize_rootfs is True
    # outbound guests ask for the agent's tools; the built-in image has them baked in
    assert bool(got.packages) is outbound
    assert set(got.packages) <= set(image.packages())


def _with(user_data: str, **changes: object) -> str:
    doc = yaml.safe_load(user_data)
    doc.update(changes)
    return "#cloud-config\n" + yaml.safe_dump(doc)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"runcmd": ["touch /x"]}, "runcmd"),
        ({"write_files": [{"path": "/x"}]}, "write_files"),
        ({"ssh_pwauth": True}, "ssh_pwauth"),
        ({"manage_etc_hosts": False}, "manage_etc_hosts"),
        ({"package_upgrade": True}, "package_upgrade"),
    ],
)
def test_refuses_what_it_does_not_implement_naming_the_key(applier: ModuleType, keys, changes, named) -> None:
    user_data, meta_data, network = _docs(keys)
    with pytest.raises(applier.SeedError, match=named):
        applier.parse_seed(_with(user_data, **changes), meta_data, network)


def test_refuses_a_second_user_an_unknown_user_key_and_a_password(applier: ModuleType, keys) -> None:
    user_data, meta_data, network = _docs(keys)
    user = yaml.safe_load(user_data)["users"][0]
    with pytest.raises(applier.SeedError, match="exactly one user"):
        applier.parse_seed(_with(user_data, users=[user, user]), meta_data, network)
    with pytest.raises(applier.SeedError, match="passwd"):
        applier.parse_seed(_with(user_data, users=[{**user, "passwd": "x"}]), meta_data, network)
    with pytest.raises(applier.SeedError, match="lock_passwd"):
        applier.parse_seed(_with(user_data, users=[{**user, "lock_passwd": False}]), meta_data, network)


def test_refuses_network_config_beyond_one_dhcp_nic(applier: ModuleType, keys) -> None:
    user_data, meta_data, network = _docs(keys)
    doc = yaml.safe_load(network)
    doc["ethernets"]["eth0"]["addresses"] = ["10.0.2.99/24"]
    with pytest.raises(applier.SeedError, match="ethernets.eth0"):
        applier.parse_seed(user_data, meta_data, yaml.safe_dump(doc))
    with pytest.raises(applier.SeedError, match="version 2"):
        applier.parse_seed(user_data, meta_data, yaml.safe_dump({"version": 1, "config": []}))


def test_refuses_a_seed_without_instance_id_or_key_pair(applier: ModuleType, keys) -> None:
    user_data, meta_data, network = _docs(keys)
    with pytest.raises(applier.SeedError, match="instance-id"):
        applier.parse_seed(user_data, yaml.safe_dump({"local-hostname": "demo"}), network)
    with pytest.raises(applier.SeedError, match="ssh_keys"):
        applier.parse_seed(_with(user_data, ssh_keys={"rsa_private": "x"}), meta_data, network)
    with pytest.raises(applier.SeedError, match="cloud-config"):
        applier.parse_seed(user_data.replace("#cloud-config\n", ""), meta_data, network)


def test_hosts_file_names_the_host_once(applier: ModuleType) -> None:
    old = "127.0.0.1\tlocalhost\n127.0.1.1\told\n::1\tlocalhost ip6-localhost\n"
    new = applier.hosts_file(old, "demo")
    assert new.splitlines() == ["127.0.0.1\tlocalhost", "127.0.1.1\tdemo", "::1\tlocalhost ip6-localhost"]
    assert applier.hosts_file(new, "demo") == new
    assert applier.hosts_file("", "demo").splitlines() == ["127.0.0.1\tlocalhost", "127.0.1.1\tdemo"]


def test_write_replaces_whole_files_with_the_mode_asked(applier: ModuleType, tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_text("old")
    (tmp_path / ".key.nvmprov-new").write_text("left by a cut-short run")
    applier._write(str(target), "new\n", 0o600)
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]
