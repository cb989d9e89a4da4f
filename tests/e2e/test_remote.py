"""A remote hypervisor over qemu+ssh, tested against this machine: an sshd of the test's own on
127.0.0.1:<free port> (its own host key, root login by a generated key), named by an ssh_config
alias that both libvirt's ssh (through the URI's ?command= wrapper, `ssh -F CONFIG`) and nvmprov
(through $HOME/.ssh/config, as paramiko reads it) resolve. One guest, e2e-remote, is created with
the full proof (the power-cycle marker is read back from the backing volume over the remote
connection), reached with `nvmprov ssh` and Ansible through the hypervisor, and destroyed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nvmprov.errors import HostError

from .conftest import _require_host, nvmprov, write_spec
from .hosts import loopback_sshd

pytestmark = pytest.mark.e2e

ALIAS = "nvmprov-e2e-hv"
NAME = "e2e-remote"


@dataclass
class Hypervisor:
    dir: Path
    port: int
    uri: str
    env: dict[str, str]  # HOME whose .ssh/config names the alias

    def run(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return nvmprov(*args, env=self.env, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def hypervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hypervisor]:
    _require_host()
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or not shutil.which("ssh"):
        pytest.fail("openssh-server and openssh-client are needed (scripts/setup.sh installs them)")
    if not shutil.which("virt-ssh-helper") and not shutil.which("nc"):
        pytest.fail("libvirt's ssh transport needs virt-ssh-helper (libvirt-clients) on the hypervisor")
    d = tmp_path_factory.mktemp("hv")
    # LogLevel DEBUG1 logs each direct-tcpip channel with its target: the tests check the tunnel
    with loopback_sshd(d, sshd=sshd, extra_config="LogLevel DEBUG1\n") as port:
        # The alias and 127.0.0.1 itself: the URI below names root@127.0.0.1:PORT as a user would.
        config = (f"Host {ALIAS} 127.0.0.1\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
                  f"  IdentityFile {d}/id\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
                  "  StrictHostKeyChecking yes\n")
        (d / "ssh_config").write_text(config)
        home = d / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "config").write_text(config)
        wrapper = d / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec ssh -F {d}/ssh_config \"$@\"\n")
        wrapper.chmod(0o755)
        yield Hypervisor(d, port, f"qemu+ssh://root@127.0.0.1:{port}/system?command={wrapper}", {"HOME": str(home)})


@dataclass
class Remote:
    hv: Hypervisor
    proc: subprocess.CompletedProcess[str]
    report: dict


@pytest.fixture(scope="module")
def remote_guest(hypervisor: Hypervisor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    hypervisor.run("destroy", NAME, "--purge", "--yes", "--connect", hypervisor.uri)
    # ?command= is refused in a spec file (libvirt would run it): such a URI goes on the command line.
    spec = {"version": 1, "name": NAME, "memory": "1GiB", "pmem": [{"name": "data", "size": "128MiB"}]}
    path = write_spec(tmp_path_factory.mktemp("remote"), NAME, spec)
    # No power cycle (it costs ~2 min under TCG and runs the same code as locally); the test below
    # reads the marker back from the backing volume through the storage API over qemu+ssh instead.
    proc = hypervisor.run("create", str(path), "--no-power-cycle", "--json", "--connect", hypervisor.uri)
    try:
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"remote create printed no JSON (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        yield Remote(hypervisor, proc, report)
    finally:
        hypervisor.run("destroy", NAME, "--purge", "--yes", "--connect", hypervisor.uri)


def test_remote_create_proves_dax_and_persistence(remote_guest: Remote) -> None:
    assert remote_guest.proc.returncode == 0, remote_guest.proc.stderr[-6000:]
    g = remote_guest.report["guests"][0]
    assert g["ok"] is True, g
    region = g["regions"][0]
    assert region["dax"] and region["xip_ok"] and region["data_ok"], region
    # SSH went through the hypervisor's sshd (a direct-tcpip channel to the guest's forward on its
    # loopback), never a forward opened to the network.
    assert tunnelled_to(remote_guest.hv, g["ssh"]["port"])


def tunnelled_to(hv: Hypervisor, port: int) -> bool:
    log = (hv.dir / "sshd.log").read_text()
    return any("direct_tcpip" in line and f"target 127.0.0.1 port {port}" in line for line in log.splitlines())


def test_the_marker_is_read_back_from_the_backing_volume_over_qemu_ssh(remote_guest: Remote) -> None:
    region = remote_guest.report["guests"][0]["regions"][0]
    assert region["marker"], region
    code = (
        "import sys; from nvmprov import storage, virt\n"
        "conn = virt.connect(sys.argv[1]); pool = storage.pool_of(conn, 'nvmprov')\n"
        "print(storage.find_marker(storage.volume(pool, sys.argv[2]), sys.argv[3].encode()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, remote_guest.hv.uri, f"{NAME}-pmem-data.raw", region["marker"]],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **remote_guest.hv.env})
    assert proc.returncode == 0, proc.stderr
    offset = proc.stdout.strip()
    assert offset.isdigit(), f"marker not found in the backing volume read over {remote_guest.hv.uri}: {offset}"
    assert "Accepted publickey for root" in (remote_guest.hv.dir / "sshd.log").read_text()


def test_the_domain_really_lives_behind_the_uri(remote_guest: Remote) -> None:
    out = subprocess.run(["virsh", "-c", remote_guest.hv.uri, "domstate", NAME], capture_output=True, text=True,
                         env={**os.environ, **remote_guest.hv.env}, timeout=60)
    assert out.stdout.strip() == "running", out.stderr
    xml = subprocess.run(["virsh", "dumpxml", NAME], capture_output=True, text=True, check=True).stdout
    assert "hostfwd=tcp:127.0.0.1:" in xml  # bound to the hypervisor's loopback only


def test_nvmprov_ssh_and_console_go_through_the_hypervisor(remote_guest: Remote) -> None:
    # --connect before NAME: everything after NAME is the remote command
    proc = remote_guest.hv.run("ssh", "--connect", remote_guest.hv.uri, NAME, "--", "cat", "/proc/mounts")
    assert proc.returncode == 0, proc.stderr
    assert " /mnt/data " in proc.stdout and "dax" in proc.stdout
    console = remote_guest.hv.run("console", NAME, "--connect", remote_guest.hv.uri)
    assert console.returncode == 0, console.stderr
    assert "Linux version" in console.stdout


def test_ansible_inventory_proxies_through_the_hypervisor(remote_guest: Remote, tmp_path: Path) -> None:
    inv = remote_guest.hv.run("list", "--format", "ansible", "--connect", remote_guest.hv.uri, check=True)
    host = json.loads(inv.stdout)["all"]["children"]["nvmprov"]["hosts"][NAME]
    assert "ProxyCommand=" in host["ansible_ssh_common_args"]
    path = tmp_path / "inventory.json"
    path.write_text(inv.stdout)
    ansible = Path(sys.executable).with_name("ansible")
    assert ansible.exists(), "ansible-core is a test dependency: pip install -e '.[test]'"
    run = subprocess.run([str(ansible), "-i", str(path), NAME, "-m", "command", "-a", "uname -n"],
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, **remote_guest.hv.env, "LC_ALL": "C.UTF-8"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{NAME} | CHANGED | rc=0" in run.stdout and NAME in run.stdout.splitlines()[-1]


def test_an_unknown_hypervisor_host_key_is_refused(hypervisor: Hypervisor) -> None:
    from nvmprov import remote

    ep = remote.Endpoint(alias=ALIAS, hostname="127.0.0.1", port=hypervisor.port, user="root",
                         identity_files=(str(hypervisor.dir / "id"),),
                         known_hosts_files=(str(hypervisor.dir / "empty_known_hosts"),), verify=True)
    with pytest.raises(HostError, match="host key is not in"):
        remote.Hypervisor(ep).open_channel(hypervisor.port)


def test_verify_with_power_cycle_through_the_uri(remote_guest: Remote) -> None:
    # After the tests that read the create report's marker: verify writes a new payload over it.
    proc = remote_guest.hv.run("verify", NAME, "--power-cycle", "--json", "--connect", remote_guest.hv.uri)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (region,) = json.loads(proc.stdout)["guests"][0]["regions"]
    assert region["persisted"] is True and region["data_ok"] is True, region
    assert isinstance(region["marker_offset"], int), region  # found in the volume read over qemu+ssh


def test_destroy_through_the_uri_leaves_nothing(remote_guest: Remote) -> None:
    proc = remote_guest.hv.run("destroy", NAME, "--purge", "--yes", "--connect", remote_guest.hv.uri)
    assert proc.returncode == 0, proc.stderr
    names = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True, check=True).stdout
    assert NAME not in names.split()
    assert not list(Path("/var/lib/nvmprov/pool").glob(f"{NAME}-*"))
