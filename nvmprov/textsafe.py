"""Text that came from a guest, made safe to show and to store.

A guest is untrusted: whatever it prints on its serial console, in the output of a command or in
the JSON of nvmprov's own guest programs reaches error messages, the terminal, the JSON report and
the JUnit file. `clean` keeps the words and drops what could act on a terminal or break a file:

- escape sequences (CSI `ESC [ ... m`, OSC `ESC ] ... BEL` such as a window title, DCS/APC/PM/SOS,
  two-character `ESC X`, and their 8-bit C1 forms) are removed whole, not just their ESC;
- `\\r\\n` becomes `\\n`; every other C0 control but tab and newline, DEL, the C1 controls, the
  bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069), lone surrogates and the
  non-characters U+FFFE/U+FFFF are deleted.

What is left is valid XML 1.0 character data and prints as itself. Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Any

_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"            # CSI: colours, cursor moves, screen clears
    r"|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?"   # OSC: window title, hyperlinks, clipboard (OSC 52)
    r"|\x1b[PX^_][^\x1b\n]*(?:\x1b\\)?"   # DCS, SOS, PM, APC (to their string terminator)
    r"|\x1b[ -/]*[0-~]?"                  # any other ESC sequence (or a lone ESC)
    r"|\x9b[0-?]*[ -/]*[@-~]"             # 8-bit CSI
    r"|\x9d[^\x07\x9c\n]*(?:\x07|\x9c)?"  # 8-bit OSC
)
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff\ufffe\uffff]")


def clean(text: str) -> str:
    """TEXT without escape sequences and control characters; newlines and tabs stay."""
    if text.isprintable():  # the common case: nothing to do (newlines and tabs are not printable)
        return text
    return _UNSAFE.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n")))


def clean_bytes(data: bytes) -> str:
    """Guest output as text: UTF-8 (undecodable bytes as U+FFFD), then clean."""
    return clean(data.decode("utf-8", "replace"))


def clean_tree(value: Any) -> Any:
    """clean() applied to every string in a JSON-like value (dict keys included)."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean_tree(k): clean_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_tree(v) for v in value]
    return value
