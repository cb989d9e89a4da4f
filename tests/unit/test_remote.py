"""remote.py's pure part: URI kinds, qemu+ssh parsing, ~/.ssh/config resolution, OpenSSH proxy
arguments; and the Ansible inventory, read back by the real ansible-inventory."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvmprov import inventory, remote, uris
from nvmprov.errors import UsageError

CONFIG = """
Host hv
  HostName 192.0.2.10
  Port 2222
  User admin
  IdentityFile ~/.ssh/hv_key
  UserKnownHostsFile ~/.ssh/hv_known /etc/ssh/other_known
Host lax
  StrictHostKeyChecking no
"""


@pytest.mark.parametrize(("uri", "session"), [
    ("qemu:///session", True), ("qemu:///session/", True), ("qemu:///system", False),
    ("qemu+ssh://host/session", False), ("test:///default", False),
])
def test_session_uris(uri: str, session: bool) -> None:
    assert uris.is_session(uri) is session


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu:///session", "qemu+unix:///system", "test:///default",
                                 "qemu+tcp://host/system"])
def test_non_ssh_uris_have_no_hypervisor(uri: str) -> None:
    assert remote.parse(uri) is None
    assert remote.ssh_proxy_options(uri) == []


def test_parse_qemu_ssh_uri_with_everything() -> None:
    hv = remote.parse("qemu+ssh://bob@hv:2200/system?keyfile=/k/id&known_hosts=/k/kh&no_verify=1&command=/bin/myssh")
    assert hv == remote.HypervisorUri(alias="hv", user="bob", port=2200, keyfile="/k/id", known_hosts="/k/kh",
                                      no_verify=True, command="/bin/myssh")


def test_parse_plain_and_libssh_transports() -> None:
    assert remote.parse("qemu+ssh://hv/system") == remote.HypervisorUri(alias="hv")
    assert remote.parse("qemu+libssh2://hv/system") == remote.HypervisorUri(alias="hv")


@pytest.mark.parametrize("uri", ["qemu+ssh:///system", "qemu+ssh://hv:notaport/system"])
def test_bad_ssh_uris_are_usage_errors(uri: str) -> None:
    with pytest.raises(UsageError, match="qemu\\+ssh://"):
        remote.parse(uri)


def test_resolve_takes_hostname_port_user_keys_and_known_hosts_from_ssh_config() -> None:
    home = os.path.expanduser("~")  # paramiko expands IdentityFile's ~ itself, from $HOME
    ep = remote.resolve(remote.HypervisorUri(alias="hv"), CONFIG, local_user="me", home=home)
    assert ep == remote.Endpoint(
        alias="hv", hostname="192.0.2.10", port=2222, user="admin", identity_files=(f"{home}/.ssh/hv_key",),
        known_hosts_files=(f"{home}/.ssh/hv_known", "/etc/ssh/other_known"), verify=True,
    )
    assert ep.known_hosts_name == "[192.0.2.10]:2222"


def test_the_uri_beats_ssh_config() -> None:
    hv = remote.HypervisorUri(alias="hv", user="root", port=22, keyfile="/k/id", known_hosts="/k/kh")
    ep = remote.resolve(hv, CONFIG, local_user="me", home="/home/me")
    assert (ep.hostname, ep.port, ep.user) == ("192.0.2.10", 22, "root")
    assert ep.identity_files == ("/k/id",) and ep.known_hosts_files == ("/k/kh",)
    assert ep.known_hosts_name == "192.0.2.10"


def test_unknown_alias_uses_defaults_and_existing_default_keys(tmp_path: Path) -> None:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_rsa").write_text("x")
    ep = remote.resolve(remote.HypervisorUri(alias="other.example"), CONFIG, local_user="me", home=str(tmp_path))
    assert (ep.hostname, ep.port, ep.user) == ("other.example", 22, "me")
    assert ep.identity_files == (str(tmp_path / ".ssh" / "id_rsa"),)
    assert ep.known_hosts_files == (str(tmp_path / ".ssh" / "known_hosts"),)
    assert ep.verify is True


def test_verification_is_off_only_when_asked() -> None:
    lax = remote.resolve(remote.HypervisorUri(alias="lax"), CONFIG, local_user="me", home="/h")
    asked = remote.resolve(remote.HypervisorUri(alias="hv", no_verify=True), CONFIG, local_user="me", home="/h")
    assert lax.verify is False and asked.verify is False


def test_proxy_command_forwards_to_the_hypervisors_loopback() -> None:
    hv = remote.parse("qemu+ssh://bob@hv:2200/system?keyfile=/k/my key&command=/opt/ssh -F /c")
    assert hv is not None
    cmd = remote.proxy_command(hv)
    argv = shlex.split(cmd)
    assert argv[:3] == ["/opt/ssh", "-F", "/c"]
    assert argv[-3:] == ["-W", "%h:%p", "hv"]
    assert argv[3:5] == ["-l", "bob"] and argv[5:7] == ["-p", "2200"]
    assert "/k/my key" in argv  # quoted, survives the split


def test_plain_proxy_command_leaves_aliases_to_ssh_config() -> None:
    assert remote.ssh_proxy_options("qemu+ssh://hv/system") == ["-o", "ProxyCommand=ssh -W %h:%p hv"]


ROW = {
    "name": "g1", "state": "running",
    "ssh": {"host": "127.0.0.1", "port": 40100, "user": "nvmprov", "identity_file": "/s/g1/id_ed25519",
            "known_hosts": "/s/g1/known_hosts"},
    "regions": [{"name": "data", "model": "nvdimm", "size_bytes": 536870912}],
}


def test_inventory_host_vars_pin_the_guest_key() -> None:
    inv = inventory.ansible([ROW], "qemu:///system")
    host = inv["all"]["children"]["nvmprov"]["hosts"]["g1"]
    assert host["ansible_host"] == "127.0.0.1" and host["ansible_port"] == 40100
    assert host["ansible_user"] == "nvmprov"
    assert host["ansible_ssh_private_key_file"] == "/s/g1/id_ed25519"
    args = shlex.split(host["ansible_ssh_common_args"])
    assert "UserKnownHostsFile=/s/g1/known_hosts" in args and "StrictHostKeyChecking=yes" in args
    assert not any(a.startswith("ProxyCommand") for a in args)


def test_inventory_of_a_remote_guest_goes_through_the_hypervisor() -> None:
    inv = inventory.ansible([ROW], "qemu+ssh://root@hv/system")
    args = shlex.split(inv["all"]["children"]["nvmprov"]["hosts"]["g1"]["ansible_ssh_common_args"])
    assert "ProxyCommand=ssh -l root -W %h:%p hv" in args


def _ansible_inventory() -> str:
    found = shutil.which("ansible-inventory") or str(Path(sys.executable).with_name("ansible-inventory"))
    if not Path(found).exists():
        pytest.fail("ansible-inventory is missing: pip install -e '.[test]' (ansible-core is a test dependency)")
    return found


def test_real_ansible_inventory_reads_it_as_is(tmp_path: Path) -> None:
    path = tmp_path / "inventory.json"
    path.write_text(inventory.render([ROW, {**ROW, "name": "g2"}], "qemu+ssh://hv/system"))
    proc = subprocess.run([_ansible_inventory(), "-i", str(path), "--list"], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert sorted(data["nvmprov"]["hosts"]) == ["g1", "g2"]
    g1 = data["_meta"]["hostvars"]["g1"]
    assert g1["ansible_port"] == 40100
    assert "ProxyCommand=ssh -W %h:%p hv" in g1["ansible_ssh_common_args"]


# ---------------------------------------------------------------------------------------------
# qemu:///session: where things go without root


def test_session_pool_and_console_under_xdg_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvmprov import boot, session, uris

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert uris.pool_dir_for("nvmprov", "qemu:///session") == str(tmp_path / "data/nvmprov/pool")
    assert uris.pool_dir_for("other", "qemu:///session") == str(tmp_path / "data/nvmprov/pools/other")
    assert uris.pool_dir_for("nvmprov", "qemu:///system") == "/var/lib/nvmprov/pool"
    assert uris.pool_dir_for("nvmprov") == "/var/lib/nvmprov/pool"
    log = boot.console_log_path("g1", "qemu:///session")
    assert log == str(tmp_path / "state/nvmprov/console/g1-nvmprov-serial.log")
    assert Path(log).parent.is_dir() and (Path(log).parent.stat().st_mode & 0o077) == 0
    assert boot.console_log_path("g1", "qemu+ssh://hv/system").startswith("/var/log/libvirt/qemu/")
    assert session.pool_dir("nvmprov").startswith(str(tmp_path))


def test_image_import_names_the_missing_files_before_touching_libvirt(tmp_path: Path) -> None:
    from nvmprov import image, session

    (tmp_path / image.builtin_volume_names()[1]).write_bytes(b"kernel")
    with pytest.raises(UsageError) as err:
        session.import_image(None, "nvmprov", str(tmp_path), lambda _s: None)  # type: ignore[arg-type]
    message = str(err.value)
    assert image.builtin_volume_names()[0] in message and image.builtin_volume_names()[2] in message
    assert image.builtin_volume_names()[1] not in message
    assert "/var/lib/nvmprov/pool" in message


def test_uris_module_agrees_with_virt() -> None:
    # uris.py restates virt.DEFAULT_URI so render can use it without importing libvirt
    from nvmprov import uris, virt

    assert uris.SYSTEM_URI == virt.DEFAULT_URI


# ---------------------------------------------------------------------------------------------
# nvmprov ssh: the OpenSSH command line


def _guest_argv(uri: str) -> list[str]:
    from nvmprov import guests, managed, state

    coords = managed.ssh_coordinates(state.GuestFiles(Path("/s/g1")), 40100, "nvmprov")
    return guests.openssh_argv("/usr/bin/ssh", coords, proxy=remote.ssh_proxy_options(uri), command=["uname", "-a"])


def _options(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]


def test_nvmprov_ssh_trusts_only_the_pinned_known_hosts() -> None:
    argv = _guest_argv("qemu:///system")
    opts = _options(argv)
    assert "UserKnownHostsFile=/s/g1/known_hosts" in opts
    assert "GlobalKnownHostsFile=/dev/null" in opts  # /etc/ssh/ssh_known_hosts does not count either
    assert "StrictHostKeyChecking=yes" in opts and "IdentitiesOnly=yes" in opts and "IdentityAgent=none" in opts
    assert not any(o.startswith("ProxyCommand=") for o in opts)
    assert argv[-5:] == ["-p", "40100", "nvmprov@127.0.0.1", "uname", "-a"]


def test_nvmprov_ssh_of_a_remote_guest_keeps_its_proxy_command() -> None:
    opts = _options(_guest_argv("qemu+ssh://bob@hv:2200/system"))
    (proxy,) = [o for o in opts if o.startswith("ProxyCommand=")]
    assert proxy == "ProxyCommand=ssh -l bob -p 2200 -W %h:%p hv"  # the hop's ssh: the user's own config
    assert "GlobalKnownHostsFile=/dev/null" in opts


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
def test_openssh_itself_reads_the_options_that_way() -> None:
    # `ssh -G` prints the configuration it would use and connects to nothing.
    argv = _guest_argv("qemu+ssh://bob@hv:2200/system")
    argv[0] = shutil.which("ssh") or "ssh"
    out = subprocess.run([argv[0], "-G", *argv[1:-2]], capture_output=True, text=True, timeout=30, check=True).stdout
    config = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert config["globalknownhostsfile"] == "/dev/null"
    assert config["userknownhostsfile"] == "/s/g1/known_hosts"
    assert config["stricthostkeychecking"] in ("true", "yes")
    assert config["proxycommand"] == "ssh -l bob -p 2200 -W %h:%p hv"
