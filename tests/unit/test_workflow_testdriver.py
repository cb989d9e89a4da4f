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

from nvmprov import domain, guests, identity, image, ledger, managed, plan, proof, spec, state, storage, workflow
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
    monkeypatch.setattr(proof, "open_session", ssh_never_answers)
    report = workflow.create(g, workflow.CreateOptions(connect=URI), quiet())
    assert report.ok is False
    assert report.error == {"phase": "ssh", "message": "no SSH answer on 127.0.0.1:2222 within 600s"}
    assert report.ssh is not None and report.ssh.port == 2222


# 1c: verify names the phase that failed, not always "verify"


def test_verify_one_reports_ssh_as_the_failed_phase(conn, monkeypatch) -> None:
    g = guest_spec("wf-verify-phase")
    define_managed(conn, g)
    monkeypatch.setattr(managed.host, "facts", lambda _conn, pool_dir: replace(FACTS, pool_dir=pool_dir))
    monkeypatch.setattr(proof, "open_session", ssh_never_answers)
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

    monkeypatch.setattr(managed.host, "facts", lambda _conn, pool_dir: replace(FACTS, pool_dir=pool_dir))
    monkeypatch.setattr(proof, "open_session", ssh_never_answers)
    guests.verify_one(g.name, connect=URI, power_cycle=False, progress=quiet())
    saved = _saved(g.name)
    assert saved["ok"] is False and saved["guests"][0]["error"]["phase"] == "ssh"


def test_a_rolled_back_create_leaves_no_report_behind(conn, monkeypatch) -> None:
    monkeypatch.setattr(proof, "open_session", ssh_never_answers)
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
    monkeypatch.setattr(managed.host, "facts", lambda _conn, pool_dir: replace(FACTS, pool_dir=pool_dir))
    before = conn.lookupByName("wf-recorded").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    m = managed.guest(conn, "wf-recorded")
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
    kept = guests._delete_owned(pool, hv, g.name, purge=ledger.Purge.asked(True, False), progress=quiet())
    assert kept == [] and storage.lookup(pool, "mine.raw") is not None
    assert ledger.read(pool).get("mine.raw") is None                        # handed back
    assert storage.lookup(pool, "wf-own-adopt-root.qcow2") is None          # its own overlay: deleted


def test_destroy_purge_of_an_owned_volume_does_not_call_it_kept(conn, monkeypatch) -> None:
    """The 'kept volume X: nvmprov did not make it' line is for volumes not ours that still exist."""
    monkeypatch.setattr(guests.virt, "undefine", lambda dom: dom.undefine())  # the test driver takes no flags
    g = guest_spec("wf-own-purge")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    assert workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet()).ok
    out = io.StringIO()
    guests.destroy_one(conn, identity.of(conn), g.name, purge=ledger.Purge(volumes=True), progress=Progress(out))
    assert "deleted backing volume wf-own-purge-pmem-data.raw" in out.getvalue()
    assert "kept volume" not in out.getvalue(), out.getvalue()
    assert storage.lookup(_pool(conn), "wf-own-purge-pmem-data.raw") is None


def test_destroy_purge_keeps_a_volume_another_domain_uses(conn, monkeypatch) -> None:
    """A backing volume nvmprov made, since given to another domain by hand: --purge keeps it."""
    monkeypatch.setattr(guests.virt, "undefine", lambda dom: dom.undefine())  # the test driver takes no flags
    g = guest_spec("wf-own-shared")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    assert workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet()).ok
    pool = _pool(conn)
    path = storage.lookup(pool, "wf-own-shared-pmem-data.raw").path()
    other = conn.defineXML(f"""<domain type='test'><name>wf-own-borrower</name><memory unit='KiB'>262144</memory>
        <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>
        <source file='{path}'/><target dev='vdb' bus='virtio'/></disk></devices></domain>""")
    try:
        out = io.StringIO()
        guests.destroy_one(conn, identity.of(conn), g.name, purge=ledger.Purge(volumes=True), progress=Progress(out))
        assert "kept volume wf-own-shared-pmem-data.raw: still used by domain wf-own-borrower" in out.getvalue()
        assert storage.lookup(pool, "wf-own-shared-pmem-data.raw") is not None
        assert ledger.read(pool).get("wf-own-shared-pmem-data.raw") is not None  # still nvmprov's, for a later purge
        assert storage.lookup(pool, "wf-own-shared-root.qcow2") is None          # unshared: deleted as before
    finally:
        other.undefine()
    out = io.StringIO()
    guests.destroy_one(conn, identity.of(conn), g.name, purge=ledger.Purge(volumes=True), progress=Progress(out))
    assert storage.lookup(pool, "wf-own-shared-pmem-data.raw") is None, out.getvalue()


