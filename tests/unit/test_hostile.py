"""Hostile guest files: what tests/unit/test_spec_errors.py does not already cover.

That table holds `../x`, NUL, quotes, `<>&`, 300-character and look-alike names, Python tags,
billion laughs, duplicate keys and huge sizes in the guest name and sizes. Here: the same attacks
on every other field that reaches a path, a URI, XML or a command, the parser's own limits, and
the CLI's answer to them (exit 2, one line, no traceback). "Beyond free space" is a create-time
check against the real pool: tests/e2e/test_faults.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nvmprov import spec
from nvmprov.cli import exit_status
from nvmprov.errors import SpecError

T = "pmem: [{name: d, size: 64MiB}]\n"
REPO = Path(__file__).resolve().parents[2]

HOSTILE = [
    pytest.param("name: a\npool: ../x\n" + T, "g.yaml:2:7: pool: name '../x' is not valid", id="pool-dotdot"),
    pytest.param("name: a\npool: a/b\n" + T, "g.yaml:2:7: pool: name 'a/b' is not valid", id="pool-slash"),
    pytest.param('name: a\npool: "a\\0b"\n' + T, "g.yaml:2:7: pool: name 'a\\x00b' is not valid", id="pool-nul"),
    pytest.param("name: a\nimage: /var/../etc/x.qcow2\n" + T, "image: '/var/../etc/x.qcow2' is not normalized",
                 id="image-dotdot"),
    pytest.param("name: a\nimage: \"/x/a'b.qcow2\"\n" + T, "image: \"/x/a'b.qcow2\" contains \"'\"", id="image-quote"),
    pytest.param('name: a\nimage: "/x/a\\0.qcow2"\n' + T, "contains '\\x00' (U+0000)", id="image-nul"),
    pytest.param('name: a\nimage: "/x/<a>&.qcow2"\n' + T, "image: '/x/<a>&.qcow2' contains '<'", id="image-xml"),
    pytest.param('name: a\nimage: "/x/$(reboot).qcow2"\n' + T, "contains '$'", id="image-subst"),
    pytest.param('name: a\nconnect: "qemu:///system\\n"\n' + T, "connect: 'qemu:///system\\n' is not valid",
                 id="uri-newline"),
    pytest.param('name: a\nconnect: "qemu:///sys\\0tem"\n' + T, "is not valid; use a libvirt URI", id="uri-nul"),
    pytest.param("name: a\nssh: {user: \"a'b\"}\n" + T, "ssh.user: \"a'b\" is not valid", id="user-quote"),
    pytest.param('name: a\nssh: {user: "$(id)"}\n' + T, "ssh.user: '$(id)' is not valid", id="user-subst"),
    pytest.param('name: a\nssh: {user: "a;b"}\n' + T, "ssh.user: 'a;b' is not valid", id="user-semicolon"),
    pytest.param('name: a\nnetwork: {mode: network, name: "../x"}\n' + T, "network.name: '../x' is not valid",
                 id="network-dotdot"),
    pytest.param("name: a\npmem: [{name: ../x, size: 64MiB}]\n", "pmem[0].name: '../x' contains '.'",
                 id="region-dotdot"),
    pytest.param("name: a\npmem: [{name: '<x>', size: 64MiB}]\n", "pmem[0].name: '<x>' contains '<'",
                 id="region-xml"),
    pytest.param("name: a\npmem: [{name: " + "r" * 300 + ", size: 64MiB}]\n",
                 "pmem[0].name: is 300 characters long; use at most 32", id="region-long"),
    pytest.param('name: a\npmem: [{name: d, size: 64MiB, mount: "/mnt/x\\n/etc"}]\n', "contains '\\n' (U+000A)",
                 id="mount-newline"),
    pytest.param('name: a\npmem: [{name: d, size: 64MiB, mount: "/mnt/x;reboot"}]\n', "contains ';'",
                 id="mount-semicolon"),
    pytest.param("name: a\npmem: [{name: d, size: 64MiB, mount: /mnt/d\u0430ta}]\n", "'\u0430' (U+0430)",
                 id="mount-lookalike"),
    pytest.param("name: a\u202eb\n" + T, "contains '\\u202e' (U+202E)", id="name-bidi"),
    pytest.param("name: a\u200bb\n" + T, "contains '\\u200b' (U+200B)", id="name-zero-width"),
    pytest.param("name: \uff41\n" + T, "(U+FF41)", id="name-fullwidth"),
    pytest.param("name: a\nmemory: 100TiB\n" + T, "memory: '100TiB' is larger than 16TiB", id="memory-huge"),
    pytest.param("name: a\ndisk: 17TiB\n" + T, "disk: '17TiB' is larger than 16TiB", id="disk-huge"),
    pytest.param("name: a\npmem: [{name: d, size: 1e9GiB}]\n", "'1e9GiB' is not a size", id="size-exponent"),
    pytest.param("name: a\npmem: [{name: d, size: " + "9" * 5000 + "GiB}]\n",
                 "pmem[0].size: '999999999999'... (5000 digits) is larger than 16TiB; check the unit",
                 id="size-5000-digits"),
    pytest.param("name: a\nhotplug: {headroom: 99999999999TiB}\n" + T, "is larger than 16TiB", id="headroom-huge"),
    pytest.param("name: !foo a\n" + T, "YAML tag !foo is not allowed", id="tag-local"),
    pytest.param("name: !!binary YWJj\n" + T, "YAML tag tag:yaml.org,2002:binary is not allowed", id="tag-binary"),
    pytest.param("name: a\npmem: !!python/object/new:list [[]]\n",
                 "YAML tag tag:yaml.org,2002:python/object/new:list is not allowed", id="tag-python-new"),
    pytest.param("defaults: &d {memory: 1GiB}\nguests: [{name: a, pmem: [{name: d, size: 64MiB}]}]\n",
                 "YAML anchors (&d) are not allowed", id="fleet-anchor"),
    pytest.param("name: a\nx: " + "[" * 5000 + "]" * 5000 + "\n" + T, "YAML nested more than 32 levels deep",
                 id="deep-sequences"),
    pytest.param("name: a\nx: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n" + T, "YAML nested more than 32 levels deep",
                 id="deep-mappings"),
    pytest.param("name: a\nx: [" + ",".join(["1"] * 30000) + "]\n" + T, "more than 20000 YAML values",
                 id="many-values"),
    pytest.param("guests:\n" + "".join(f"  - {{name: g{i}, pmem: [{{name: d, size: 64MiB}}]}}\n" for i in range(3))
                 + "  - {name: g1, pmem: [{name: d, size: 64MiB}]}\n", "guest name 'g1' is used twice",
                 id="fleet-duplicate-name"),
]


@pytest.mark.parametrize(("text", "expected"), HOSTILE)
def test_hostile_input_is_one_positioned_spec_error(text: str, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        spec.loads(text, "g.yaml")
    message = str(info.value)
    assert message.startswith("g.yaml:"), message
    assert expected in message, message
    assert exit_status(info.value) == 2
    assert "\n" not in message, "one line: a hostile value must not break the message into lines"
    assert len(message) < 400, "a hostile value must not be echoed at length"


def test_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: a\n" + T + "#" * (2 * 1024 * 1024) + "\n")
    with pytest.raises(SpecError, match="bytes; a guest file is at most 1048576"):
        spec.load(path)


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"name: a\n\xff\xfe\x00\x01")
    with pytest.raises(SpecError, match="is not UTF-8 text"):
        spec.load(path)


def test_leading_zeros_are_still_a_size() -> None:
    # the digit limit counts significant digits: zero padding is odd but harmless
    g = spec.loads("name: a\npmem: [{name: d, size: " + "0" * 50 + "64MiB}]\n").guests[0]
    assert g.pmem[0].size_bytes == 64 * 1024**2


@pytest.mark.parametrize("text", [
    "name: a\nx: " + "[" * 5000 + "]" * 5000 + "\n" + T,
    "name: !!python/object/apply:os.system ['touch /tmp/nvmprov-pwned']\n" + T,
    "name: ../../etc\n" + T,
    "name: a\nconnect: 'qemu+ext:///system?command=/usr/bin/touch'\n" + T,  # libvirt.open would run it
], ids=["deep", "python-tag", "dotdot", "uri-command"])
@pytest.mark.parametrize("command", ["validate", "render", "create"])
def test_cli_answers_hostile_files_with_exit_2_and_one_line(text: str, command: str, tmp_path: Path) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "nvmprov", command, str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env={"PATH": "/usr/bin:/bin", "NVMPROV_STATE_DIR": str(tmp_path / "s"),
                                                      "LIBVIRT_DEFAULT_URI": "qemu+unix:///x?socket=/nonexistent"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(str(path)), proc.stderr
    assert not Path("/tmp/nvmprov-pwned").exists()
    assert not (tmp_path / "s").exists(), "a refused file must not create state"
