"""workflow.create and guests.verify_one on libvirt's in-process test:///default driver.

The driver has no QEMU and no guest: SSH is replaced by a function that fails like a guest that
never answers, and host.facts by an x86_64 host like this one (the test driver calls itself i686).
What is real: the domain, its nvmprov metadata, the storage pool, the state directory and locks.
"""

from __future__ import annotations

import io
import json
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from nvmprov import domain, guests, identity, image, ledger, plan, spec, state, storage, workflow
from nvmprov.errors import GuestError, HostError, Interrupted, SpecError, UsageError
from nvmprov.progress import Progress

URI = "test:///default"
FACTS = plan.HostFacts(kvm_domain_type=True, cpu_virt_extensions=False)

SPEC_TEXT = """\
version: 1
name: {name}
memory: 1GiB
vcpus: 1
pmem:
  - name: data
    size: 1GiB
    filesystem: ext4
    mount: /mnt/data
"""


def guest_spec(name: str, extra: str = "") -> spec.GuestSpec:
    return spec.loads(SPEC_TEXT.format(name=name) + extra).guests[0]


@pytest.fixture
def conn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[libvirt.virConnect]:
    """One open connection keeps the test driver's state alive for the workflow's own connections."""
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(workflow.host, "facts", lambda _conn, pool_dir: replace(FACTS, pool_dir=pool_dir))
    monkeypatch.setattr(workflow.image, "is_built", lambda _pool: True)

    def no_build(*_a: object, **_k: object) -> None:
        raise AssertionError("the image must not be built in a unit test")

    monkeypatch.setattr(workflow.image, "build", no_build)
    monkeypatch.setattr(storage, "upload", _upload_without_streams)
    c = libvirt.open(URI)
    _pool_with_base_image(c)
    made: list[str] = []
    c.made = made  # type: ignore[attr-defined]
    yield c
    for name in made:
        try:
            dom = c.lookupByName(name)
        except libvirt.libvirtError:
            continue
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    c.close()


def _pool_with_base_image(c: libvirt.virConnect) -> None:
    """The pool create would make, holding the built-in image's base volume (no image build)."""
    pool = storage.ensure_pool(c, "nvmprov", "/var/lib/nvmprov/pool")  # the test driver touches no files
    base = image.builtin_volume_names()[0]
    if storage.lookup(pool, base) is None:
        pool.createXML(f"<volume><name>{base}</name><capacity>1073741824</capacity>"
                       "<target><format type='qcow2'/></target></volume>", 0)


def _upload_without_streams(pool: libvirt.virStoragePool, name: str, data: bytes, *_a: object, **_k: object) -> None:
    """The test driver has no virStorageVolUpload: the seed ISO becomes an empty volume of its size."""
    pool.createXML(f"<volume><name>{name}</name><capacity>{len(data)}</capacity></volume>", 0)


def define_managed(conn: libvirt.virConnect, g: spec.GuestSpec, *, spec_json: str | None = "same") -> None:
    """A guest as a finished `nvmprov create` leaves it: domain + complete metadata."""
    facts = replace(FACTS, builtin_volumes=image.builtin_volume_names())
    the_plan = plan.build(g, facts)
    recorded = g.model_dump_json(by_alias=True) if spec_json == "same" else spec_json
    md = replace(domain.Metadata.from_plan(the_plan, ssh_port=2222, spec_json=recorded), complete=True)
    ctx = domain.RenderContext(uuid=str(uuid.uuid4()), ssh_port=2222, pool_dir="/default-pool")
    conn.defineXML(domain.render(the_plan, ctx, metadata=md))
    conn.made.append(g.name)  # type: ignore[attr-defined]


def ssh_never_answers(*_a: object, **_k: object) -> None:
    raise GuestError("no SSH answer on 127.0.0.1:2222 within 600s")


def quiet() -> Progress:
    return Progress(io.StringIO())


# ---------------------------------------------------------------------------------------------
# 1a: a re-run of create on an existing guest reports a guest failure like a new guest does


def test_reverify_of_an_existing_guest_reports_the_failed_phase(conn, monkeypatch) -> None:
    g = guest_spec("wf-reverify")
    define_managed(conn, g)
    monkeypatch.setattr(workflow, "open_session", ssh_never_answers)
    report = workflow.create(g, workflow.CreateOptions(connect=URI), quiet())
    assert report.ok is False
    assert report.error == {"phase": "ssh", "message": "no SSH answer on 127.0.0.1:2222 within 600s"}
    assert report.ssh is not None and report.ssh.port == 2222


