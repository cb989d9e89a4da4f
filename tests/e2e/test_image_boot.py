"""The built-in image's own smoke test: it boots under TCG from a hand-built domain with one
NVDIMM, nvmprov-seed (the image's stand-in for cloud-init) applies the seed, SSH answers with the
pinned host key, and the guest sees the NVDIMM as an ACPI NFIT region.

Deliberately independent of domain.py/virt.py/ssh.py (the create workflow has its own tests):
a small ElementTree domain and a plain paramiko wait. Set NVMPROV_SAVE_GUEST_FIXTURES=1 to
store the guest's ndctl/iomem/sysfs output in tests/unit/fixtures/guest/ for the agent's tests.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import paramiko
import pytest

from nvmprov import image, image_seed, seed, storage, virt
from tests.volumes import create_backing

pytestmark = pytest.mark.e2e

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

URI = "qemu:///system"
MiB = 1 << 20
GiB = 1 << 30
GUEST_RAM_BYTES = 1 * GiB
NVDIMM_BYTES = 512 * MiB
DISK_BYTES = 4 * GiB
BOOT_TO_SSH_DEADLINE_S = 420.0  # measured 15-25 s under TCG (2026-12-02); room for a loaded CI host
SSH_RETRY_S = 2.0
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "guest"


def _kib(n_bytes: int) -> str:
    return str(n_bytes // 1024)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BootVolumes:
    overlay: str
    seed: str
    backing: str
    kernel: str
    initrd: str


def domain_xml(name: str, vols: BootVolumes, *, port: int, mac: str, serial_log: str) -> str:
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "maxMemory", slots="2", unit="KiB").text = _kib(GUEST_RAM_BYTES + 2 * NVDIMM_BYTES)
    ET.SubElement(dom, "memory", unit="KiB").text = _kib(GUEST_RAM_BYTES)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "kernel").text = vols.kernel
    ET.SubElement(os_, "initrd").text = vols.initrd
    ET.SubElement(os_, "cmdline").text = "root=/dev/vda console=ttyS0"
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    numa = ET.SubElement(ET.SubElement(dom, "cpu"), "numa")
    ET.SubElement(numa, "cell", id="0", cpus="0", memory=_kib(GUEST_RAM_BYTES), unit="KiB")
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=vols.overlay)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(cdrom, "driver", name="qemu", type="raw")
    ET.SubElement(cdrom, "source", file=vols.seed)
    ET.SubElement(cdrom, "target", dev="sda", bus="sata")
    ET.SubElement(cdrom, "readonly")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=serial_log, append="off")
    ET.SubElement(serial, "target", port="0")
    mem = ET.SubElement(devices, "memory", model="nvdimm", access="shared")
    ET.SubElement(ET.SubElement(mem, "source"), "path").text = vols.backing
    target = ET.SubElement(mem, "target")
    ET.SubElement(target, "size", unit="KiB").text = _kib(NVDIMM_BYTES)
    ET.SubElement(target, "node").text = "0"
    cmdline = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in (
        "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},bus=pcie.0,addr=0x1e",
    ):  # fmt: skip
        ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(dom, encoding="unicode")


@pytest.fixture(scope="module")
def conn() -> Iterator[libvirt.virConnect]:
    if os.geteuid() != 0:
        pytest.fail("e2e tests need root (qemu:///system); run them through scripts/test.sh")
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture(scope="module")
def pool(conn: libvirt.virConnect) -> libvirt.virStoragePool:
    pool = storage.ensure_pool(conn)
    t = time.monotonic()
    image.build(conn, progress=print)  # no-op when the current recipe's image is in the pool
    print(f"image ready in {time.monotonic() - t:.1f} s")
    return pool


@dataclass
class Booted:
    ssh: paramiko.SSHClient
    seconds_to_ssh: float
    host_key: str
    serial_log: Path
    name: str

    def run(self, command: str) -> str:
        _stdin, stdout, stderr = self.ssh.exec_command(command, timeout=120)
        rc = stdout.channel.recv_exit_status()
        out, err = stdout.read().decode(), stderr.read().decode()
        assert rc == 0, f"{command!r} exited {rc}: {err[-2000:]}"
        return out


def _wait_for_ssh(
    port: int, user: str, client_key: paramiko.PKey, host_key_line: str, dom: libvirt.virDomain, serial_log: Path
) -> paramiko.SSHClient:
    key_type, blob = host_key_line.split()[:2]
    pinned = paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
    deadline = time.monotonic() + BOOT_TO_SSH_DEADLINE_S
    last = "no attempt"
    while time.monotonic() < deadline:
        log = serial_log.read_text(errors="replace") if serial_log.exists() else ""
        assert "Kernel panic" not in log, f"guest panicked:\n{log[-3000:]}"
        assert dom.isActive(), f"guest stopped:\n{log[-3000:]}"
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{port}", key_type, pinned)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                "127.0.0.1",
                port=port,
                username=user,
                pkey=client_key,
                timeout=20,
                banner_timeout=20,
                auth_timeout=20,
                allow_agent=False,
                look_for_keys=False,
            )
            return client
        except paramiko.BadHostKeyException:
            client.close()
            raise
        except (OSError, EOFError, paramiko.SSHException) as e:  # booting: refused, reset, no banner, no key yet
            client.close()
            last = f"{type(e).__name__}: {e}"
        time.sleep(SSH_RETRY_S)
    log = serial_log.read_text(errors="replace") if serial_log.exists() else "(no serial log)"
    pytest.fail(f"no SSH within {BOOT_TO_SSH_DEADLINE_S:.0f} s ({last}); serial log tail:\n{log[-3000:]}")


@pytest.fixture(scope="module")
def booted(conn: libvirt.virConnect, pool: libvirt.virStoragePool, tmp_path_factory) -> Iterator[Booted]:
    name = f"e2e-imgboot-{uuid.uuid4().hex[:6]}"
    base, kernel, initrd = image.builtin_volume_names()
    made: list[str] = []
    dom = None
    try:
        storage.create_overlay(pool, f"{name}-root.qcow2", base, DISK_BYTES)
        made.append(f"{name}-root.qcow2")
        create_backing(pool, f"{name}-pmem.raw", NVDIMM_BYTES, allocation="full")
        made.append(f"{name}-pmem.raw")

        client, host = seed.generate_keypair("e2e"), seed.generate_keypair()
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
        cfg = seed.SeedConfig(
            hostname=name,
            user="nvmprov",
            client_public_key=client.public_openssh,
            host_private_key=host.private_openssh,
            host_public_key=host.public_openssh,
            outbound=False,
            instance_id=name,
            mac=mac,
        )
        docs = seed.user_data(cfg), seed.meta_data(cfg), seed.network_config(cfg)
        iso = seed.build_iso(*docs, final=image_seed.final_files(*docs))
        storage.upload(pool, f"{name}-seed.iso", iso)
        made.append(f"{name}-seed.iso")

        vols = BootVolumes(
            overlay=storage.volume(pool, f"{name}-root.qcow2").path(),
            seed=storage.volume(pool, f"{name}-seed.iso").path(),
            backing=storage.volume(pool, f"{name}-pmem.raw").path(),
            kernel=storage.volume(pool, kernel).path(),
            initrd=storage.volume(pool, initrd).path(),
        )
        serial_log = tmp_path_factory.mktemp("imgboot") / "serial.log"
        port = free_loopback_port()
        dom = conn.defineXML(domain_xml(name, vols, port=port, mac=mac, serial_log=str(serial_log)))
        assert virt.path_users(conn, [vols.backing])[vols.backing] == [name]
        start = time.monotonic()
        dom.create()
        started = time.monotonic() - start
        pkey = paramiko.Ed25519Key(file_obj=io.StringIO(client.private_openssh.decode()))
        ssh = _wait_for_ssh(port, "nvmprov", pkey, host.public_openssh, dom, serial_log)
        seconds = time.monotonic() - start
        print(f"domain start {started:.1f} s, start to SSH {seconds:.1f} s")
        yield Booted(ssh=ssh, seconds_to_ssh=seconds, host_key=host.public_openssh, serial_log=serial_log, name=name)
        ssh.close()
    finally:
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        for vol_name in made:
            storage.delete(pool, vol_name)
        assert not any(storage.volume_exists(pool, n) for n in made)


def test_boots_to_ssh_with_the_pinned_host_key(booted: Booted, record_property):
    record_property("seconds_to_ssh", round(booted.seconds_to_ssh, 1))
    served = booted.ssh.get_transport().get_remote_server_key()
    assert f"{served.get_name()} {served.get_base64()}" == " ".join(booted.host_key.split()[:2])
    assert booted.seconds_to_ssh < BOOT_TO_SSH_DEADLINE_S
    # the image's own host keys are gone: only the seeded ed25519 key exists
    keys = booted.run("ls /etc/ssh/").split()
    assert sorted(k for k in keys if k.startswith("ssh_host_")) == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]


def test_login_user_has_passwordless_sudo_and_no_password_login(booted: Booted):
    assert booted.run("sudo -n id -u").strip() == "0"
    sshd = booted.run("sudo -n sshd -T").splitlines()
    for setting in ("passwordauthentication no", "kbdinteractiveauthentication no", "permitrootlogin no"):
        assert setting in sshd


def test_root_filesystem_grew_to_the_overlay(booted: Booted):
    # nvmprov-grow-root runs after sshd: starting it again waits for the run under way (or is skipped
    # by its condition once done)
    booted.run("sudo -n systemctl start nvmprov-grow-root.service")
    size_bytes = int(booted.run("df -B1 --output=size / | tail -n 1").strip())
    assert size_bytes > DISK_BYTES * 0.9


def test_network_is_qemu_user_networkings_address_on_eth0_without_dhcp(booted: Booted):
    assert "10.0.2.15/24" in booted.run("ip -4 -o addr show dev eth0")
    assert "default via 10.0.2.2 dev eth0" in booted.run("ip route show default")
    assert "nameserver 10.0.2.3" in booted.run("cat /etc/resolv.conf")
    assert booted.run("command -v dhclient ifup || echo none").strip() == "none"


def test_sshd_waits_for_the_seed_only(booted: Booted, record_property):
    """sshd's critical chain: the seed applier (a shell script) and the root remount, not udev,
    ifupdown, DHCP or python3."""
    chain = booted.run("systemd-analyze critical-chain ssh.service")
    print(chain)
    record_property("ssh_critical_chain", chain)
    for slow in ("udev", "networking.service", "ifupdown", "sysinit.target", "basic.target"):
        assert slow not in chain, chain
    assert "nvmprov-seed.service" in chain
    assert "python" not in booted.run("systemctl show -p ExecStart --value nvmprov-seed.service")


def test_boot_leaves_out_initrd_udev_generators_and_motd(booted: Booted):
    """The initrd's /init is nvmprov's own (initramfs-tools' makes /run/initramfs, and runs udev),
    only systemd's fstab generator runs, and a login makes no message of the day (under TCG each
    was seconds on sshd's path: docs/performance.md)."""
    assert booted.run("test -e /run/initramfs && echo yes || echo no").strip() == "no"
    running = booted.run(
        "for g in /lib/systemd/system-generators/*; do "
        '[ "$(readlink -f /etc/systemd/system-generators/${g##*/})" = /dev/null ] || echo ${g##*/}; done'
    ).split()
    assert running == ["systemd-fstab-generator"]
    assert booted.run("test -e /run/motd.dynamic && echo yes || echo no").strip() == "no"


def test_seed_applied_by_nvmprov_seed_without_cloud_init(booted: Booted):
    assert booted.run("systemctl is-active nvmprov-seed.service").strip() == "active"
    assert booted.run("command -v cloud-init || echo none").strip() == "none"
    assert booted.run("hostname").strip() == booted.name
    assert "127.0.1.1\t" + booted.name in booted.run("cat /etc/hosts")
    # it says so on the serial console, where a failed seed would be explained
    assert f"nvmprov-seed: applied (host {booted.name}, user nvmprov" in booted.serial_log.read_text(errors="replace")


def test_nvdimm_is_an_nfit_region_in_the_guest(booted: Booted):
    iomem = booted.run("sudo -n cat /proc/iomem")
    pmem_lines = [line for line in iomem.splitlines() if "Persistent Memory" in line]
    assert pmem_lines, iomem
    start, end = pmem_lines[0].split(":")[0].strip().split("-")
    assert int(end, 16) - int(start, 16) + 1 == NVDIMM_BYTES
    assert "/dev/pmem0" in booted.run("ls /dev/pmem*")
    listing = json.loads(booted.run("sudo -n ndctl list -RNDu"))
    regions = listing["regions"] if isinstance(listing, dict) else listing
    assert len(regions) == 1
    assert regions[0]["size"] in ("512.00 MiB (536.87 MB)", NVDIMM_BYTES), regions[0]
    assert booted.run("cat /sys/bus/nd/devices/nmem0/nfit/handle").strip() in ("0x1", "1")


def test_guest_fixtures_of_the_unit_tests_match_this_guest(booted: Booted):
    """tests/unit/fixtures/guest/ stand for this guest in the unit tests: its NFIT layout must still be
    what they show. NVMPROV_SAVE_GUEST_FIXTURES=1 rewrites them from this guest instead."""
    outputs = {
        "ndctl-list-RNDu.json": "sudo -n ndctl list -RNDu",
        "ndctl-list-RNDv.json": "sudo -n ndctl list -RND -v",
        "proc-iomem.txt": "sudo -n cat /proc/iomem",
        "sys-bus-nd-devices.txt": "ls -l /sys/bus/nd/devices/",
        "nfit-handles.txt": "grep -H . /sys/bus/nd/devices/nmem*/nfit/handle",
        "ls-dev-pmem.txt": "ls -l /dev/pmem*",
        "uname.txt": "uname -a",
    }
    live = {filename: booted.run(command) for filename, command in outputs.items()}
    if os.environ.get("NVMPROV_SAVE_GUEST_FIXTURES") == "1":
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for filename, text in live.items():
            (FIXTURES / filename).write_text(text)
    saved = {filename: (FIXTURES / filename).read_text() for filename in outputs}

    def pmem_ranges(iomem: str) -> list[str]:
        return [line.split(":")[0].strip() for line in iomem.splitlines() if "Persistent Memory" in line]

    def layout(ndctl: str) -> list[tuple[str, object, list[tuple[str, str]]]]:
        listing = json.loads(ndctl)
        regions = listing["regions"] if isinstance(listing, dict) else listing
        return [(r["dev"], r["size"], [(m["dimm"], m["length"]) for m in r.get("mappings", [])]) for r in regions]

    assert pmem_ranges(live["proc-iomem.txt"]) == pmem_ranges(saved["proc-iomem.txt"]) != []
    assert live["nfit-handles.txt"] == saved["nfit-handles.txt"]
    assert layout(live["ndctl-list-RNDu.json"]) == layout(saved["ndctl-list-RNDu.json"])
