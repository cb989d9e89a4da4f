"""nvmprov.speedups leans on what libraries do not promise: these fail when that changes.

And the shared hypervisor connections of nvmprov.remote are closed at exit.
"""

from __future__ import annotations

import gc
import inspect
import subprocess
import sys
import textwrap

from nvmprov import remote, speedups


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    """CODE in a fresh interpreter (nothing imported yet), from this checkout."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False)


def test_pydantic_still_finds_plugins_through_the_module_the_stub_stands_in_for() -> None:
    from pydantic.plugin import _loader, _schema_validator

    assert _loader.__name__ == speedups.PYDANTIC_PLUGIN_LOADER and callable(_loader.get_plugins)
    # It imports the loader when a validator is built, by name: a module in sys.modules under that
    # name is what it gets. Imported at pydantic's own import time instead, the stub saves nothing.
    assert "from ._loader import get_plugins" in inspect.getsource(_schema_validator.create_schema_validator)


def test_building_a_model_pays_for_plugin_discovery_unless_the_stub_stands_in() -> None:
    # pydantic alone: building a model imports the real loader (what the stub saves)
    plain = _fresh("""
        import sys, pydantic
        assert "pydantic.plugin._loader" not in sys.modules
        class M(pydantic.BaseModel):
            x: int
        assert "pydantic.plugin._loader" in sys.modules
    """)
    assert plain.returncode == 0, plain.stderr
    # nvmprov's models, built under the stub: the real loader is never imported, and the stub is gone
    nvmprov = _fresh("""
        import sys
        from nvmprov import spec
        assert "pydantic.plugin._loader" not in sys.modules, "the stub no longer keeps the loader out"
        assert spec.loads("name: g\\npmem: [{name: d, size: 64MiB}]\\n").guests[0].name == "g"
        import pydantic
        class Theirs(pydantic.BaseModel):
            x: int
        assert sys.modules["pydantic.plugin._loader"].__file__, "someone else's model got the stub"
    """)
    assert nvmprov.returncode == 0, nvmprov.stderr


def test_without_gc_freezes_what_the_command_left_and_gives_the_collector_back() -> None:
    frozen = gc.get_freeze_count()
    kept = []

    @speedups.without_gc
    def command() -> bool:
        kept.append(object())
        return gc.isenabled()

    try:
        assert command() is False and gc.isenabled()
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()


class _Client:
    closed = 0

    def close(self) -> None:
        _Client.closed += 1


def test_shared_hypervisor_connections_are_closed_at_exit(monkeypatch) -> None:
    ep = remote.Endpoint("hv1", "hv1.example", 22, "root", (), (), True)
    monkeypatch.setattr(remote, "endpoint_for", lambda uri: ep)
    hv = remote.hypervisor_for("qemu+ssh://root@hv1/system")
    assert hv is remote.hypervisor_for("qemu+ssh://root@hv1/system")  # shared
    assert hv is not None
    hv._client = _Client()  # noqa: SLF001 - as if it had connected
    remote.close_all()
    assert _Client.closed == 1 and hv._client is None  # noqa: SLF001
    assert remote.hypervisor_for("qemu+ssh://root@hv1/system") is not hv  # a new one after
    remote.close_all()


def test_close_all_is_registered_at_exit() -> None:
    out = _fresh("""
        import atexit
        from nvmprov import remote
        closed = []
        remote._HYPERVISORS["x"] = type("H", (), {"close": lambda self: print("closed")})()
    """)
    assert out.returncode == 0 and out.stdout == "closed\n", out.stderr