# 1c: verify names the phase that failed, not always "verify"


def test_verify_one_reports_ssh_as_the_failed_phase(conn, monkeypatch) -> None:
    g = guest_spec("wf-verify-phase")
    define_managed(conn, g)
    monkeypatch.setattr(guests.host, "facts", lambda _conn, pool_dir: replace(FACTS, pool_dir=pool_dir))
    monkeypatch.setattr(workflow, "open_session", ssh_never_answers)
    workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())  # makes the pool
    report = guests.verify_one(g.name, connect=URI, power_cycle=False, progress=quiet())
    assert report.error is not None and report.error["phase"] == "ssh", report.error


# 2: a changed spec names its changed fields from the domain's metadata, not a local file


def test_changed_spec_is_diffed_against_the_metadata(conn, tmp_path) -> None:
    define_managed(conn, guest_spec("wf-changed"))
    bigger = guest_spec("wf-changed").model_copy(update={"vcpus": 2})
    assert not _files("wf-changed").spec_json.exists()  # made "on another machine"
    with pytest.raises(UsageError) as info:
        workflow.create(bigger, workflow.CreateOptions(connect=URI), quiet())
    assert "(changed: vcpus)" in str(info.value), info.value
    assert "not recorded" not in str(info.value)


def test_changed_fields_without_any_recorded_spec_says_so(tmp_path) -> None:
    g = guest_spec("wf-old")
    md = domain.Metadata.from_plan(plan.build(g, FACTS), ssh_port=2222)  # an old nvmprov: no spec_json
    files = state.GuestFiles(tmp_path / "nothing-here")
    assert workflow.changed_fields(g, md, files) == ["(the guest's metadata does not hold the spec it was made with)"]
    md = replace(md, spec_json=g.model_copy(update={"memory_bytes": 2 * 1024**3}).model_dump_json(by_alias=True))
    assert workflow.changed_fields(g, md, files) == ["memory"]


# 3: accel: kvm on a host where it cannot work fails before anything is made


def test_accel_kvm_that_cannot_work_fails_before_the_pool_or_image(conn, monkeypatch) -> None:
    def untouchable(*_a: object, **_k: object) -> None:
        raise AssertionError("a side effect ran before the plan refused the host")

    monkeypatch.setattr(workflow.storage, "ensure_pool", untouchable)
    monkeypatch.setattr(workflow.image, "is_built", untouchable)
    g = guest_spec("wf-kvm", "accel: kvm\n")
    with pytest.raises(HostError, match="accel: kvm cannot work here"):
        workflow.create(g, workflow.CreateOptions(connect=URI), quiet())
    assert "wf-kvm" not in conn.listDefinedDomains()
    assert not _files("wf-kvm").dir.exists()


# 4: the last report lands in the guest's state directory, private


def _files(name: str) -> state.GuestFiles:
    """The guest's files under the test driver's hypervisor identity."""
    c = libvirt.open(URI)
    try:
        return state.guest_files(name, identity.of(c), create=False)
    finally:
        c.close()


def _saved(name: str) -> dict:
    path = _files(name).report
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return json.loads(path.read_text())


def test_create_and_verify_save_the_last_report(conn, monkeypatch) -> None:
    g = guest_spec("wf-saved")
    report = workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    assert report.ok, report
    saved = _saved(g.name)
    assert saved["schema_version"] == 1 and saved["ok"] is True and saved["guests"][0]["name"] == g.name
    conn.made.append(g.name)

    monkeypatch.setattr(guests.host, "facts", lambda _conn, pool_dir: replace(FACTS, pool_dir=pool_dir))
    monkeypatch.setattr(workflow, "open_session", ssh_never_answers)
    guests.verify_one(g.name, connect=URI, power_cycle=False, progress=quiet())
    saved = _saved(g.name)
    assert saved["ok"] is False and saved["guests"][0]["error"]["phase"] == "ssh"


def test_a_rolled_back_create_leaves_no_report_behind(conn, monkeypatch) -> None:
    monkeypatch.setattr(workflow, "open_session", ssh_never_answers)
    g = guest_spec("wf-rolled-back")
    conn.made.append(g.name)  # the test driver refuses undefine's NVRAM flag: the domain stays, the rest goes
    report = workflow.create(g, workflow.CreateOptions(connect=URI), quiet())
    assert report.error is not None and report.error["phase"] == "ssh"
    assert not _files(g.name).dir.exists()


