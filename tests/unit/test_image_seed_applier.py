"""The built-in image's seed in final form (nvmprov.image_seed, made on the host) and its applier
(apply_seed.sh, run in the guest in place of cloud-init), against the seeds nvmprov.seed really
writes: everything they ask for is implemented, a key the image does not implement is refused on
the host naming the key, and a file the applier does not know stops it before it changes anything."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from nvmprov import domain, image, image_seed, seed
from nvmprov.errors import UsageError

APPLIER = image.RECIPE_DIR / "files/usr/local/lib/nvmprov/apply_seed.sh"
SH = shutil.which("dash") or shutil.which("sh") or "/bin/sh"


@pytest.fixture(scope="module")
def keys() -> tuple[seed.KeyPair, seed.KeyPair]:
    return seed.generate_keypair("nvmprov"), seed.generate_keypair()


def _docs(keys: tuple[seed.KeyPair, seed.KeyPair], outbound: bool = False) -> tuple[str, str, str]:
    client, host = keys
    cfg = seed.SeedConfig(
        hostname="demo", user="nvmprov", client_public_key=client.public_openssh,
        host_private_key=host.private_openssh, host_public_key=host.public_openssh,
        outbound=outbound, instance_id="demo-0123456789ab", mac="52:54:00:12:34:56",
    )  # fmt: skip
    return seed.user_data(cfg), seed.meta_data(cfg), seed.network_config(cfg)


def _first(files: dict[str, str], name: str) -> str:
    return files[name].splitlines()[0] if files[name] else ""


@pytest.mark.parametrize("outbound", [False, True])
def test_final_form_carries_every_key_the_real_seed_has(keys, outbound: bool) -> None:
    client, host = keys
    got = image_seed.final_files(*_docs(keys, outbound))
    assert tuple(got) == image_seed.FILES
    assert all(text == "" or text.endswith("\n") for text in got.values())
    assert _first(got, "format") == image_seed.FORMAT
    assert _first(got, "hostname") == "demo"
    assert _first(got, "instance-id") == "demo-0123456789ab"
    assert (_first(got, "user"), _first(got, "shell")) == ("nvmprov", "/bin/bash")
    assert _first(got, "sudo") == "ALL=(ALL) NOPASSWD:ALL" and _first(got, "groups") == "sudo"
    assert got["authorized_keys"] == client.public_openssh + "\n"
    assert got["ssh_host_ed25519_key"] == host.private_openssh.decode()
    assert got["ssh_host_ed25519_key.pub"] == host.public_openssh + "\n"
    assert got["nic"].split() == ["52:54:00:12:34:56", seed.GUEST_NIC_NAME, "10.0.2.15/24", "10.0.2.2", "10.0.2.3"]
    assert _first(got, "resize_rootfs") == "yes"
    # outbound guests ask for the agent's tools; the built-in image has them baked in
    packages = got["packages"].split()
    assert bool(packages) is outbound
    assert set(packages) <= set(image.packages())


def test_the_static_address_is_what_qemu_user_networking_hands_out() -> None:
    """The final form sets slirp's fixed lease statically: valid only while the guest's netdev
    keeps QEMU's default network (no net=, host=, dns=)."""
    plan = SimpleNamespace(network_outbound=False, mac="52:54:00:12:34:56")
    netdev = domain.user_netdev_args(plan, 40022)[1]  # type: ignore[arg-type]
    assert netdev.startswith("user,")
    assert not re.search(r"\b(net|host|dns|dhcpstart|ipv4)=", netdev), netdev


def test_a_libvirt_network_keeps_dhcp(keys) -> None:
    got = image_seed.final_files(*_docs(keys), static=False)
    assert got["nic"].split() == ["52:54:00:12:34:56", seed.GUEST_NIC_NAME, "dhcp"]


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
def test_refuses_what_it_does_not_implement_naming_the_key(keys, changes, named) -> None:
    user_data, meta_data, network = _docs(keys)
    with pytest.raises(UsageError, match=named):
        image_seed.final_files(_with(user_data, **changes), meta_data, network)


def test_refuses_a_second_user_an_unknown_user_key_and_a_password(keys) -> None:
    user_data, meta_data, network = _docs(keys)
    user = yaml.safe_load(user_data)["users"][0]
    with pytest.raises(UsageError, match="exactly one user"):
        image_seed.final_files(_with(user_data, users=[user, user]), meta_data, network)
    with pytest.raises(UsageError, match="passwd"):
        image_seed.final_files(_with(user_data, users=[{**user, "passwd": "x"}]), meta_data, network)
    with pytest.raises(UsageError, match="lock_passwd"):
        image_seed.final_files(_with(user_data, users=[{**user, "lock_passwd": False}]), meta_data, network)
    with pytest.raises(UsageError, match="sudo"):
        image_seed.final_files(_with(user_data, users=[{**user, "sudo": "ALL\nroot ALL"}]), meta_data, network)


