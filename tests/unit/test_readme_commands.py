"""The README's command table and cli.py's parsers cannot drift apart: every flag the table shows
exists on that subcommand, and every option of every subcommand is in the table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from nvmprov import cli

README = Path(__file__).resolve().parents[2] / "README.md"
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")
NOT_DOCUMENTED_PER_COMMAND = {"-h", "--help"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public way
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def all_commands() -> dict[str, argparse.ArgumentParser]:
    """'create' -> its parser, 'image build' -> its parser, ...; a parser with subcommands is not a command."""
    result = {}
    for name, p in _subparsers(cli.build_parser()).items():
        nested = _subparsers(p)
        result.update({f"{name} {n}": q for n, q in nested.items()} if nested else {name: p})
    return result


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings} - NOT_DOCUMENTED_PER_COMMAND  # noqa: SLF001


def table_rows() -> list[tuple[list[str], str]]:
    """(the `nvmprov ...` spans of the command cell, the description cell) of each table row."""
    text = README.read_text()
    section = text[text.index("## Commands\n"):]
    section = section[:section.index("\n\n", section.index("| command |"))]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 2 or cells[0] in ("command", "---"):
            continue
        spans = [s.replace("\\|", "|") for s in re.findall(r"`([^`]*)`", cells[0])]
        rows.append(([s for s in spans if s.startswith("nvmprov ")], cells[1]))
    return rows


def command_of(span: str, commands: dict[str, argparse.ArgumentParser]) -> str:
    words = span.split()[1:]
    for n in (2, 1):
        if " ".join(words[:n]) in commands:
            return " ".join(words[:n])
    raise AssertionError(f"README shows `{span}`, but cli.py has no such subcommand")


def flags_in(text: str) -> set[str]:
    return set(FLAG.findall(text))


ROWS = table_rows()


def test_the_table_was_found() -> None:
    assert len(ROWS) >= 15 and all(spans for spans, _ in ROWS)


@pytest.mark.parametrize(("spans", "description"), ROWS, ids=[" / ".join(s) for s, _ in ROWS])
def test_every_flag_in_the_table_exists_on_its_subcommand(spans: list[str], description: str) -> None:
    commands = all_commands()
    known: set[str] = set()
    for span in spans:
        cmd = command_of(span, commands)
        missing = flags_in(span) - options(commands[cmd])
        assert not missing, f"README shows {sorted(missing)} on `nvmprov {cmd}`; cli.py has no such option"
        known |= options(commands[cmd])
    described = {f for f in re.findall(r"`([^`]*)`", description) if f.startswith("-")}
    assert described <= known, f"the description of {spans} names {sorted(described - known)}"


def test_every_option_of_every_subcommand_is_in_the_table() -> None:
    commands = all_commands()
    shown: dict[str, set[str]] = {}
    for spans, _ in ROWS:
        for span in spans:
            shown.setdefault(command_of(span, commands), set()).update(flags_in(span))
    assert set(shown) == set(commands), f"subcommands missing from the README table: {set(commands) - set(shown)}"
    undocumented = {}
    for cmd, p in commands.items():  # an option counts as shown in either spelling (-f or --file)
        missing = [a.option_strings[-1] for a in p._actions  # noqa: SLF001
                   if set(a.option_strings) - NOT_DOCUMENTED_PER_COMMAND and not set(a.option_strings) & shown[cmd]]
        if missing:
            undocumented[cmd] = missing
    assert not undocumented, f"options cli.py has but the README table does not show: {undocumented}"


def test_the_check_has_teeth() -> None:
    commands = all_commands()
    assert flags_in("nvmprov stop NAME... [--no-such-flag] [-- CMD...]") == {"--no-such-flag"}
    assert "--no-such-flag" not in options(commands["stop"])
    assert command_of("nvmprov image import DIR", commands) == "image import"