# issue 12: a user image is vetted before anything is made; a recorded spec that breaks a rule
# added since still loads, with a warning naming the rule


@pytest.mark.parametrize("kind", ["link-to-host-file", "qcow2-backed-by-host-file", "fifo"])
def test_create_until_define_refuses_an_image_that_is_no_disk_image(conn, tmp_path, kind) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$notarealhash:20228:0:99999:7:::\n")
    image = tmp_path / ("x.qcow2" if kind.startswith("qcow2") else "x.raw")
    if kind == "link-to-host-file":
        image.symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(image)
    else:
        name = str(secret).encode()
        header = b"QFI\xfb" + (2).to_bytes(4, "big") + (72).to_bytes(8, "big") + len(name).to_bytes(4, "big")
        header += (16).to_bytes(4, "big") + (1 << 30).to_bytes(8, "big")
        image.write_bytes(header.ljust(72, b"\0") + name + bytes(1024))
    g = guest_spec("wf-badimage", f"image: {image}\nfirmware: bios\n")
    opts = workflow.CreateOptions(connect=URI, until="define", spec_path="/specs/g.yaml")
    with pytest.raises(SpecError) as info:
        workflow.create(g, opts, quiet())
    assert str(info.value).startswith(f"/specs/g.yaml: guest wf-badimage: image {image}"), info.value
    assert "notarealhash" not in str(info.value)
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("wf-badimage")
    names = [v.name() for v in storage.pool_of(conn, "nvmprov").listAllVolumes(0)]
    assert not [n for n in names if n.startswith("wf-badimage")], names
    assert not _files("wf-badimage").dir.exists()


def test_a_recorded_spec_breaking_a_new_rule_warns_and_changes_nothing(conn, monkeypatch, capsys) -> None:
    g = guest_spec("wf-recorded")
    old = g.canonical()
    old["ssh"]["user"] = "daemon"
    old["pmem"][0]["mount"] = "/root/data"
    define_managed(conn, g, spec_json=json.dumps(old))
    monkeypatch.setattr(guests.host, "facts", lambda _conn, pool_dir: replace(FACTS, pool_dir=pool_dir))
    before = conn.lookupByName("wf-recorded").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    m = guests.managed(conn, "wf-recorded")
    assert m.plan.ssh_user == "daemon"
    err = capsys.readouterr().err
    warned = "wf-recorded: warning: the spec this guest was made with breaks a rule added since: "
    assert warned + repr(spec.RULE_USER) in err
    assert repr(spec.RULE_MOUNT) in err and "Traceback" not in err
    assert conn.lookupByName("wf-recorded").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before


def test_create_says_what_outbound_opens_host_loopback_included(conn) -> None:
    out = io.StringIO()
    g = guest_spec("wf-outbound", "network: {outbound: true}\n")
    workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), Progress(out))
    conn.made.append("wf-outbound")  # type: ignore[attr-defined]
    assert "loopback services (127.0.0.1 here is 10.0.2.2 in the guest" in out.getvalue()
    out = io.StringIO()
    workflow.create(guest_spec("wf-closed"), workflow.CreateOptions(connect=URI, until="define"), Progress(out))
    conn.made.append("wf-closed")  # type: ignore[attr-defined]
    assert "10.0.2.2" not in out.getvalue()


def test_a_missing_image_stays_a_host_error_after_the_vetting(conn) -> None:
    """Nothing at the path is not a hostile file: the overlay step fails (exit 3) and rolls back, as
    before issue 12 (tests/e2e/test_faults.py uses it to provoke a rollback)."""
    g = guest_spec("wf-noimage", "image: /nope.qcow2\nfirmware: bios\n")
    conn.made.append(g.name)  # the test driver refuses undefine's NVRAM flag: the domain stays, the rest goes
    with pytest.raises(HostError, match="image /nope.qcow2: No such file or directory"):
        workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    names = [v.name() for v in storage.pool_of(conn, "nvmprov").listAllVolumes(0)]
    assert not [n for n in names if n.startswith("wf-noimage")], "the backing volume made first is rolled back"

# 5: a create that raises still prints the report it filled (ssh, accel, notes), through the CLI


