"""A spec file, an image and a guest's output are untrusted input (issue 12).

Each case below was reproduced on the main of 2026-12-02: a spec that printed a root-only file,
lowered the transport's trust, built a guest disk on a host file, hung on a FIFO, read /dev/zero
until the OOM killer came, crashed on a 5000-digit number, mounted over the login user's keys,
logged in as a system account, or gave a wrong fix. Guest text: tests/unit/test_guest_text.py.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nvmprov import diskimage, spec, virt
from nvmprov.errors import HostError, SpecError

T = "pmem: [{name: d, size: 64MiB}]\n"
REPO = Path(__file__).resolve().parents[2]
SECRET = "root:$6$rounds=5000$c2VjcmV0c2FsdA$notarealhashbutsecret:20228:0:99999:7:::"


def _run(*args: str, tmp_path: Path, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """nvmprov in a child with 1 GiB of address space: an unbounded read fails instead of eating the host."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "nvmprov", *args], input=stdin, capture_output=True, cwd=REPO, timeout=timeout,
        preexec_fn=limit,  # noqa: PLW1509 - a setrlimit only, before exec
        env={"PATH": "/usr/bin:/bin", "NVMPROV_STATE_DIR": str(tmp_path / "state"),
             "LIBVIRT_DEFAULT_URI": "qemu+unix:///x?socket=/nonexistent"},
    )


def _one_line_exit_2(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "shadow"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------------------------
# 1. connect: names no local file and lowers no trust


@pytest.mark.parametrize("command", [["validate"], ["render"], ["create", "--until", "define"]])
def test_a_spec_connect_cannot_print_a_file(command: list[str], tmp_path: Path) -> None:
    secret = _secret_file(tmp_path)
    path = tmp_path / "g.yaml"
    path.write_text(f"name: a\nconnect: test://{secret}\n" + T)
    err = _one_line_exit_2(_run(*command, str(path), tmp_path=tmp_path))
    assert "notarealhash" not in err and "test:///default" in err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("command", ["start", "verify", "destroy"])
def test_a_spec_connect_cannot_print_a_file_through_f(command: str, tmp_path: Path) -> None:
    secret = _secret_file(tmp_path)
    path = tmp_path / "g.yaml"
    path.write_text(f"name: a\nconnect: test://{secret}\n" + T)
    err = _one_line_exit_2(_run(command, "-f", str(path), tmp_path=tmp_path))
    assert "notarealhash" not in err


def test_libvirt_errors_never_echo_what_libvirt_quotes_from_a_file(tmp_path: Path) -> None:
    """--connect test:///FILE is the user's own choice; the message still quotes no line of FILE."""
    secret = _secret_file(tmp_path)
    with pytest.raises(HostError) as e:
        virt.connect(f"test://{secret}")
    assert "notarealhash" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("uri", [
    "qemu+ssh://h/system?no_verify=1", "qemu+ssh://h/system?known_hosts=/tmp/kh",
    "qemu+ssh://h/system?known_hosts_verify=ignore", "qemu+ssh://h/system?keyfile=/root/.ssh/id_rsa",
    "qemu+tls://h/system?pkipath=/tmp/pki", "qemu+unix:///system?socket=/tmp/evil.sock",
    "qemu+tls://h/system?tls_priority=NORMAL:+VERS-SSL3.0", "qemu+ssh://h/system?No_Verify=1",
    "qemu+ssh://h/system?%6eo_verify=1", "qemu+tcp://h/system", "test:///etc/shadow", "test:///default?x=1",
    "qemu:///etc/shadow", "qemu+ssh://h",
])
def test_a_spec_connect_lowering_trust_or_naming_a_file_is_refused(uri: str) -> None:
    with pytest.raises(SpecError) as e:
        spec.loads(f"name: a\nconnect: '{uri}'\n" + T, "g.yaml")
    assert str(e.value).startswith("g.yaml:2:10: connect: ")


def test_connect_on_the_command_line_still_takes_any_uri() -> None:
    from nvmprov.uris import effective_uri

    typed = "qemu+ssh://h/system?no_verify=1&keyfile=/k"
    assert effective_uri("qemu:///system", typed) == typed


# ---------------------------------------------------------------------------------------------
# 2. image: a regular file holding a real disk image


def _qcow2(path: Path, *, backing: str = "", backing_format: str | None = None, data_file: bool = False) -> Path:
    """A qcow2 v3 header as qemu-img writes it (backing name after the header extensions)."""
    exts = b""
    if backing_format:
        fmt = backing_format.encode()
        exts += struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt.ljust((len(fmt) + 7) // 8 * 8, b"\0")
    exts += struct.pack(">II", 0, 0)
    name = backing.encode()
    offset = 104 + len(exts) if name else 0
    header = b"QFI\xfb" + struct.pack(">IQIIQ", 3, offset, len(name), 16, 1 << 30)
    header = header.ljust(72, b"\0") + struct.pack(">QQQII", 4 if data_file else 0, 0, 0, 4, 104)
    path.write_bytes(header + exts + name + bytes(1024))
    return path


def _raw_with_mbr(path: Path) -> Path:
    path.write_bytes(bytes(510) + b"\x55\xaa" + bytes(1024))
    return path


def test_a_raw_image_linked_to_a_host_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.raw").symlink_to(_secret_file(tmp_path))
    with pytest.raises(diskimage.ImageRefused, match="not a disk image") as e:
        diskimage.vet(str(tmp_path / "x.raw"))
    assert "notarealhash" not in str(e.value) and "shadow" not in str(e.value)


def test_a_qcow2_backed_by_a_host_file_is_refused(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "x.qcow2", backing=str(_secret_file(tmp_path)), backing_format="raw")
    with pytest.raises(diskimage.ImageRefused, match="backing file .*: not a disk image"):
        diskimage.vet(str(image))


def test_a_fifo_image_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.raw")
    with pytest.raises(diskimage.ImageRefused, match="a FIFO"):
        diskimage.vet(str(tmp_path / "x.raw"))


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "/"])
def test_devices_and_directories_are_refused(target: str, tmp_path: Path) -> None:
    (tmp_path / "x.raw").symlink_to(target)
    with pytest.raises(diskimage.ImageRefused, match="not a regular file"):
        diskimage.vet(str(tmp_path / "x.raw"))


