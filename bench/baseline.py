"""The hand-written baseline: what a person would do for the demo guest without nvmprov.

ssh-keygen for the keys, a cloud-init seed (built with nvmprov.seed: that part of preparing a
cloud image by hand is not what is being measured), `virsh vol-create-as` / `vol-upload` for the
volumes, the fixed XML in bench/baseline-domain.xml started with `virsh create`, an OpenSSH
wait loop, the same in-guest commands as nvmprov's agent (ndctl create-namespace, mkfs.ext4
-b 4096, mount -o dax, a 16 MiB write + sync), then a power cut, a second boot, the checksum
re-check and the marker looked for in the host backing file.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from nvmprov import image_seed, seed

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "baseline-domain.xml"
URI = "qemu:///system"
KiB, GiB = 1024, 1024**3

SSH_DEADLINE_S = 300.0      # a TCG boot takes 50-90 s; this only bounds a broken guest
SSH_TRY_TIMEOUT_S = 20.0    # one `ssh ... true` attempt, banner wait included
SSH_RETRY_PAUSE_S = 1.0     # what a person's `until ssh ...; do sleep 1; done` does
GUEST_CMD_TIMEOUT_S = 300.0
PAYLOAD_BYTES = 16 * 1024 * 1024
MOUNT = "/mnt/data"
ALIGNSIZE_XML = "\n        <alignsize unit='KiB'>2048</alignsize>"


class BenchError(Exception):
    """A baseline step failed: the command, its status and the tail of its stderr."""


@dataclass(frozen=True)
class BaselineGuest:
    name: str
    base_volume: str
    kernel_volume: str
    initrd_volume: str
    region_bytes: int = GiB
    ram_bytes: int = GiB
    disk_bytes: int = 8 * GiB
    pool: str = "nvmprov"
    pool_dir: str = "/var/lib/nvmprov/pool"
    user: str = "nvmprov"
    align: bool = True            # <alignsize> 2 MiB on the nvdimm, as nvmprov renders it

    @property
    def volumes(self) -> dict[str, str]:
        return {"pmem": f"{self.name}-pmem.raw", "overlay": f"{self.name}-root.qcow2", "seed": f"{self.name}-seed.iso"}

    def path(self, volume: str) -> str:
        return f"{self.pool_dir}/{volume}"


@dataclass
class Timer:
    """Phase name -> seconds, in the order measured."""

    phases_s: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.phases_s[name] = round(self.phases_s.get(name, 0.0) + time.monotonic() - began, 2)


def run(argv: list[str], *, timeout_s: float = 120.0, check: bool = True, stdin: bytes | None = None) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{shlex.join(argv)}: no answer after {timeout_s:.0f} s") from e
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{shlex.join(argv)}: exit {proc.returncode}: {' / '.join(tail)}")
    return proc.stdout.decode(errors="replace")


def virsh(*args: str, timeout_s: float = 300.0, check: bool = True) -> str:
    return run(["virsh", "-q", "-c", URI, *args], timeout_s=timeout_s, check=check)


def free_port() -> int:
    """A port nobody listens on now (bind to 0 on loopback, read it, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def domain_xml(g: BaselineGuest, *, ssh_port: int, mac: str) -> str:
    ram_kib = g.ram_bytes // KiB
    pmem_kib = g.region_bytes // KiB
    return Template(TEMPLATE.read_text()).substitute(
        name=g.name, ram_kib=ram_kib, pmem_kib=pmem_kib, total_kib=ram_kib + pmem_kib,
        max_kib=ram_kib + pmem_kib + 8 * GiB // KiB,
        kernel=g.path(g.kernel_volume), initrd=g.path(g.initrd_volume),
        overlay=g.path(g.volumes["overlay"]), seed=g.path(g.volumes["seed"]), pmem=g.path(g.volumes["pmem"]),
        alignsize=ALIGNSIZE_XML if g.align else "", ssh_port=ssh_port, mac=mac,
        console_log=f"/var/log/libvirt/qemu/{g.name}-serial.log",
    )


def _keygen(path: Path) -> tuple[str, str]:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)])
    return path.read_text(), path.with_suffix(".pub").read_text().strip()


@dataclass
class Prepared:
    xml_path: Path
    client_key: Path
    known_hosts: Path
    ssh_port: int


def prepare(g: BaselineGuest, workdir: Path) -> Prepared:
    """Keys, seed ISO, three volumes, the XML file: everything before `virsh create`."""
    _, client_pub = _keygen(workdir / "client")
    host_priv, host_pub = _keygen(workdir / "hostkey")
    mac = "52:54:00:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:3])
    cfg = seed.SeedConfig(
        hostname=g.name, user=g.user, client_public_key=client_pub, host_private_key=host_priv,
        host_public_key=host_pub, outbound=False, instance_id=f"{g.name}-{uuid.uuid4().hex[:8]}", mac=mac,
    )
    iso = workdir / "seed.iso"
    docs = seed.user_data(cfg), seed.meta_data(cfg), seed.network_config(cfg)
    # the built-in image reads the seed's final form (nvmprov.image_seed), as nvmprov writes it
    iso.write_bytes(seed.build_iso(*docs, final=image_seed.final_files(*docs)))
    v = g.volumes
    # allocation = capacity: libvirt fallocates, as nvmprov's `allocation: full`.
    virsh("vol-create-as", g.pool, v["pmem"], str(g.region_bytes), "--allocation", str(g.region_bytes),
          "--format", "raw")
    virsh("vol-create-as", g.pool, v["overlay"], str(g.disk_bytes), "--format", "qcow2",
          "--backing-vol", g.base_volume, "--backing-vol-format", "qcow2")
    virsh("vol-create-as", g.pool, v["seed"], str(iso.stat().st_size), "--format", "raw")
    virsh("vol-upload", "--pool", g.pool, v["seed"], str(iso))
    port = free_port()
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    xml_path = workdir / "domain.xml"
    xml_path.write_text(domain_xml(g, ssh_port=port, mac=mac))
    return Prepared(xml_path, workdir / "client", known_hosts, port)