def _adopting(name: str, volume: str) -> spec.GuestSpec:
    return spec.loads(SPEC_TEXT.format(name=name).replace("mount: /mnt/data",
                                                          f"mount: /mnt/data\n    volume: {volume}")).guests[0]


def test_an_adopted_volume_that_does_not_exist_is_refused_before_anything_is_made(conn) -> None:
    g = _adopting("wf-own-ghost", "ghost.raw")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    with pytest.raises(HostError, match=r"volume ghost.raw named by `volume:` under region data .* does not exist"):
        workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    pool = _pool(conn)
    assert storage.lookup(pool, "ghost.raw") is None
    assert ledger.read(pool).get("ghost.raw") is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(g.name)


def test_an_adopted_volume_that_vanishes_after_the_check_is_not_made(conn, monkeypatch) -> None:
    g = _adopting("wf-own-ghost2", "ghost2.raw")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    monkeypatch.setattr(workflow, "_check_backing_volumes", lambda *_a: None)
    with pytest.raises(HostError, match="ghost2.raw named by `volume:`.* does not exist"):
        workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    assert storage.lookup(_pool(conn), "ghost2.raw") is None
    assert ledger.read(_pool(conn)).get("ghost2.raw") is None


def test_adopting_a_volume_the_ledger_holds_for_another_guest_is_refused(conn) -> None:
    pool, hv = _pool(conn), identity.of(conn).key
    _plant(conn, "theirs.raw")
    for other in (ledger.Entry("theirs.raw", "other", hv, "backing"),
                  ledger.Entry("theirs.raw", "other", hv, "backing", adopted=True),
                  ledger.Entry("theirs.raw", "wf-own-steal", "libvirtd-elsewhere", "backing")):
        ledger.record(pool, other)
        g = _adopting("wf-own-steal", "theirs.raw")
        conn.made.append(g.name)  # type: ignore[attr-defined]
        with pytest.raises(HostError, match=rf"theirs.raw named by `volume:`.* recorded as guest {other.guest}'s"):
            workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
        assert ledger.read(pool).get("theirs.raw") == other          # its record is untouched
        assert storage.lookup(pool, "theirs.raw") is not None


def test_adopting_is_refused_at_volume_time_too(conn, monkeypatch) -> None:
    pool, hv = _pool(conn), identity.of(conn).key
    _plant(conn, "theirs2.raw")
    ledger.record(pool, ledger.Entry("theirs2.raw", "other", hv, "backing"))
    monkeypatch.setattr(workflow, "_check_backing_volumes", lambda *_a: None)
    g = _adopting("wf-own-steal2", "theirs2.raw")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    with pytest.raises(HostError, match="recorded as guest other's"):
        workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    assert ledger.read(pool).get("theirs2.raw") == ledger.Entry("theirs2.raw", "other", hv, "backing")


def test_create_and_destroy_ask_the_hypervisor_its_identity_once(conn, monkeypatch) -> None:
    """Each identity.of is a capabilities call and a secret lookup: a round trip over qemu+ssh."""
    monkeypatch.setattr(guests.virt, "undefine", lambda dom: dom.undefine())  # the test driver takes no flags
    asked: list[str] = []
    real = identity.of

    def of(c):  # type: ignore[no-untyped-def]
        asked.append(c.getURI())
        return real(c)

    monkeypatch.setattr(identity, "of", of)
    g = guest_spec("wf-once")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    assert workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet()).ok
    assert len(asked) == 1
    guests.destroy([g.name], connect=URI, purge=ledger.Purge(volumes=True))
    assert len(asked) == 2


# ---------------------------------------------------------------------------------------------
# guests made before the ledger: their domain's metadata is the record, moved at first contact


