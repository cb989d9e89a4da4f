"""nvmprov.image: the recipe, its digest, the host's apt sources, sizes (no build here: the
build itself is proven by tests/e2e/test_image_boot.py)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import uuid

import libvirt
import pytest

from nvmprov import image, storage
from tests.volumes import create_backing

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

GiB = 1 << 30
MiB = 1 << 20

DEBIAN_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main

Enabled: no
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm
Components: main
"""

NODESOURCE = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""


def test_recipe_has_the_packages_the_guest_needs():
    pkgs = image.packages()
    for needed in (
        "linux-image-amd64",
        "systemd-sysv",
        "dbus",
        "openssh-server",
        "ndctl",  # ships `cxl` too
        "iproute2",
        "xfsprogs",
        "sudo",
        "qemu-guest-agent",
        "python3",
        "daxctl",  # issue 17: devdax, PMDK
        "libpmem1",
        "libpmemobj1",
        "pmdk-tools",
    ):
        assert needed in pkgs
    assert all(p and " " not in p and "#" not in p for p in pkgs)
    assert "cloud-init" not in pkgs  # ~80 s of every TCG boot; nvmprov-seed applies the seed instead
    # nvmprov-seed sets eth0 itself: ifupdown's udev settle and DHCP held sshd back by ~20 s
    assert not {"ifupdown", "isc-dhcp-client", "python3-yaml"} & set(pkgs)


def test_customize_hook_removes_host_keys_and_skips_fsck_and_nologin():
    hook = (image.RECIPE_DIR / "customize.sh").read_text()
    assert 'rm -f "$root"/etc/ssh/ssh_host_*' in hook
    assert "'/dev/vda / ext4 defaults,errors=remount-ro 0 0'" in hook  # pass 0: no fsck on sshd's path
    assert 'ln -sf /dev/null "$root/etc/tmpfiles.d/systemd-nologin.conf"' in hook


def test_seed_unit_is_enabled_and_runs_before_network_and_sshd_without_python():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((image.RECIPE_DIR / "files/etc/systemd/system/nvmprov-seed.service").read_text())
    before = unit["Unit"]["Before"].split()
    assert {"network-pre.target", "ssh.service"} <= set(before)
    assert unit["Unit"]["After"].split() == ["systemd-journald.socket"]  # no udev, remount, sysusers
    assert unit["Service"]["ExecStart"] == "/usr/local/lib/nvmprov/apply_seed.sh"
    applier = image.RECIPE_DIR / "files/usr/local/lib/nvmprov/apply_seed.sh"
    assert applier.read_text().startswith("#!/bin/sh\n")
    assert "python" not in applier.read_text().split("set -eu", 1)[1]
    hook = (image.RECIPE_DIR / "customize.sh").read_text()
    assert "for unit in nvmprov-seed.service nvmprov-grow-root.service; do" in hook
    assert 'multi-user.target.wants/$unit"' in hook
    assert 'ln -sf /dev/null "$root/etc/systemd/network/99-default.link"' in hook  # NIC keeps eth0


def test_root_grows_after_sshd_and_unused_drivers_stay_unloaded():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((image.RECIPE_DIR / "files/etc/systemd/system/nvmprov-grow-root.service").read_text())
    assert "ssh.service" in unit["Unit"]["After"].split()
    blacklisted = {
        line.split()[1]
        for line in (image.RECIPE_DIR / "files/etc/modprobe.d/nvmprov.conf").read_text().splitlines()
        if line.startswith("blacklist ")
    }
    assert "psmouse" in blacklisted
    assert not {"button", "evdev"} & blacklisted  # logind's power button: `nvmprov stop`


def test_sshd_starts_right_after_the_seed():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((image.RECIPE_DIR / "files/etc/systemd/system/ssh.service.d/10-nvmprov.conf").read_text())
    assert unit["Unit"]["DefaultDependencies"] == "no"
    assert "nvmprov-seed.service" in unit["Unit"]["After"].split()
    assert unit["Service"]["ExecStartPre"] == ""


def test_seed_cd_and_nic_are_probed_in_the_initrd():
    modules = (image.RECIPE_DIR / "files/etc/initramfs-tools/modules").read_text().split()
    assert {"ahci", "sr_mod", "isofs", "virtio_blk", "virtio_net"} <= set(modules)