def test_a_clean_chain_is_accepted_and_links_are_resolved(tmp_path: Path) -> None:
    base = _raw_with_mbr(tmp_path / "base.raw")
    mid = _qcow2(tmp_path / "mid.qcow2", backing="base.raw", backing_format="raw")  # relative: as QEMU reads it
    top = _qcow2(tmp_path / "top.qcow2", backing=str(mid))
    (tmp_path / "link.qcow2").symlink_to(top)
    image = diskimage.vet(str(tmp_path / "link.qcow2"))
    assert (image.path, image.format, image.virtual_bytes) == (str(top), "qcow2", 1 << 30)
    assert image.chain == (str(mid), str(base))


@pytest.mark.parametrize(("offset", "magic"), [(510, b"\x55\xaa"), (512, b"EFI PART"), (1080, b"\x53\xef"),
                                               (0, b"XFSB"), (65600, b"_BHRfS_M")])
def test_raw_images_are_known_by_a_partition_table_or_filesystem(offset: int, magic: bytes, tmp_path: Path) -> None:
    data = bytearray(70000)
    data[offset:offset + len(magic)] = magic
    (tmp_path / "d.raw").write_bytes(bytes(data))
    assert diskimage.vet(str(tmp_path / "d.raw")).format == "raw"


@pytest.mark.parametrize(("backing", "fmt", "why"), [
    ("json:{\"file\":{\"filename\":\"/etc/shadow\"}}", None, "not a plain path"),
    ("nbd://evil/x", None, "not a plain path"),
    ("base.raw", "vmdk", "recorded as 'vmdk'"),
    ("base.raw", "qcow2", "recorded as qcow2 but it is not one"),  # a raw file behind a "qcow2" label
    ("mid.qcow2", "raw", "recorded as raw but it is a qcow2"),
    ("loop.qcow2", None, "loops back"),
    ("missing.qcow2", None, "No such file"),
])
def test_bad_backing_chains_are_refused(backing: str, fmt: str | None, why: str, tmp_path: Path) -> None:
    _qcow2(tmp_path / "mid.qcow2", backing=str(_raw_with_mbr(tmp_path / "base.raw")))
    image = _qcow2(tmp_path / "loop.qcow2", backing=backing, backing_format=fmt)
    with pytest.raises(diskimage.ImageRefused, match=why.replace("(", r"\(")):
        diskimage.vet(str(image))


