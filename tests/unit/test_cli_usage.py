"""Bad command lines get usage errors: exit 2, one line naming the problem, never a traceback.

In-process through cli.main (fast, every subcommand), plus a few through a real child process to
prove the line a user sees. None of these reach libvirt: argparse or the name check stops them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nvmprov import cli

REPO = Path(__file__).resolve().parents[2]


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001 - argparse has no public way
    return sorted(sub.choices)  # type: ignore[arg-type]


def test_every_subcommand_is_covered_below() -> None:
    # Every subcommand gets the generic unknown-option case (GENERIC) automatically; the table of
    # specific cases must not name a subcommand that no longer exists.
    assert set(_subcommands()) == set(cli.COMMANDS)
    assert {name for name, _ in BAD_BY_COMMAND} <= set(_subcommands())
    assert {p.values[0][0] for p in GENERIC} == set(_subcommands())


BAD_BY_COMMAND = [
    ("validate", [[], ["a.yaml", "b.yaml"], ["--bogus", "a.yaml"]]),
    ("render", [[], ["a.yaml", "--guest"], ["a.yaml", "--bogus"], ["a.yaml", "--uuid", "x"], ["a.yaml", "--uuid"]]),
    ("create", [[], ["a.yaml", "--until", "boot"], ["a.yaml", "--until"], ["a.yaml", "--bogus"],
                ["a.yaml", "--log-file"],
                # files written later are checked before anything is made (no FileNotFoundError
                # traceback, no JUnit failure after the guest was built)
                ["a.yaml", "--log-file", "/no/such/dir/x"], ["a.yaml", "--log-file", "/"],
                ["a.yaml", "--junit", "/no/such/dir/x"], ["a.yaml", "--junit", "/"], ["a.yaml", "--junit", ""],
                ["a.yaml", "--parallel", "0"], ["a.yaml", "--parallel", "-1"], ["a.yaml", "--parallel", "two"],
                ["a.yaml", "--parallel", "1.5"]]),
    ("verify", [["--bogus"], ["x", "--power-cycle=yes"], ["-f"], ["x", "--junit", "/no/such/dir/x"],
                ["x", "--parallel", "0"]]),
    ("start", [["--bogus"], ["-f"]]),
    ("stop", [["x", "--timeout-s", "soon"], ["x", "--timeout-s"], ["--force=1", "x"],
              ["x", "--timeout-s", "nan"], ["x", "--timeout-s", "-5"], ["x", "--timeout-s", "0"],
              ["x", "--timeout-s", "inf"], ["x", "--timeout-s", "1e999"]]),
    ("attach", [["d", "--size", "1GiB", "--junit", "/no/such/dir/x"]]),
    ("destroy", [["x", "--purge=yes"], ["--bogus", "x"]]),
    ("list", [["--format", "yaml"], ["extra"]]),
    ("ssh", [[]]),
    ("console", [[], ["a", "b"]]),
    ("image", [[], ["bake"], ["build", "--bogus"]]),
]
CASES = [pytest.param([cmd, *args], id=f"{cmd}:{' '.join(args) or '(none)'}")
         for cmd, bad in BAD_BY_COMMAND for args in bad]
GENERIC = [pytest.param([cmd, "--no-such-option"], id=f"{cmd}:--no-such-option") for cmd in _subcommands()]
TOP = [pytest.param(a, id=" ".join(a) or "(none)") for a in ([], ["bogus"], ["--bogus"], ["--debug"])]


@pytest.mark.parametrize("argv", CASES + GENERIC + TOP)
def test_bad_arguments_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("nvmprov") and "error:" in err, err
    assert "see `nvmprov" in err and "--help`" in err, err


@pytest.mark.parametrize("argv", [
    ["start"], ["stop"], ["destroy"], ["verify"],  # no guest named
    ["start", "../x"], ["stop", "a/b"], ["destroy", "x/../../etc", "--purge", "--yes"], ["verify", ".x"],
    ["ssh", "../x"], ["console", "A"], ["ssh", "x" * 64],
    ["destroy", "demo", "--purge"],  # no TTY and no --yes: refuse before connecting
    ["create", "/nonexistent/guest.yaml"], ["validate", "/nonexistent/guest.yaml"],
    ["render", "/nonexistent/guest.yaml"],
], ids=lambda a: " ".join(a))
def test_bad_values_exit_2_before_touching_anything(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+unix:///system?socket=/nonexistent")  # must not be reached
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))  # noqa: SIM115 - closed by pytest's monkeypatch undo
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "state" / "guests").exists()


@pytest.mark.parametrize("argv", [["create", "--until", "soon", "x.yaml"], ["stop", "../x"], []],
                         ids=["choice", "name", "none"])
def test_a_real_process_prints_one_line_and_exits_2(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "nvmprov", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_writable_file_check_accepts_a_new_file_and_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "report.xml"
    args = cli.build_parser().parse_args(["create", "a.yaml", "--junit", str(target), "--log-file", str(target)])
    assert args.junit == str(target) and args.log_file == str(target)
    assert not target.exists()


@pytest.mark.parametrize("text", ["120", "0.5", "1e3"])
def test_stop_timeout_takes_positive_finite_seconds(text: str) -> None:
    assert cli.build_parser().parse_args(["stop", "x", "--timeout-s", text]).timeout_s == float(text)


class _Terminal:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_the_one_confirmation_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """destroy --purge, detach --purge and prune ask through cli.confirm: only y/yes is yes, and
    without a terminal it refuses (exit 2, the --yes hint) instead of waiting for an answer."""
    from nvmprov.errors import UsageError

    asked: list[str] = []
    for answer, said_yes in (("y", True), (" YES\n", True), ("", False), ("n", False), ("yes please", False)):
        monkeypatch.setattr("builtins.input", lambda q, a=answer: asked.append(q) or a)
        monkeypatch.setattr(sys, "stdin", _Terminal(True))
        assert cli.confirm("delete x?", "add --yes") is said_yes
    assert asked[0] == "delete x? [y/N] "
    monkeypatch.setattr(sys, "stdin", _Terminal(False))
    with pytest.raises(UsageError, match="add --yes"):
        cli.confirm("delete x?", "add --yes")
    assert len(asked) == 5


def test_the_prompts_of_destroy_detach_and_prune_all_go_through_confirm() -> None:
    source = Path(cli.__file__).read_text()
    assert source.count("input(") == 1 and source.count("confirm(") == 4   # the definition and three callers
