"""`nvmprov render` and `nvmprov validate`: pure stages, no libvirt, no host looked at.

render: a random UUID unless --uuid, the requested accel assumed available, create's pool directory.
validate: the plan's notes (sizes it rounds, label costs) on stderr, exit 0.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nvmprov import cli

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "examples" / "guest.yaml"


def write_spec(tmp_path: Path, extra: str = "", region: str = "size: 1GiB") -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(
        f"version: 1\nname: r1\nmemory: 1GiB\n{extra}"
        f"pmem:\n  - {{name: data, {region}, filesystem: ext4, mount: /mnt/data}}\n"
    )
    return path


def render(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[ET.Element, str]:
    assert cli.main(["render", *argv]) == 0
    out, err = capsys.readouterr()
    return ET.fromstring(out), err  # noqa: S314 - our own output


# 8a: UUIDs


def test_render_gives_a_new_random_uuid_each_run(capsys) -> None:
    first, _ = render([str(GUEST)], capsys)
    second, _ = render([str(GUEST)], capsys)
    a, b = first.findtext("uuid"), second.findtext("uuid")
    assert a and b and a != b
    assert uuid.UUID(a).version == 4
    assert a != "00000000-0000-4000-8000-000000000000"


def test_render_uuid_flag_gives_stable_output(capsys) -> None:
    fixed = "2f1c9a3e-5b7d-4c1e-9f00-0123456789ab"
    one, _ = render([str(GUEST), "--uuid", fixed.upper()], capsys)
    two, _ = render([str(GUEST), "--uuid", fixed], capsys)
    assert one.findtext("uuid") == two.findtext("uuid") == fixed  # normalised
    assert ET.tostring(one) == ET.tostring(two)


@pytest.mark.parametrize("bad", ["nope", "1234", "2f1c9a3e-5b7d-4c1e-9f00-0123456789abcd", ""])
def test_render_refuses_a_bad_uuid_as_a_usage_error(bad: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["render", str(GUEST), "--uuid", bad])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "--uuid" in err and "is not a UUID" in err


# 8b: accel


def test_render_of_accel_kvm_assumes_kvm_works(tmp_path: Path, capsys) -> None:
    dom, err = render([str(write_spec(tmp_path, "accel: kvm\n"))], capsys)
    assert dom.get("type") == "kvm"
    cpu = dom.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert err == ""


def test_render_of_accel_auto_renders_tcg_and_says_so(capsys) -> None:
    dom, err = render([str(GUEST)], capsys)
    assert dom.get("type") == "qemu"
    assert err.startswith("nvmprov: note: demo: accel auto rendered as tcg") and len(err.splitlines()) == 1
    assert "vmx" not in err and "libvirt offers" not in err  # no claim about a host it never saw


def test_render_of_accel_tcg_is_silent(tmp_path: Path, capsys) -> None:
    dom, err = render([str(write_spec(tmp_path, "accel: tcg\n"))], capsys)
    assert dom.get("type") == "qemu" and err == ""


# 8c: the pool directory create would use


def _pool_paths(dom: ET.Element) -> set[str]:
    paths = {p.text or "" for p in dom.iter("path")} | {dom.findtext("os/kernel") or ""}
    return {str(Path(p).parent) for p in paths if p}


def test_render_uses_creates_pool_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    dom, _ = render([str(write_spec(tmp_path, "pool: scratch\n"))], capsys)
    assert _pool_paths(dom) == {"/var/lib/nvmprov/pools/scratch"}


def test_render_for_a_session_uri_uses_the_users_pool(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu:///session")  # as create would connect
    dom, _ = render([str(write_spec(tmp_path))], capsys)
    assert _pool_paths(dom) == {str(tmp_path / "data" / "nvmprov" / "pool")}


# 9: validate says what create would round


def test_validate_prints_the_rounding_notes_and_exits_0(tmp_path: Path, capsys) -> None:
    path = write_spec(tmp_path, region="size: 1001MiB, label: 128KiB")
    assert cli.main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok (1 guest: r1)\n"
    lines = err.splitlines()
    note = "nvmprov: note: r1: region data: size 1001MiB rounded up to 1002MiB"
    assert any(line.startswith(note) for line in lines), err
    assert any("label 128KiB rounded up to 2MiB" in line for line in lines), err


def test_validate_without_rounding_is_quiet(tmp_path: Path, capsys) -> None:
    assert cli.main(["validate", str(write_spec(tmp_path, "accel: kvm\n"))]) == 0  # no host is consulted
    assert capsys.readouterr().err == ""



# start-up: render and validate run without the cyclic GC, then give it back (speedups.without_gc)


@pytest.mark.parametrize("argv", [["render", str(GUEST)], ["validate", str(GUEST)], ["render", "missing.yaml"]],
                         ids=["render", "validate", "failing"])
def test_render_and_validate_run_without_the_collector_and_turn_it_back_on(
        argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import gc

    from nvmprov import spec

    seen: list[bool] = []
    load = spec.load
    monkeypatch.setattr(spec, "load", lambda path: seen.append(gc.isenabled()) or load(path))
    assert gc.isenabled()
    cli.main(argv)
    assert gc.isenabled() and seen == [False]
    gc.disable()
    try:
        cli.main(argv)
        assert not gc.isenabled()  # a caller that turned it off keeps it off
    finally:
        gc.enable()
