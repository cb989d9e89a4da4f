"""The pytest plugin (nvmprov.pytest_plugin), tested with pytester: inner pytest sessions whose
conftest.py swaps nvmprov.api for tests/unit/plugin_fake.py (no libvirt, no guest), so what is
checked is the plugin's own part: which guests it creates, re-verifies and destroys, how a failing
guest fails the tests, the options, and the strategy for pytest-xdist workers (real workers).

The pytest11 entry point registers the plugin only where nvmprov is installed with this
pyproject, so the inner sessions load it with `-p nvmprov.pytest_plugin` (one and the same
plugin name as the entry point: never registered twice)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from nvmprov import spec  # noqa: F401 - imported once here, not again by every inner session

from . import plugin_fake

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "nvmprov.pytest_plugin"
SPEC = """\
version: 1
name: pt-guest
pmem:
  - name: data
    size: 512MiB
    mount: /mnt/data
"""
CONFTEST = """
from tests.unit import plugin_fake

def pytest_configure(config):
    plugin_fake.install()

def pytest_unconfigure(config):
    plugin_fake.uninstall()
"""
FACTORY = """
from nvmprov.pytest_plugin import nvmprov_guest

pmem = nvmprov_guest("{spec}", scope="{scope}"{extra})
"""


@pytest.fixture
def fake(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The fake's state directory; the inner sessions import tests.unit.plugin_fake (and this checkout's
    nvmprov, also in xdist's worker processes) through PYTHONPATH."""
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    monkeypatch.setenv("NVMPROV_FAKE_DIR", str(fake_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    (pytester.path / "guest.yaml").write_text(SPEC)
    pytester.makeconftest(CONFTEST)
    return fake_dir


def configure(fake: Path, **conf: object) -> None:
    (fake / "conf.json").write_text(json.dumps(conf))


def factory(pytester: pytest.Pytester, scope: str = "session", extra: str = "") -> None:
    text = CONFTEST + FACTORY.format(spec=pytester.path / "guest.yaml", scope=scope, extra=extra)
    pytester.makeconftest(text)


def of(fake: Path, call: str) -> list[dict]:
    return [c for c in plugin_fake.calls(fake) if c["call"] == call]


# ---------------------------------------------------------------------------------------------
# packaging and cost


def test_the_entry_point_names_the_plugin_module() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["pytest11"] == {PLUGIN: PLUGIN}
    import importlib

    module = importlib.import_module(PLUGIN)
    assert callable(module.pytest_addoption) and callable(module.nvmprov_guest)


def test_loading_the_plugin_imports_neither_libvirt_nor_paramiko(pytester: pytest.Pytester,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_cost="""
        import sys

        def test_nothing_heavy_loaded(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("nvmprov.pytest_plugin")
            heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("libvirt", "libvirtmod", "paramiko"))
            assert heavy == []
    """)
    result = pytester.runpytest_subprocess("-p", PLUGIN)
    result.assert_outcomes(passed=1)


def test_the_options_are_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("-p", PLUGIN, "--help")
    for option in ("--nvmprov-spec=FILE", "--nvmprov-connect=URI", "--nvmprov-keep"):
        assert option in result.stdout.str()


def test_with_v_the_phases_reach_the_terminal_past_the_capture(pytester, fake) -> None:
    factory(pytester)
    pytester.makepyfile(test_one="def test_it(pmem):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", PLUGIN, "-v")  # a real process: fd capture as in CI
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["nvmprov pt-guest: creating it*", "nvmprov pt-guest: host done in*"])


# ---------------------------------------------------------------------------------------------
# create, re-verify, destroy


def test_a_fixture_creates_its_guest_once_and_destroys_it_with_purge(pytester, fake) -> None:
    factory(pytester, extra=", power_cycle=False")
    pytester.makepyfile(test_one="""
        def test_report(pmem):
            assert pmem.name == "pt-guest" and pmem.created
            assert pmem.regions["data"].dax is True and pmem.regions["data"].mountpoint == "/mnt/data"
            assert pmem.ssh.port == 40022 and pmem.report.ok

        def test_run_quotes_each_argument(pmem):
            r = pmem.run("ls -l %s", "/mnt/data/a file; rm -rf /")
            assert r.rc == 0 and r.stdout == "ran: ls -l '/mnt/data/a file; rm -rf /'\\n" and r.stderr == ""
            assert pmem.sudo("findmnt -no OPTIONS %s", "/mnt/data").rc == 0
            assert pmem.run("false").rc == 1  # run does not raise
            assert pmem.check_output("echo %s", "x y") == "ran: echo 'x y'"
    """)
    result = pytester.runpytest_inprocess("-p", PLUGIN)
    result.assert_outcomes(passed=2)
    creates = of(fake, "create")
    assert [(c["name"], c["power_cycle"], c["existed"]) for c in creates] == [("pt-guest", False, False)]
    assert [(c["name"], c["purge"]) for c in of(fake, "destroy")] == [("pt-guest", True)]
    runs = of(fake, "run")
    assert [r["sudo"] for r in runs] == [False, True, False, False]
    assert len(of(fake, "open_ssh")) == 1  # one session for the fixture's life
    assert plugin_fake.guests(fake) == set()


def test_a_guest_that_existed_before_is_reverified_and_left(pytester, fake) -> None:
    (fake / "guests.json").write_text(json.dumps(["pt-guest"]))
    factory(pytester)
    pytester.makepyfile(test_one="""
        def test_it(pmem):
            assert pmem.created is False
    """)
    pytester.runpytest_inprocess("-p", PLUGIN).assert_outcomes(passed=1)
    assert [c["existed"] for c in of(fake, "create")] == [True]  # create re-verifies an existing guest
    assert of(fake, "destroy") == []
    assert plugin_fake.guests(fake) == {"pt-guest"}


def test_keep_destroys_nothing_and_keeps_a_failed_create(pytester, fake) -> None:
    factory(pytester)
    pytester.makepyfile(test_one="def test_it(pmem):\n    pass\n")
    pytester.runpytest_inprocess("-p", PLUGIN, "--nvmprov-keep").assert_outcomes(passed=1)
    assert [c["keep"] for c in of(fake, "create")] == [True]
    assert of(fake, "destroy") == []


def test_module_scope_makes_the_guest_per_module(pytester, fake) -> None:
    factory(pytester, scope="module", extra=", power_cycle=False")
    pytester.makepyfile(test_a="def test_a(pmem):\n    assert pmem.created\n",
                        test_b="def test_b(pmem):\n    assert pmem.created\n")
    pytester.runpytest_inprocess("-p", PLUGIN).assert_outcomes(passed=2)
    assert [c["call"] for c in plugin_fake.calls(fake) if c["call"] in ("create", "destroy")] == \
        ["create", "destroy", "create", "destroy"]


def test_power_cycle_proves_persistence_again(pytester, fake) -> None:
    configure(fake, spec=str(pytester.path / "guest.yaml"))
    factory(pytester, extra=", power_cycle=False")
    pytester.makepyfile(test_one="""
        def test_it(pmem):
            assert pmem.regions["data"].persisted is None
            pmem.run("true")
            report = pmem.power_cycle()
            assert report.ok and pmem.regions["data"].persisted is True
            pmem.run("true")
    """)
    pytester.runpytest_inprocess("-p", PLUGIN).assert_outcomes(passed=1)
    assert [c["power_cycle"] for c in of(fake, "verify")] == [True]
    assert len(of(fake, "open_ssh")) == 2  # the session before the power cut is closed, a new one after


# ---------------------------------------------------------------------------------------------
# a failing guest


def test_a_failing_guest_fails_its_tests_with_the_phase_and_console_tail(pytester, fake) -> None:
    configure(fake, fail={"phase": "ssh", "message": "SSH to nvmprov@127.0.0.1:40022 not ready after 600 s"},
              console="[    3.1] Kernel panic - not syncing: VFS: Unable to mount root fs")
    factory(pytester)
    pytester.makepyfile(test_one="def test_a(pmem):\n    pass\n\ndef test_b(pmem):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", PLUGIN)
    result.assert_outcomes(errors=2)
    out = result.stdout.str()
    assert "nvmprov guest pt-guest failed in phase ssh: SSH to nvmprov@127.0.0.1:40022 not ready" in out
    assert "last console lines:" in out and "Kernel panic - not syncing" in out
    assert len(of(fake, "create")) == 1  # tried once: the second test gets the same error at once
    assert of(fake, "destroy") == []  # nothing of it is left to destroy: create rolled back


def test_a_new_guest_whose_check_failed_fails_its_tests_and_is_still_destroyed(pytester, fake) -> None:
    configure(fake, check_fails=True)
    factory(pytester)
    pytester.makepyfile(test_one="def test_a(pmem):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", PLUGIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*nvmprov guest pt-guest failed in phase verify*", "*region data: dax false*"])
    assert [(d["name"], d["purge"]) for d in of(fake, "destroy")] == [("pt-guest", True)]
    assert plugin_fake.guests(fake) == set()


def test_an_error_raised_names_the_phase_it_was_in(pytester, fake) -> None:
    configure(fake, **{"raise": "libvirt: cannot start pt-guest: no space left on device"})
    factory(pytester)
    pytester.makepyfile(test_one="def test_a(pmem):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", PLUGIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*nvmprov guest pt-guest failed in phase start: libvirt: cannot start pt-guest*",
                                 "*note: rollback left: volume x*"])
    assert "Traceback" not in result.stdout.str()


def test_a_bad_spec_fails_with_the_specs_own_message(pytester, fake) -> None:
    (pytester.path / "guest.yaml").write_text(SPEC.replace("size: 512MiB", "size: lots"))
    factory(pytester)
    pytester.makepyfile(test_one="def test_a(pmem):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", PLUGIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*guest.yaml:5:*size*"])
    assert of(fake, "create") == []


# ---------------------------------------------------------------------------------------------
# the options


def test_spec_and_connect_options_give_the_ready_made_fixture(pytester, fake) -> None:
    pytester.makepyfile(test_one="""
        def test_it(nvmprov_spec_guest):
            assert nvmprov_spec_guest.name == "pt-guest"
            assert nvmprov_spec_guest.connect == "qemu+ssh://root@hv1/system"
    """)
    result = pytester.runpytest_inprocess("-p", PLUGIN, "--nvmprov-spec", str(pytester.path / "guest.yaml"),
                                          "--nvmprov-connect", "qemu+ssh://root@hv1/system")
    result.assert_outcomes(passed=1)
    assert [(c["connect"], c["power_cycle"]) for c in of(fake, "create")] == [("qemu+ssh://root@hv1/system", True)]
    assert [c["connect"] for c in of(fake, "destroy")] == ["qemu+ssh://root@hv1/system"]


def test_the_ready_made_fixture_without_a_spec_says_what_to_give(pytester, fake) -> None:
    pytester.makepyfile(test_one="def test_it(nvmprov_spec_guest):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", PLUGIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*this fixture has no spec: give --nvmprov-spec FILE*"])


# ---------------------------------------------------------------------------------------------
# pytest-xdist: one guest for every worker, behind a lock; the controller destroys it


def test_xdist_workers_share_one_guest_and_the_controller_destroys_it(pytester, fake) -> None:
    pytest.importorskip("xdist")
    factory(pytester, extra=", power_cycle=False")
    pytester.makepyfile(**{f"test_w{i}": f"""
        import os, time

        def test_{i}(pmem):
            time.sleep(0.2)  # long enough for both workers to be busy at once
            assert pmem.regions["data"].dax is True
            assert pmem.run("echo %s", os.environ["PYTEST_XDIST_WORKER"]).rc == 0
    """ for i in range(4)})
    result = pytester.runpytest_subprocess("-p", PLUGIN, "-n", "2")
    result.assert_outcomes(passed=4)
    calls = plugin_fake.calls(fake)
    workers = {c["worker"] for c in calls if c["call"] == "run"}
    assert workers == {"gw0", "gw1"}, calls  # both workers used the guest
    assert len(of(fake, "create")) == 1, calls  # one of them made it, the other took its report
    destroys = of(fake, "destroy")
    assert [(d["worker"], d["purge"]) for d in destroys] == [("controller", True)], calls
    assert plugin_fake.guests(fake) == set()