def test_a_qcow2_with_an_external_data_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(diskimage.ImageRefused, match="external data file"):
        diskimage.vet(str(_qcow2(tmp_path / "x.qcow2", data_file=True)))


def test_a_long_chain_is_refused(tmp_path: Path) -> None:
    _raw_with_mbr(tmp_path / "c0.raw")
    prev = "c0.raw"
    for i in range(1, diskimage.MAX_CHAIN + 2):
        _qcow2(tmp_path / f"c{i}.qcow2", backing=prev)
        prev = f"c{i}.qcow2"
    with pytest.raises(diskimage.ImageRefused, match="longer than"):
        diskimage.vet(str(tmp_path / prev))


# ---------------------------------------------------------------------------------------------
# 3. the spec reader: a regular file or -, capped, never blocking


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "dir"])
def test_the_reader_refuses_fifos_devices_and_directories_at_once(target: str, tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    if target == "fifo":
        os.mkfifo(path)
    elif target == "dir":
        path.mkdir()
    else:
        path.symlink_to(target)
    err = _one_line_exit_2(_run("validate", str(path), tmp_path=tmp_path, timeout=30))
    assert err.startswith(f"{path}: is a ") and "not a regular file" in err and "or - to read" in err


def test_a_spec_on_standard_input_is_read() -> None:
    loaded = spec.load("-", stdin=io.BytesIO(("name: a\n" + T).encode()))
    assert loaded.path == "<stdin>" and loaded.guests[0].name == "a"


def test_standard_input_is_read_up_to_the_cap_and_refused(tmp_path: Path) -> None:
    err = _one_line_exit_2(_run("validate", "-", tmp_path=tmp_path, stdin=b"#" * (3 * 1024 * 1024)))
    assert err.startswith("<stdin>: is more than 1048576 bytes")


@pytest.mark.parametrize(("line", "where"), [
    ("vcpus: " + "9" * 5000, "g.yaml:2:8: vcpus: "),
    ("memory: " + "9" * 5000, "g.yaml:2:9: memory: "),
    ("timeouts: {boot_s: " + "1" * 5000 + "}", "g.yaml:2:20: timeouts.boot_s: "),
    ("version: " + "1" * 5000, "g.yaml:2:10: version: "),
    ("vcpus: 0x" + "f" * 5000, "g.yaml:2:8: vcpus: "),
    ('vcpus: "' + "9" * 5000 + '"', "g.yaml:2:8: vcpus: "),
])
def test_oversized_numbers_are_positioned_errors(line: str, where: str) -> None:
    with pytest.raises(SpecError) as e:
        spec.loads("name: a\n" + line + "\n" + T, "g.yaml")
    assert str(e.value).startswith(where) and len(str(e.value)) < 300, str(e.value)


def test_an_oversized_number_exits_2_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("name: a\nvcpus: " + "9" * 5000 + "\n" + T)
    err = _one_line_exit_2(_run("validate", str(path), tmp_path=tmp_path))
    assert err.startswith(f"{path}:2:8: vcpus: ")


def test_a_spec_error_never_carries_escape_sequences_from_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "g\x1b]0;owned\x07\x1b[2J.yaml"
    path.write_text("name: a\nvcpus: 0\n" + T)
    err = _one_line_exit_2(_run("validate", str(path), tmp_path=tmp_path))
    assert "\x1b" not in err and "\x07" not in err and "vcpus" in err


# ---------------------------------------------------------------------------------------------
# 4. mounts, users, fix hints


@pytest.mark.parametrize(("extra", "mount"), [
    ("", "/home/nvmprov"), ("", "/home/nvmprov/.ssh"), ("ssh: {user: alice}\n", "/home/alice"),
    ("", "/root"), ("", "/root/.ssh"), ("", "/root/data"),
])
def test_no_mount_over_the_login_users_home_or_root(extra: str, mount: str) -> None:
    with pytest.raises(SpecError, match="pmem\\[0\\].mount: .*; use a directory of its own"):
        spec.loads(f"name: a\n{extra}pmem: [{{name: d, size: 64MiB, mount: {mount}}}]\n", "g.yaml")


def test_other_directories_under_home_stay_allowed() -> None:
    g = spec.loads("name: a\npmem: [{name: d, size: 64MiB, mount: /home/data}]\n").guests[0]
    assert g.pmem[0].mount == "/home/data"


@pytest.mark.parametrize("user", ["daemon", "bin", "sys", "nobody", "sshd", "messagebus", "www-data", "_apt",
                                  "systemd-network", "systemd-timesync", "sudo", "polkitd", "backup"])
def test_system_accounts_are_not_login_users(user: str) -> None:
    with pytest.raises(SpecError, match=f"ssh.user: '{user}' is a system account"):
        spec.loads(f"name: a\nssh: {{user: {user}}}\n" + T, "g.yaml")


def test_ordinary_login_users_stay_allowed() -> None:
    assert spec.loads("name: a\nssh: {user: alice}\n" + T).guests[0].ssh.user == "alice"


def test_size_zero_does_not_suggest_zero() -> None:
    with pytest.raises(SpecError) as e:
        spec.loads("name: a\npmem: [{name: d, size: 0}]\n", "g.yaml")
    assert "0MiB" not in str(e.value) and "e.g. 512MiB" in str(e.value)


def test_too_many_regions_do_not_suggest_negative_slots() -> None:
    regions = ", ".join(f"{{name: r{i}, size: 16MiB, filesystem: none}}" for i in range(257))
    with pytest.raises(SpecError) as e:
        spec.loads(f"name: a\npmem: [{regions}]\n", "g.yaml")
    assert "-1" not in str(e.value) and "at most 256 regions" in str(e.value)


@pytest.mark.parametrize("key", ["memory", "disk", "pmem[0].size", "hotplug.headroom", "pmem[0].label"])
@pytest.mark.parametrize("value", ["0", "1", "5", "64", "128", "1024", "1073741824", "-5", "'128'", "'0'"])
def test_every_size_hint_is_a_value_that_is_accepted(key: str, value: str) -> None:
    """The "e.g. X" of a refused size is itself accepted in that place."""
    def text(v: str) -> str:
        fields = {"memory": "1GiB", "disk": "8GiB", "size": "2GiB", "headroom": "8GiB", "label": "128KiB"}
        fields[key.split(".")[-1].replace("pmem[0]", "") or key] = v
        region = f"{{name: d, size: {fields['size']}, label: {fields['label']}}}"
        return (f"name: a\nmemory: {fields['memory']}\ndisk: {fields['disk']}\n"
                f"hotplug: {{headroom: {fields['headroom']}}}\npmem: [{region}]\n")

    try:
        spec.loads(text(value), "g.yaml")
    except SpecError as e:
        message = str(e)
        if "e.g. " not in message:
            return
        hint = message.rsplit("e.g. ", 1)[1].split()[0].rstrip(",;")
        spec.loads(text(hint), "g.yaml")  # raises if the hint was wrong


# ---------------------------------------------------------------------------------------------
# recorded specs of existing guests: a new rule warns, never refuses


def test_a_recorded_spec_breaking_new_rules_still_loads_with_warnings() -> None:
    data = spec.loads("name: a\n" + T).guests[0].canonical()
    data["ssh"]["user"] = "daemon"
    data["connect"] = "qemu+ssh://h/system?no_verify=1"
    data["pmem"][0]["mount"] = "/root/data"
    g, warnings = spec.load_recorded(data)
    assert (g.ssh.user, g.connect, g.pmem[0].mount) == ("daemon", "qemu+ssh://h/system?no_verify=1", "/root/data")
    assert [w.split(":")[0] for w in warnings] == [
        repr(spec.RULE_CONNECT), repr(spec.RULE_USER), repr(spec.RULE_MOUNT)]


def test_a_damaged_recorded_spec_is_a_host_error_not_a_traceback() -> None:
    data = spec.loads("name: a\n" + T).guests[0].canonical()
    data["vcpus"] = 0
    with pytest.raises(HostError, match="vcpus: 0 is too small"):
        spec.load_recorded(data)


def test_a_backing_name_is_shown_without_its_escape_sequences(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "x.qcow2", backing="\x1b]0;pwned\x07\x1b[2Jmissing.qcow2")
    with pytest.raises(diskimage.ImageRefused) as e:
        diskimage.vet(str(image))
    assert "\x1b" not in str(e.value) and "\x07" not in str(e.value) and "missing.qcow2" in str(e.value)


def test_a_fleet_with_one_bad_image_makes_nothing(tmp_path: Path) -> None:
    """Every image of a fleet is vetted before the first guest is made (libvirt is never contacted:
    its URI here names a socket that does not exist, which would be exit 3)."""
    os.mkfifo(tmp_path / "x.raw")
    path = tmp_path / "fleet.yaml"
    path.write_text("defaults: {pmem: [{name: d, size: 64MiB}]}\n"
                    f"guests:\n  - {{name: good}}\n  - {{name: bad, image: {tmp_path}/x.raw}}\n")
    err = _one_line_exit_2(_run("create", str(path), "--until", "define", tmp_path=tmp_path, timeout=30))
    assert err.startswith(f"{path}: guest bad: image {tmp_path}/x.raw: a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("key", ["vcpus", "hotplug.slots", "timeouts.boot_s", "timeouts.ssh_s"])
@pytest.mark.parametrize("value", ['"0"', '"2"', '"100"', '"300"', "2.0", "0.0", "1.5", "1e9", '"x"', "true"])
def test_every_whole_number_hint_is_a_value_that_is_accepted(key: str, value: str) -> None:
    """"write N" only names an N that is allowed there, else the range ('"0"' once said "write 0")."""
    def text(v: str) -> str:
        outer, _, inner = key.partition(".")
        return f"name: a\n{outer}: {{{inner}: {v}}}\n{T}" if inner else f"name: a\n{key}: {v}\n{T}"

    with pytest.raises(SpecError) as e:
        spec.loads(text(value), "g.yaml")
    fix = str(e.value).rsplit("; ", 1)[1]
    if fix.startswith("write a whole number from "):
        lo, hi = fix.split("from ")[1].split(" without")[0].split(" to ")
        spec.loads(text(lo), "g.yaml")
        spec.loads(text(hi), "g.yaml")
    else:
        spec.loads(text(fix.split()[1]), "g.yaml")  # "write N [without quotes]"


@pytest.mark.parametrize(("size", "label"), [("16MiB", "32MiB"), ("16MiB", "128KiB"), ("20MiB", "8MiB"),
                                             ("512MiB", "512MiB")])
def test_label_hints_are_values_that_are_accepted(size: str, label: str) -> None:
    """A label of 128KiB on a 16MiB region once got "use a smaller label" (there is none)."""
    with pytest.raises(SpecError) as e:
        spec.loads(f"name: a\npmem: [{{name: d, size: {size}, label: {label}}}]\n", "g.yaml")
    fix = str(e.value).rsplit("; ", 1)[1].split(": ")[-1]
    new_size = fix.split("size >= ")[1].split()[0] if "size >= " in fix else size
    new_label = "128KiB" if "128KiB" in fix else label
    spec.loads(f"name: a\npmem: [{{name: d, size: {new_size}, label: {new_label}}}]\n", "g.yaml")