def test_the_initrd_has_nvmprovs_own_init_without_udev():
    """initramfs-tools' init (udev started, triggered, settled: 5 s under TCG) is replaced by a
    short one: the hook overwrites the init mkinitramfs copied before running hooks."""
    hook = image.RECIPE_DIR / "files/etc/initramfs-tools/hooks/nvmprov-init"
    init = image.RECIPE_DIR / "files/usr/local/lib/nvmprov/initrd-init"
    assert os.access(hook, os.X_OK) and os.access(init, os.X_OK)
    assert 'cp /usr/local/lib/nvmprov/initrd-init "${DESTDIR}/init"' in hook.read_text()
    text = init.read_text()
    assert subprocess.run(["sh", "-n", str(init)], check=False).returncode == 0
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "udev" not in code.replace("udev /dev", "")  # devtmpfs makes the nodes
    assert "done < /conf/modules" in code and "modprobe -q -b -a $modules" in code
    assert 'mount -t ext4 -o rw "$root" /root' in code
    assert 'exec run-init /root "$init" "$@"' in code
    assert "readonly=" not in (image.RECIPE_DIR / "files/etc/initramfs-tools/conf.d/nvmprov.conf").read_text()


def test_only_the_fstab_generator_runs_and_logins_skip_motd():
    hook = (image.RECIPE_DIR / "customize.sh").read_text()
    loop = hook.split("for gen in ", 1)[1].split("; do", 1)[0]
    masked = set(loop.replace("\\", " ").split())
    assert "systemd-fstab-generator" not in masked  # the agent's region mounts are fstab lines
    assert {"systemd-gpt-auto-generator", "systemd-sysv-generator", "systemd-getty-generator"} <= masked
    assert 'ln -sf /dev/null "$root/etc/systemd/system-generators/$gen"' in hook
    assert "pam_motd" in hook and '"$root/etc/pam.d/sshd"' in hook
    assert 'ln -sf /dev/null "$root/etc/systemd/system/systemd-user-sessions.service"' in hook


def test_sshd_and_the_seed_outweigh_other_units_while_booting():
    for path, weight in (
        ("files/etc/systemd/system/ssh.service.d/10-nvmprov.conf", "1000"),
        ("files/etc/systemd/system/nvmprov-seed.service", "1000"),
        ("files/etc/systemd/system/nvmprov-grow-root.service", "10"),
    ):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read_string((image.RECIPE_DIR / path).read_text())
        assert unit["Service"]["StartupCPUWeight"] == weight, path
        assert "CPUWeight" not in unit["Service"], path  # after start-up every unit weighs the same


@pytest.fixture
def recipe(tmp_path):
    copy = tmp_path / "recipe"
    shutil.copytree(image.RECIPE_DIR, copy)
    return copy


def test_digest_is_stable_and_follows_content(recipe):
    first = image.recipe_digest(recipe)
    assert first == image.recipe_digest(recipe) == image.recipe_digest()
    (recipe / "packages.txt").write_text((recipe / "packages.txt").read_text() + "htop\n")
    assert image.recipe_digest(recipe) != first


def test_digest_follows_new_files_and_exec_bit(recipe):
    first = image.recipe_digest(recipe)
    (recipe / "files" / "etc" / "motd").write_text("hi\n")
    second = image.recipe_digest(recipe)
    assert second != first
    (recipe / "customize.sh").chmod(0o644)
    assert image.recipe_digest(recipe) != second


def test_bytecode_beside_the_recipe_is_neither_digested_nor_staged(recipe, tmp_path):
    first = image.recipe_digest(recipe)
    cache = recipe / "files" / "usr" / "local" / "lib" / "nvmprov" / "__pycache__"
    cache.mkdir(exist_ok=True)  # a test that imported apply_seed.py from the checkout may have made it already
    (cache / "apply_seed.cpython-311.pyc").write_bytes(b"\x00bytecode")  # what pip's install leaves
    assert image.recipe_digest(recipe) == first
    staged = image.stage_recipe(tmp_path / "staged", recipe)
    assert image.recipe_digest(staged) == first
    assert not list(staged.rglob("__pycache__"))
    assert os.access(staged / "customize.sh", os.X_OK)


def test_volume_names_carry_the_digest():
    base, kernel, initrd = image.builtin_volume_names()
    digest = image.recipe_digest()[:12]
    assert base == f"nvmprov-debian12-{digest}.qcow2"
    assert kernel == f"nvmprov-debian12-{digest}-vmlinuz"
    assert initrd == f"nvmprov-debian12-{digest}-initrd.img"


