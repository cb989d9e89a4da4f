"""Guest text is untrusted (issue 12, item 5): console lines, command output and stderr tails
reach messages, the terminal, the JSON report and JUnit without escape sequences or controls."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nvmprov import boot
from nvmprov.agent import RegionReport
from nvmprov.errors import GuestError, RemoteCommandError
from nvmprov.report import GuestReport, Report, render_json, render_junit, render_text
from nvmprov.textsafe import clean, clean_tree

# What a hostile guest prints: a window title (OSC 0), a clipboard write (OSC 52), a hyperlink,
# colours, a screen clear, a cursor move, 8-bit CSI, BEL, backspaces, NUL, a lone CR that
# overwrites the line, DEL, a bidi override, a lone surrogate (from JSON "\ud800"), U+FFFF.
HOSTILE = (
    "\x1b]0;pwned title\x07\x1b]52;c;cm0gLXJmIH4=\x07\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\"
    "\x1b[31mred\x1b[0m\x1b[2J\x1b[H\x9b31m\x07\x08\x08\x00fake ok\rOK\x7f \u202eevil\ud800\uffff\x1bc"
)
PLAIN = "linkredfake okOK evil"


def _unsafe(text: str) -> list[str]:
    return [c for c in text if (not c.isprintable() and c not in "\n\t")]


def test_clean_drops_sequences_whole_and_keeps_the_words() -> None:
    assert clean(HOSTILE) == PLAIN
    assert clean("line 1\n\tline 2\r\n") == "line 1\n\tline 2\n"
    assert clean("plain ASCII, ünïcödé and € stay") == "plain ASCII, ünïcödé and € stay"


def test_clean_tree_reaches_keys_and_nested_values() -> None:
    assert clean_tree({"a\x1b[1m": ["x\x07", {"y": "\x1b]0;t\x07z"}], "n": 3}) == {"a": ["x", {"y": "z"}], "n": 3}


def test_remote_command_error_carries_no_escape_sequences() -> None:
    err = RemoteCommandError("mkfs.ext4 /dev/pmem0", 1, f"first\n{HOSTILE}\n")
    assert _unsafe(str(err)) == []
    assert "fake ok" in str(err)


def test_console_tail_is_cleaned(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"[  OK  ] booting\r\n" + HOSTILE.encode("utf-8", "surrogatepass") + b"\r\nKernel panic\r\n")
    tail = boot.read_tail(str(log))
    assert _unsafe(tail) == [] and "Kernel panic" in tail and "booting" in tail
    with pytest.raises(GuestError) as e:
        boot.check_boot_text("g1", boot.read_tail(str(log), max_lines=200), active=True)
    assert _unsafe(str(e.value)) == []


def test_console_copy_is_cleaned_and_private(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"\x1b[32mup\x1b[0m\r\n\x1b]0;t\x07")
    dest = tmp_path / "console.log"
    boot.copy_log(str(log), dest)
    assert dest.read_text() == "up\n"
    assert dest.stat().st_mode & 0o777 == 0o600


def _hostile_report() -> Report:
    region = RegionReport(
        name="data", model="nvdimm", size_bytes=1 << 30, usable_bytes=None, backing_path=None,
        guest_device="/dev/pmem0" + HOSTILE, namespace_mode="fsdax", filesystem="ext4",
        mountpoint="/mnt/data\x1b[8m", dax=True, xip_ok=True, data_ok=True, persisted=False,
        persisted_reason="region data: not persisted: " + HOSTILE,
    )
    g = GuestReport(name="demo", regions=[region])
    g.fail("agent", "guest command failed (exit 1): x: " + HOSTILE)
    return Report(guests=[g])


def test_junit_is_valid_xml_whatever_the_guest_prints() -> None:
    xml = render_junit(_hostile_report())
    root = ET.fromstring(xml)  # noqa: S314 - our own output; expat refuses the C0 controls XML 1.0 forbids
    failure = root.find("./testsuite/testcase/failure")
    assert failure is not None and "fake ok" in failure.get("message", "")
    assert _unsafe(xml) == []


def test_text_and_json_reports_carry_no_escape_sequences() -> None:
    report = _hostile_report()
    text = render_text(report)
    assert _unsafe(text) == [] and "fake ok" in text
    data = json.loads(render_json(report))
    assert _unsafe(json.dumps(data, ensure_ascii=False)) == []
    assert data["guests"][0]["error"]["message"].endswith(PLAIN)