@pytest.mark.parametrize(("exc", "status"), [
    (HostError("QEMU refused to start: no space left on device"), 3),
    (Interrupted("interrupted by SIGTERM"), 130),
], ids=["host", "interrupt"])
def test_json_after_a_failed_create_is_the_report_the_run_filled(conn, monkeypatch, capsys, tmp_path,
                                                                 exc: BaseException, status: int) -> None:
    from nvmprov import cli

    def refuse(_dom: object) -> None:
        raise exc

    monkeypatch.setattr(workflow.virt, "start", refuse)
    name = f"wf-json-{exc.__class__.__name__.lower()}"
    conn.made.append(name)  # the test driver refuses undefine's NVRAM flag: the rollback leaves the domain
    path = tmp_path / "guest.yaml"
    path.write_text(SPEC_TEXT.format(name=name))
    assert cli.main(["create", str(path), "--connect", URI, "--json"]) == status
    out, _err = capsys.readouterr()
    (g,) = json.loads(out)["guests"]
    assert g["ok"] is False and g["error"]["phase"] == "start" and str(exc) in g["error"]["message"]
    assert g["accel"] == "tcg" and g["ssh"]["host"] == "127.0.0.1" and g["ssh"]["port"] > 0
    assert g["regions"] == []  # the run failed before verify: nothing to say about them yet
    assert g["notes"] and g["notes"][0].startswith("rollback left: domain " + name)



# ---------------------------------------------------------------------------------------------
# 5: ownership: a volume nvmprov did not make is neither used nor deleted


def _pool(c: libvirt.virConnect) -> libvirt.virStoragePool:
    return storage.pool_of(c, "nvmprov")


def _plant(c: libvirt.virConnect, name: str) -> None:
    """A volume someone else made under the name nvmprov would give a region (same size)."""
    storage.make_backing(_pool(c), name, 1024**3, allocation="sparse")


def test_a_volume_in_the_way_is_refused_before_anything_is_made(conn) -> None:
    g = guest_spec("wf-own-way")
    _plant(conn, "wf-own-way-pmem-data.raw")
    with pytest.raises(HostError, match=r"volume wf-own-way-pmem-data.raw .* is in the way of region data of guest "
                                        r"wf-own-way.*`volume: wf-own-way-pmem-data.raw`.*virsh vol-delete"):
        workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    assert storage.lookup(_pool(conn), "wf-own-way-pmem-data.raw") is not None
    assert storage.lookup(_pool(conn), "wf-own-way-root.qcow2") is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("wf-own-way")


def test_a_volume_that_appears_after_the_check_is_refused_and_survives_the_rollback(conn, monkeypatch) -> None:
    """Creation is exclusive: only what this run's createXML made is its own."""
    g = guest_spec("wf-own-race", extra="  - name: more\n    size: 16MiB\n    filesystem: none\n")
    real = storage.make_backing

    def someone_else_first(pool, name, *a, **k):  # type: ignore[no-untyped-def]
        if name == "wf-own-race-pmem-more.raw":
            real(pool, name, *a, **k)  # made by "someone else" between the check and the create
        return real(pool, name, *a, **k)

    monkeypatch.setattr(storage, "make_backing", someone_else_first)
    conn.made.append(g.name)  # type: ignore[attr-defined]
    with pytest.raises(HostError, match="is in the way"):
        workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    pool = _pool(conn)
    assert storage.lookup(pool, "wf-own-race-pmem-more.raw") is not None     # not this run's: kept
    assert storage.lookup(pool, "wf-own-race-pmem-data.raw") is None         # this run's: rolled back
    assert ledger.read(pool).of(identity.of(conn).key, g.name) == []


def test_an_adopted_volume_is_used_and_handed_back_not_deleted(conn) -> None:
    g = spec.loads(SPEC_TEXT.format(name="wf-own-adopt").replace("mount: /mnt/data",
                                                                 "mount: /mnt/data\n    volume: mine.raw")).guests[0]
    _plant(conn, "mine.raw")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    report = workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    assert report.ok, report
    pool, hv = _pool(conn), identity.of(conn).key
    entry = ledger.read(pool).get("mine.raw")
    assert entry is not None and entry.adopted and entry.belongs_to(hv, g.name)
    kept = guests._delete_owned(pool, hv, g.name, purge=True, purge_adopted=False, progress=quiet())
    assert kept == [] and storage.lookup(pool, "mine.raw") is not None
    assert ledger.read(pool).get("mine.raw") is None                        # handed back
    assert storage.lookup(pool, "wf-own-adopt-root.qcow2") is None          # its own overlay: deleted