def test_host_sources_keep_enabled_debian_suite_only():
    src = image.host_sources([("debian.sources", DEBIAN_SOURCES), ("nodesource.sources", NODESOURCE)])
    assert src.one_line == ()
    assert len(src.deb822) == 2
    main, security = src.deb822
    assert "Suites: bookworm bookworm-updates" in main
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in main
    assert "snapshot" not in main  # comments dropped
    assert "Types: deb\n" in security + "\n"  # deb-src dropped
    assert "Suites: bookworm-security" in security
    assert not any("trixie" in s or "mirror.example" in s or "nodesource" in s for s in src.deb822)


def test_host_sources_one_line_format_and_ignored_files():
    listing = """\
# deb http://deb.debian.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm main
deb http://security.debian.org/debian-security bookworm-security main
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
deb http://deb.debian.org/debian bullseye main
"""
    src = image.host_sources(
        [
            ("sources.list", listing),
            ("google.list.disabled-by-farm", "deb http://x/debian bookworm main\n"),
            ("other.sources.save", DEBIAN_SOURCES),
        ]
    )
    assert src.deb822 == ()
    assert src.one_line == (
        "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://deb.debian.org/debian bookworm main",
        "deb http://security.debian.org/debian-security bookworm-security main",
    )


def test_no_sources_is_falsy():
    assert not image.host_sources([("n.sources", NODESOURCE)])
    assert image.host_sources([("d.sources", DEBIAN_SOURCES)])


def test_write_sources_files(tmp_path):
    src = image.host_sources(
        [("debian.sources", DEBIAN_SOURCES), ("sources.list", "deb http://h/debian bookworm main\n")]
    )
    args = image._write_sources(src, tmp_path)
    assert [a.rsplit("/", 1)[1] for a in args] == ["debian.sources", "debian.list"]
    assert (tmp_path / "debian.list").read_text() == "deb http://h/debian bookworm main\n"
    assert (tmp_path / "debian.sources").read_text().count("Types: deb") == 2


@pytest.mark.parametrize(
    ("used", "size"),
    [(0, 2 * GiB), (900 * MiB, 2 * GiB), (1200 * MiB, 2 * GiB), (2 * GiB, 3 * GiB), (2 * GiB + 1, 3 * GiB + 64 * MiB)],
)
def test_rootfs_size(used, size):
    got = image.rootfs_size_bytes(used)
    assert got == size
    assert got % (64 * MiB) == 0
    assert got >= used + used // 4 + 512 * MiB


def test_is_built_needs_all_three_volumes():
    conn = libvirt.open("test:///default")
    name = f"img-{uuid.uuid4().hex[:8]}"
    pool = storage.ensure_pool(conn, name, f"/nonexistent/{name}")
    try:
        assert not image.is_built(pool)
        base, kernel, initrd = image.builtin_volume_names()
        create_backing(pool, base, MiB, allocation="sparse")
        create_backing(pool, kernel, MiB, allocation="sparse")
        assert not image.is_built(pool)
        create_backing(pool, initrd, MiB, allocation="sparse")
        assert image.is_built(pool)
    finally:
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        pool.undefine()
        conn.close()


def test_remove_tree_refuses_with_mounts_inside(tmp_path, monkeypatch):
    target = tmp_path / "build"
    (target / "root" / "proc").mkdir(parents=True)
    monkeypatch.setattr(image, "_mounts_under", lambda p: [str(p / "root" / "proc")])
    with pytest.raises(image.HostError, match="still has mounts"):
        image._remove_tree(target)
    assert target.exists()


def test_mounts_under_reads_proc_mounts(tmp_path):
    assert image._mounts_under(tmp_path) == []
    under_root = image._mounts_under(image.Path("/"))
    assert "/proc" in under_root  # a real mount point below /
    assert "/" not in under_root  # the directory itself is not "under" itself


def test_failing_tool_raises_with_command_status_and_stderr_tail():
    lines = []
    script = "for i in $(seq 1 40); do echo line$i >&2; done; echo 'I: phase one' >&2; exit 3"
    with pytest.raises(image.HostError) as exc:
        image._run(["sh", "-c", script], progress=lines.append, label="tool", stream=True)
    msg = str(exc.value)
    assert "tool failed (exit 3): sh -c" in msg
    assert "line40" in msg and "I: phase one" in msg
    assert "line1\n" not in msg  # only the tail
    assert lines and lines[0].startswith("image: tool: phase one (")


def test_no_debian_sources_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(image, "_require_tools", lambda: None)
    monkeypatch.setattr(image, "_read_host_sources", lambda: [("n.sources", NODESOURCE)])
    with pytest.raises(image.HostError, match="no enabled Debian 'bookworm' entry"):
        image.build_local(tmp_path, lambda s: None)
    assert list(tmp_path.iterdir()) == []  # nothing started