def ssh_argv(g: BaselineGuest, p: Prepared, command: str) -> list[str]:
    return [
        "ssh", "-i", str(p.client_key), "-p", str(p.ssh_port),
        "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={p.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={int(SSH_TRY_TIMEOUT_S)}", "-o", "LogLevel=ERROR",
        f"{g.user}@127.0.0.1", command,
    ]


def wait_for_ssh(g: BaselineGuest, p: Prepared) -> int:
    """`until ssh guest true; do sleep 1; done`, bounded by SSH_DEADLINE_S; returns attempts."""
    deadline = time.monotonic() + SSH_DEADLINE_S
    attempt = 0
    while True:
        attempt += 1
        try:
            run(ssh_argv(g, p, "true"), timeout_s=SSH_TRY_TIMEOUT_S + 5)
            return attempt
        except BenchError as e:
            if time.monotonic() + SSH_RETRY_PAUSE_S >= deadline:
                raise BenchError(f"{g.name}: no SSH after {SSH_DEADLINE_S:.0f} s ({attempt} attempts): {e}") from e
        time.sleep(SSH_RETRY_PAUSE_S)


def guest_sudo(g: BaselineGuest, p: Prepared, script: str) -> str:
    return run(ssh_argv(g, p, "sudo -n sh -c " + shlex.quote(script)), timeout_s=GUEST_CMD_TIMEOUT_S)


# sshd is up before udev's coldplug has loaded the nvdimm drivers (issue 14's boot path), so the hand
# script loads them itself and waits for the block device, as nvmprov's agent does.
LOAD_DRIVERS = "modprobe -a nfit nd_pmem"
WAIT_PMEM0 = "i=0; until [ -b /dev/pmem0 ] || [ $i -ge 300 ]; do sleep 0.1; i=$((i + 1)); done"


def setup_script(marker: str) -> str:
    return "\n".join([
        "set -e",
        LOAD_DRIVERS,
        "ndctl create-namespace -f -e namespace0.0 -m fsdax >/dev/null",
        WAIT_PMEM0,
        "mkfs.ext4 -q -F -b 4096 /dev/pmem0",
        f"mkdir -p {MOUNT}",
        f"mount -o dax /dev/pmem0 {MOUNT}",
        f"grep -q ' {MOUNT} ext4 .*dax' /proc/mounts",
        f"{{ printf %s {marker}; head -c {PAYLOAD_BYTES} /dev/urandom; }} > {MOUNT}/payload",
        "sync",
        f"sha256sum {MOUNT}/payload",
    ])


def recheck_script() -> str:
    return f"set -e; {LOAD_DRIVERS}; {WAIT_PMEM0}; mount -o dax /dev/pmem0 {MOUNT}; sha256sum {MOUNT}/payload"


def measure(g: BaselineGuest) -> dict[str, float]:
    """One full baseline run; returns seconds per phase (bench.stats.PHASES). Cleans up always."""
    t = Timer()
    began = time.monotonic()
    marker = f"BASELINE-{uuid.uuid4().hex}"
    with tempfile.TemporaryDirectory(prefix=f"{g.name}-") as tmp:
        try:
            with t.phase("prepare"):
                p = prepare(g, Path(tmp))
            with t.phase("start"):
                virsh("create", str(p.xml_path))
            with t.phase("boot_to_ssh"):
                wait_for_ssh(g, p)
            with t.phase("agent"):
                before = guest_sudo(g, p, setup_script(marker)).split()[0]
            with t.phase("power_cycle"):
                virsh("destroy", g.name)
                virsh("create", str(p.xml_path))
                wait_for_ssh(g, p)
                after = guest_sudo(g, p, recheck_script()).split()[0]
                if after != before:
                    raise BenchError(f"{g.name}: payload changed across the power cut ({before} -> {after})")
                run(["grep", "-q", "-a", "-F", marker, g.path(g.volumes["pmem"])], timeout_s=120)
            t.phases_s["total"] = round(time.monotonic() - began, 2)
        finally:
            cleanup(g)
    return t.phases_s


def start_only(g: BaselineGuest) -> float:
    """Seconds of `virsh create --paused` (QEMU up, backends preallocated, no guest code run)."""
    with tempfile.TemporaryDirectory(prefix=f"{g.name}-") as tmp:
        try:
            p = prepare(g, Path(tmp))
            began = time.monotonic()
            virsh("create", "--paused", str(p.xml_path))
            return round(time.monotonic() - began, 2)
        finally:
            cleanup(g)


def cleanup(g: BaselineGuest) -> None:
    virsh("destroy", g.name, check=False)
    for volume in g.volumes.values():
        virsh("vol-delete", "--pool", g.pool, volume, check=False)
