"""The CI examples (examples/ci/github-actions.yml, examples/ci/gitlab-ci.yml) run as written: every
nvmprov command in their shell steps parses with the CLI's own argparse (the files it names for
writing included: checked in a directory where the job's `mkdir -p artifacts` ran), every pytest
`--nvmprov-*` option is one the plugin adds, the spec they name loads, and each file does the
whole job: create, test through the plugin, keep the JUnit and JSON reports, destroy."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from nvmprov import api, cli, pytest_plugin

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "examples" / "ci"
GITHUB = CI / "github-actions.yml"
GITLAB = CI / "gitlab-ci.yml"
SEPARATORS = {";", "&&", "||", "|", "&"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>"}


def github_scripts(path: Path) -> list[str]:
    workflow = yaml.safe_load(path.read_text())
    return [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]


def gitlab_scripts(path: Path) -> list[str]:
    config = yaml.safe_load(path.read_text())
    jobs = [job for name, job in config.items() if isinstance(job, dict) and not name.startswith(".")
            and "script" in job]
    return [line for job in jobs for key in ("before_script", "script", "after_script") for line in job.get(key, [])]


def commands(script: str) -> list[list[str]]:
    """Each simple command of a shell script, as words, redirections dropped."""
    result: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        words: list[str] = []
        skip = False
        for token in lexer:
            if token in SEPARATORS:
                if words:
                    result.append(words)
                words, skip = [], False
            elif token in REDIRECTIONS:
                skip = True  # the target, and in these files nothing else follows it
            elif not skip:
                words.append(token)
        if words:
            result.append(words)
    return result


def nvmprov_argvs(scripts: list[str]) -> list[list[str]]:
    return [words[1:] for s in scripts for words in commands(s) if Path(words[0]).name == "nvmprov"]


def pytest_argvs(scripts: list[str]) -> list[list[str]]:
    found = []
    for s in scripts:
        for words in commands(s):
            if words[1:3] == ["-m", "pytest"] and Path(words[0]).name.startswith("python"):
                found.append(words[3:])
            elif Path(words[0]).name == "pytest":
                found.append(words[1:])
    return found


def plugin_options() -> set[str]:
    class Recorder:
        names: set[str] = set()

        def getgroup(self, *_a: object, **_k: object) -> Recorder:
            return self

        def addoption(self, *names: str, **_k: object) -> None:
            self.names.update(names)

    recorder = Recorder()
    pytest_plugin.pytest_addoption(recorder)  # type: ignore[arg-type]
    return recorder.names


def check_nvmprov(argv: list[str]) -> None:
    """argparse exits (status 2, a one-line message) on anything the CLI does not take."""
    cli.build_parser().parse_args(argv)


CASES = [(GITHUB, github_scripts), (GITLAB, gitlab_scripts)]


@pytest.fixture
def job_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A job's working directory after `mkdir -p artifacts` (the CLI checks --junit/--log-file at parse time)."""
    (tmp_path / "artifacts").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("path", "scripts_of"), CASES, ids=["github", "gitlab"])
def test_every_nvmprov_command_parses(path, scripts_of, job_dir) -> None:
    argvs = nvmprov_argvs(scripts_of(path))
    assert {a[0] for a in argvs} >= {"image", "doctor", "create", "destroy"}, argvs
    for argv in argvs:
        try:
            check_nvmprov(argv)
        except SystemExit as exc:
            pytest.fail(f"{path.name}: `nvmprov {shlex.join(argv)}` is not valid for the CLI (exit {exc.code})")


@pytest.mark.parametrize(("path", "scripts_of"), CASES, ids=["github", "gitlab"])
def test_the_job_creates_tests_keeps_reports_and_destroys(path, scripts_of) -> None:
    scripts = scripts_of(path)
    argvs = nvmprov_argvs(scripts)
    create = next(a for a in argvs if a[0] == "create")
    assert "--json" in create and "--junit" in create
    assert any(">" in s and "create" in s and ".json" in s for s in scripts), "the JSON report goes to a file"
    destroy = next(a for a in argvs if a[0] == "destroy")
    assert "--purge" in destroy and "--yes" in destroy
    (suite,) = pytest_argvs(scripts)
    used = {w.split("=")[0] for w in suite if w.startswith("--nvmprov-")}
    assert used and used <= plugin_options(), used - plugin_options()
    assert "--junitxml" in suite
    spec = suite[suite.index("--nvmprov-spec") + 1]
    assert spec == create[1]  # the suite's guest is the one the job created
    assert api.load_spec(ROOT / spec).name == api.load_spec(ROOT / destroy[destroy.index("-f") + 1]).name
    assert (ROOT / suite[0]).is_dir()  # the test suite it runs


def test_the_artefacts_are_kept_even_when_a_step_failed() -> None:
    github = yaml.safe_load(GITHUB.read_text())
    steps = [s for job in github["jobs"].values() for s in job["steps"]]
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    destroy = next(s for s in steps if "destroy" in s.get("run", ""))
    assert upload["if"] == "always()" and destroy["if"] == "always()"
    assert steps.index(upload) < steps.index(destroy)
    job = yaml.safe_load(GITLAB.read_text())["pmem-tests"]
    assert job["artifacts"]["when"] == "always" and "artifacts/" in job["artifacts"]["paths"]
    assert any("destroy" in line for line in job["after_script"])


def test_the_check_has_teeth(job_dir) -> None:
    assert commands("mkdir -p a && .venv/bin/nvmprov create x.yaml --json > a/r.json; echo ok") == [
        ["mkdir", "-p", "a"], [".venv/bin/nvmprov", "create", "x.yaml", "--json"], ["echo", "ok"]]
    assert nvmprov_argvs(["nvmprov destroy -f x.yaml \\\n  --purge --yes"]) == [["destroy", "-f", "x.yaml", "--purge",
                                                                                  "--yes"]]
    for bad in (["create", "x.yaml", "--no-such-flag"], ["create"], ["create", "x.yaml", "--junit", "no/dir/x.xml"]):
        with pytest.raises(SystemExit):
            check_nvmprov(bad)
    assert "--nvmprov-spec" in plugin_options() and "--nvmprov-nope" not in plugin_options()