def define_legacy(conn: libvirt.virConnect, g: spec.GuestSpec, volumes: tuple[tuple[str, str], ...]) -> None:
    """A guest an nvmprov before the ledger made: VOLUMES recorded in its metadata only."""
    the_plan = plan.build(g, replace(FACTS, builtin_volumes=image.builtin_volume_names()))
    md = replace(domain.Metadata.from_plan(the_plan, ssh_port=2222, spec_json=g.model_dump_json(by_alias=True)),
                 complete=True, volumes=volumes)
    ctx = domain.RenderContext(uuid=str(uuid.uuid4()), ssh_port=2222, pool_dir="/default-pool")
    conn.defineXML(domain.render(the_plan, ctx, metadata=md))
    conn.made.append(g.name)  # type: ignore[attr-defined]


def test_migrate_records_what_legacy_domains_made_and_nothing_else(conn) -> None:
    pool, hv = _pool(conn), identity.of(conn).key
    g = guest_spec("wf-legacy")
    for name in ("wf-legacy-pmem-data.raw", "wf-legacy-extra.raw", "wf-legacy-theirs.raw"):
        _plant(conn, name)
    ledger.record(pool, ledger.Entry("wf-legacy-theirs.raw", "other", hv, "backing"))
    define_legacy(conn, g, (("wf-legacy-pmem-data.raw", "backing"), ("wf-legacy-extra.raw", "backing"),
                            ("wf-legacy-gone.raw", "backing"), ("wf-legacy-theirs.raw", "backing")))
    assert sorted(ledger.migrate(conn, pool, hv)) == ["wf-legacy-extra.raw", "wf-legacy-pmem-data.raw"]
    book = ledger.read(pool)
    assert book.get("wf-legacy-pmem-data.raw") == ledger.Entry("wf-legacy-pmem-data.raw", g.name, hv, "backing")
    assert book.get("wf-legacy-gone.raw") is None                                   # not there: not recorded
    assert book.get("wf-legacy-theirs.raw") == ledger.Entry("wf-legacy-theirs.raw", "other", hv, "backing")
    assert ledger.migrate(conn, pool, hv) == []                                      # once
    generation = ledger.read(pool).generation
    ledger.migrate(conn, pool, hv)
    assert ledger.read(pool).generation == generation                               # nothing rewritten


def test_create_and_prune_migrate_legacy_guests_first(conn) -> None:
    from nvmprov import doctor

    pool, hv = _pool(conn), identity.of(conn).key
    old = guest_spec("wf-legacy2")
    _plant(conn, "wf-legacy2-pmem-data.raw")
    _plant(conn, "wf-legacy2-pmem-dropped.raw")   # a region its spec no longer has: no device uses it
    define_legacy(conn, old, (("wf-legacy2-pmem-data.raw", "backing"), ("wf-legacy2-pmem-dropped.raw", "backing")))
    g = guest_spec("wf-legacy2-next")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    assert workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet()).ok
    assert ledger.read(pool).get("wf-legacy2-pmem-data.raw") is not None        # create migrated it
    ledger.forget(pool, hv, ["wf-legacy2-pmem-data.raw", "wf-legacy2-pmem-dropped.raw"])
    offered = [v.name for v in doctor.candidates(conn, pool)]
    assert "wf-legacy2-pmem-dropped.raw" in offered and "wf-legacy2-pmem-data.raw" not in offered  # in use
    ledger.forget(pool, hv, ["wf-legacy2-pmem-dropped.raw"])
    assert doctor.prune(conn, pool.name(), ["wf-legacy2-pmem-dropped.raw"]) == ["wf-legacy2-pmem-dropped.raw"]


def test_a_volume_under_the_name_nvmprov_gave_before_the_ledger_gets_the_adopt_hint(conn) -> None:
    pool = _pool(conn)
    hint = "if an nvmprov before the ownership ledger kept it for this guest, adopt it with `volume: a-pmem-b.raw`"
    assert hint in ledger.in_the_way(pool, "a-pmem-b.raw", "guest a", "b", guest="a")
    assert "before the ownership ledger" not in ledger.in_the_way(pool, "x.raw", "guest a", "b", guest="a")
    assert "before the ownership ledger" not in ledger.in_the_way(pool, "a-pmem-b.raw", "domain a", "b", attach=True)


