"""The pytest plugin on real guests: a test module run through it (pytester, in this process) gets
the shared e2e guest re-verified without a boot and leaves it as it was; a guest the fixture makes
itself is destroyed with purge at the end, with nothing left behind."""

from __future__ import annotations

import json

import pytest

from nvmprov import pytest_plugin, workflow  # noqa: F401 - loaded once here, not by every in-process inner run

from .conftest import Created, destroy_quietly, nvmprov
from .test_faults import leftovers

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.e2e

PLUGIN = "nvmprov.pytest_plugin"


def running_guests() -> dict[str, str]:
    rows = json.loads(nvmprov("list", "--format", "json", check=True).stdout)
    return {row["name"]: row["state"] for row in rows}


def test_the_fixture_reverifies_the_shared_guest_and_leaves_it(mixed_guest: Created,
                                                                pytester: pytest.Pytester) -> None:
    assert mixed_guest.report["ok"], mixed_guest.proc.stderr[-4000:]
    pytester.makepyfile(test_through_the_plugin="""
        def test_a_command_on_the_dax_mount(nvmprov_spec_guest):
            g = nvmprov_spec_guest
            assert g.created is False  # it existed before this run: re-verified, not made
            assert "start" not in g.report.timings_s, g.report.timings_s  # no boot
            plain = g.regions["plain"]
            assert plain.dax is True and plain.mountpoint
            r = g.sudo("dd if=/dev/zero of=%s bs=4096 count=1 status=none && findmnt -no OPTIONS -T %s",
                       plain.mountpoint + "/plugin probe", plain.mountpoint)
            assert r.rc == 0, r.stderr
            assert any(o in ("dax", "dax=always") for o in r.stdout.strip().split(",")), r.stdout
            assert g.run("stat -c %%s %s", plain.mountpoint + "/plugin probe").stdout.strip() == "4096"
    """)
    result = pytester.runpytest_inprocess("-p", PLUGIN, "--nvmprov-spec", str(mixed_guest.spec_path), "-v")
    result.assert_outcomes(passed=1)
    assert running_guests().get(mixed_guest.name) == "running"  # after the teardown: still there


def test_a_guest_the_fixture_creates_is_purged_leaving_nothing(pytester: pytest.Pytester) -> None:
    name = "e2e-plugin"
    destroy_quietly(name)
    spec = {"name": name, "memory": "512MiB",
            "pmem": [{"name": "data", "size": "64MiB", "filesystem": "ext4", "mount": "/mnt/data"}]}
    pytester.makeconftest(f"""
        from nvmprov.pytest_plugin import nvmprov_guest

        pmem = nvmprov_guest({spec!r}, scope="module", power_cycle=False)
    """)
    pytester.makepyfile(test_made_here="""
        def test_made_and_verified(pmem):
            assert pmem.created is True
            data = pmem.regions["data"]
            assert data.dax is True and data.data_ok is True and data.persisted is None  # no power cycle asked
            assert pmem.check_output("findmnt -no FSTYPE %s", data.mountpoint) == "ext4"
    """)
    try:
        result = pytester.runpytest_inprocess("-p", PLUGIN, "-v")
        result.assert_outcomes(passed=1)
        assert leftovers(name) == []
    finally:
        destroy_quietly(name)