def test_refuses_network_config_beyond_one_dhcp_nic(keys) -> None:
    user_data, meta_data, network = _docs(keys)
    doc = yaml.safe_load(network)
    doc["ethernets"]["eth0"]["addresses"] = ["10.0.2.99/24"]
    with pytest.raises(UsageError, match="ethernets.eth0"):
        image_seed.final_files(user_data, meta_data, yaml.safe_dump(doc))
    with pytest.raises(UsageError, match="version 2"):
        image_seed.final_files(user_data, meta_data, yaml.safe_dump({"version": 1, "config": []}))


def test_refuses_a_seed_without_instance_id_or_key_pair(keys) -> None:
    user_data, meta_data, network = _docs(keys)
    with pytest.raises(UsageError, match="instance-id"):
        image_seed.final_files(user_data, yaml.safe_dump({"local-hostname": "demo"}), network)
    with pytest.raises(UsageError, match="ssh_keys"):
        image_seed.final_files(_with(user_data, ssh_keys={"rsa_private": "x"}), meta_data, network)
    with pytest.raises(UsageError, match="cloud-config"):
        image_seed.final_files(user_data.replace("#cloud-config\n", ""), meta_data, network)


# --- the guest side: apply_seed.sh --check on the host's shell --------------------------------


def _write(files: dict[str, str], where: Path) -> Path:
    where.mkdir()
    for name, text in files.items():
        (where / name).write_text(text)
    return where


def _check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SH, str(APPLIER), "--check", str(directory)], capture_output=True, text=True, check=False)


def test_applier_knows_exactly_the_files_of_the_final_form() -> None:
    known = re.search(r'^KNOWN="([^"]*)"$', APPLIER.read_text(), re.M)
    assert known is not None
    assert tuple(known.group(1).split()) == image_seed.FILES
    assert re.search(rf"^FORMAT={image_seed.FORMAT}$", APPLIER.read_text(), re.M)


@pytest.mark.parametrize("outbound", [False, True])
def test_applier_accepts_the_real_final_form(keys, tmp_path: Path, outbound: bool) -> None:
    got = _check(_write(image_seed.final_files(*_docs(keys, outbound)), tmp_path / "nvmprov"))
    assert (got.returncode, got.stdout, got.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: (d / "runcmd").write_text("touch /x\n"), "nvmprov/runcmd not implemented"),
        (lambda d: (d / ".hidden").write_text("x\n"), "nvmprov/.hidden not implemented"),
        (lambda d: (d / "nic").unlink(), "nvmprov/nic missing"),
        (lambda d: (d / "format").write_text("2\n"), "format '2' not implemented"),
        (lambda d: (d / "user").write_text("root;x\n"), "not a login name"),
        (lambda d: (d / "hostname").write_text("a b\n"), "not a host name"),
    ],
)
def test_applier_refuses_what_it_does_not_know_naming_it(keys, tmp_path: Path, change, named: str) -> None:
    directory = _write(image_seed.final_files(*_docs(keys)), tmp_path / "nvmprov")
    change(directory)
    got = _check(directory)
    assert got.returncode == 1
    assert f"nvmprov-seed: error: seed {named}" in got.stderr or named in got.stderr, got.stderr


def test_applier_names_the_host_once_in_etc_hosts(tmp_path: Path) -> None:
    def hosts(old: str) -> list[str]:
        (tmp_path / "hosts").write_text(old)
        got = subprocess.run([SH, str(APPLIER), "--hosts", "demo", str(tmp_path / "hosts")],
                             capture_output=True, text=True, check=True)
        return got.stdout.splitlines()

    old = "127.0.0.1\tlocalhost\n127.0.1.1\told\n::1\tlocalhost ip6-localhost\n"
    new = ["127.0.0.1\tlocalhost", "127.0.1.1\tdemo", "::1\tlocalhost ip6-localhost"]
    assert hosts(old) == new
    assert hosts("\n".join(new) + "\n") == new
    assert hosts("") == ["127.0.0.1\tlocalhost", "127.0.1.1\tdemo"]
    assert hosts("::1 x") == ["127.0.0.1\tlocalhost", "127.0.1.1\tdemo", "::1 x"]


def test_seed_iso_carries_the_final_form_for_the_built_in_image_only(keys) -> None:
    import io

    import pycdlib

    docs = _docs(keys)
    final = image_seed.final_files(*docs)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(seed.build_iso(*docs, final=final)))
    try:
        for name, text in final.items():
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{image_seed.DIRECTORY}/{name}")
            assert out.getvalue().decode() == text
    finally:
        iso.close()
    plain = pycdlib.PyCdlib()
    plain.open_fp(io.BytesIO(seed.build_iso(*docs)))
    try:
        names = [c.file_identifier().decode() for c in plain.list_children(iso_path="/")]
        assert not any(n.startswith("NVMPROV") for n in names)
    finally:
        plain.close()