def test_adopting_is_refused_when_another_guest_records_the_volume_just_before(conn, monkeypatch) -> None:
    """The adoption is decided again under the ledger's lock: no take-over in between."""
    pool, hv = _pool(conn), identity.of(conn).key
    _plant(conn, "theirs3.raw")
    monkeypatch.setattr(workflow, "_check_backing_volumes", lambda *_a: None)
    real = workflow._check_adoptable

    def check_then_someone_adopts(p, book, owner, region):  # type: ignore[no-untyped-def]
        real(p, book, owner, region)  # passes: nobody holds it yet; then another create adopts it first
        ledger.update(p, hv, lambda b: b.with_entry(ledger.Entry("theirs3.raw", "other", hv, "backing", True)))

    monkeypatch.setattr(workflow, "_check_adoptable", check_then_someone_adopts)
    g = _adopting("wf-own-steal3", "theirs3.raw")
    conn.made.append(g.name)  # type: ignore[attr-defined]
    with pytest.raises(HostError, match="recorded as guest other's"):
        workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    assert ledger.read(pool).get("theirs3.raw") == ledger.Entry("theirs3.raw", "other", hv, "backing", True)


# ---------------------------------------------------------------------------------------------
# issue 16: one proof path: create (new and re-run), verify and attach all prove through proof.prove


def test_create_verify_and_attach_prove_through_the_one_proof_function(conn, monkeypatch) -> None:
    from nvmprov import attach

    calls: list[tuple[str, str, int, tuple[str, ...], bool, bool]] = []
    booting: list[bool] = []  # create waits a boot's timeout for SSH; verify and attach the ssh timeout

    def recording_prove(run: proof.GuestRun, **kw: object) -> None:
        only = kw.get("only") or run.plan.regions
        calls.append((run.report.name, run.domain.name(), run.ssh.port, tuple(r.name for r in only),  # type: ignore[attr-defined]
                      bool(kw.get("made")), bool(kw.get("power_cycle"))))
        booting.append(bool(kw.get("booting")))
        raise GuestError("the guest never answers")

    monkeypatch.setattr(proof, "prove", recording_prove)
    monkeypatch.setattr(managed.host, "facts", lambda _conn, pool_dir: replace(FACTS, pool_dir=pool_dir))
    new = workflow.create(guest_spec("wf-proof-new"), workflow.CreateOptions(connect=URI), quiet())
    conn.made.append("wf-proof-new")  # the test driver refuses undefine's NVRAM flag: the rollback leaves it
    g = guest_spec("wf-proof")
    workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    conn.made.append(g.name)
    rerun = workflow.create(g, workflow.CreateOptions(connect=URI), quiet())  # starts it, proves it again
    verified = guests.verify_one(g.name, connect=URI, power_cycle=True, progress=quiet())
    plugged: list[str] = []  # the test driver has no virDomainAttachDeviceFlags: the device XML is kept
    monkeypatch.setattr(attach.virt, "attach", lambda _dom, xml, **_k: plugged.append(xml))
    request = attach.AttachRequest(region="hp0", size_bytes=256 * 1024**2)
    attached = attach.attach(conn, g.name, request, quiet()).guests[0]

    port = managed.guest(conn, g.name).md.ssh_port
    assert [c[:2] for c in calls] == [("wf-proof-new", "wf-proof-new"), *[(g.name, g.name)] * 3]
    assert [c[2:] for c in calls[1:]] == [
        (port, ("data",), False, False),   # create on a guest that exists: re-verified, no power cycle
        (port, ("data",), False, True),    # verify --power-cycle
        (port, ("hp0",), True, False),     # attach: the new region alone, made by this run
    ]
    assert calls[0][3:] == (("data",), True, True)  # a new guest: made here, power-cycle proof
    assert booting == [True, True, False, False]
    assert len(plugged) == 1 and "ua-pmem-hp0" in plugged[0]
    for report in (new, rerun, verified, attached):
        assert report.ok is False and "the guest never answers" in (report.error or {}).get("message", "")


def test_a_backing_volume_another_domain_uses_is_named_as_such_before_anything_is_made(conn) -> None:
    g = guest_spec("wf-used")
    volume = plan.build(g, FACTS).regions[0].volume
    path = f"{storage.pool_path(_pool(conn))}/{volume}"
    conn.defineXML(f"<domain type='test'><name>wf-user</name><memory>131072</memory><os><type>hvm</type></os>"
                   f"<devices><disk type='file' device='disk'><source file='{path}'/><target dev='vdb'/></disk>"
                   "</devices></domain>")
    conn.made.append("wf-user")
    with pytest.raises(HostError) as info:
        workflow.create(g, workflow.CreateOptions(connect=URI, until="define"), quiet())
    assert str(info.value).startswith(f"backing volume {volume} of region data is used by domain(s) wf-user; ")
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("wf-used")
