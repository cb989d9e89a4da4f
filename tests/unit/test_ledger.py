"""The ownership ledger (nvmprov.ledger): crash-safe slots, and the rules of what nvmprov may use
and delete, on libvirt's test driver (its volumes' bytes kept by tests/unit/conftest.py)."""

from __future__ import annotations

import pytest

from nvmprov import identity, ledger, storage
from nvmprov.errors import StorageError

MiB = 1024**2
A = ledger.Entry("demo-pmem-data.raw", "demo", "hv1", "backing")
B = ledger.Entry("x.raw", "web", "hv1", "backing", adopted=True)


def test_a_slot_round_trips_and_detects_any_change() -> None:
    book = ledger.Ledger(7, (A, B))
    data = ledger.encode(book)
    assert ledger.decode(data) == ledger.Ledger(7, (A, B))
    assert ledger.decode(data[:-1]) is None                       # cut short (crash mid-write)
    assert ledger.decode(data.replace(b"demo", b"dema")) is None  # altered
    assert ledger.decode(b"") is None


def test_the_newest_valid_slot_wins_and_a_torn_write_falls_back() -> None:
    old, new = ledger.encode(ledger.Ledger(3, (A,))), ledger.encode(ledger.Ledger(4, (A, B)))
    assert ledger.newest([old, new]) == ledger.Ledger(4, (A, B))
    assert ledger.newest([old, new[:10]]) == ledger.Ledger(3, (A,))
    assert ledger.newest([None, None]) == ledger.Ledger()
    assert ledger.newest([b"junk", None]) is None  # a slot exists, none valid: do not guess


def test_rules_only_own_volumes_may_be_deleted() -> None:
    assert ledger.may_delete(A, "hv1", "demo")
    assert not ledger.may_delete(A, "hv2", "demo")   # same name on another hypervisor
    assert not ledger.may_delete(A, "hv1", "web")
    assert not ledger.may_delete(None, "hv1", "demo")
    assert not ledger.may_delete(B, "hv1", "web")
    assert ledger.may_delete(B, "hv1", "web", adopted_too=True)


def test_update_writes_the_other_slot_each_generation(conn, pool) -> None:
    hv = identity.of(conn).key
    ledger.record(pool, A)
    assert storage.lookup(pool, ledger.SLOTS[1]) is not None   # generation 1
    ledger.record(pool, B)
    assert {storage.lookup(pool, s) is not None for s in ledger.SLOTS} == {True}
    assert ledger.read(pool) == ledger.Ledger(2, (A, B))
    ledger.forget(pool, hv, [A.volume])
    assert ledger.read(pool).entries == (B,)
    # a crash that deleted the slot it was about to write: the other one is read
    storage.delete(pool, ledger.SLOTS[ledger.read(pool).generation % 2])
    assert ledger.read(pool).generation == 2


def test_both_slots_unreadable_is_an_error_not_an_empty_ledger(conn, pool) -> None:
    for slot in ledger.SLOTS:
        storage.write_small(pool, slot, b"not a ledger")
    with pytest.raises(StorageError, match="will not guess"):
        ledger.read(pool)


def test_identity_is_the_daemon_mark_not_the_uri() -> None:
    caps = "<capabilities><host><uuid>57DBC5B1-46d8-439b-ad5a-533cd39e71cc</uuid></host></capabilities>"
    mark = "4b94cc9c-8e1f-4a6e-babc-315cd6fdf90f"
    a = identity.Hypervisor(identity.host_uuid(caps, "qemu:///system"), "system", "qemu:///system", mark)
    b = identity.Hypervisor("0aa4cf08-46d8-439b-ad5a-533cd39e71cc", "session", "qemu+ssh://root@h/system", mark)
    assert a.key == b.key == f"libvirtd-{mark}"   # host UUID random per daemon start here: not in the key
    assert identity.driver("qemu:///system") == identity.driver("qemu+ssh://root@127.0.0.1/system") == "system"
    assert identity.host_uuid("<capabilities><host/></capabilities>", "test:///default").startswith("uri-")
    assert identity.Hypervisor("u", "default", "test:///default").key == "u-default"


def test_the_test_driver_has_no_secrets_and_falls_back(conn) -> None:
    hv = identity.of(conn)
    assert hv.mark is None and hv.key == identity.of(conn).key


# ---------------------------------------------------------------------------------------------
# state under the hypervisor's identity


def test_one_guest_name_on_two_hypervisors_keeps_two_states(tmp_path, monkeypatch) -> None:
    from nvmprov import state

    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    one = identity.Hypervisor("57dbc5b1-46d8-439b-ad5a-533cd39e71cc", "system", "qemu:///system")
    alias = identity.Hypervisor(one.host_uuid, "system", "qemu+ssh://root@127.0.0.1/system")
    other = identity.Hypervisor(one.host_uuid, "session", "qemu:///session")
    a, b = state.guest_files("demo", one), state.guest_files("demo", other)
    assert a.dir != b.dir and state.guest_files("demo", alias).dir == a.dir
    state.write_private(a.client_key, "key one")
    state.write_private(b.client_key, "key two")
    assert a.client_key.read_text() == "key one"
    assert {h["uri"] for h in state.known_hypervisors()} == {"qemu+ssh://root@127.0.0.1/system", "qemu:///session"}


def test_the_old_layout_moves_under_the_first_hypervisor_that_has_the_guest(tmp_path, monkeypatch) -> None:
    from nvmprov import state

    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    old = state.guest_files("demo")  # state/guests/demo, as nvmprov kept it before
    state.write_private(old.client_key, "the key")
    hv = identity.Hypervisor("57dbc5b1-46d8-439b-ad5a-533cd39e71cc", "system", "qemu:///system")
    files = state.adopt_legacy("demo", hv, "6f1d9c62-7d2a-4a4b-9a3e-0000000000bb")
    assert files.client_key.read_text() == "the key" and not old.dir.exists()
    assert state.recorded_domain_uuid(files) == "6f1d9c62-7d2a-4a4b-9a3e-0000000000bb"
    # a second hypervisor finds nothing to take, and the first keeps its files
    other = identity.Hypervisor(hv.host_uuid, "session", "qemu:///session")
    assert not state.adopt_legacy("demo", other, "x").dir.exists()
    assert files.client_key.exists()


def test_reading_commands_find_old_layout_files_without_moving_them(tmp_path, monkeypatch) -> None:
    from nvmprov import state

    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    old = state.guest_files("demo")
    state.write_private(old.client_key, "the key")
    hv = identity.Hypervisor("57dbc5b1-46d8-439b-ad5a-533cd39e71cc", "system", "qemu:///system", "m")
    assert state.current_files("demo", hv).dir == old.dir and old.client_key.exists()   # list, show
    assert state.adopt_legacy("demo", hv, "u").dir != old.dir and not old.dir.exists()  # start, verify, ...
    assert state.current_files("demo", hv).client_key.read_text() == "the key"


def test_detach_purge_deletes_only_what_nvmprov_made_for_that_domain(conn, pool) -> None:
    from nvmprov import attach

    hv = identity.of(conn).key
    for name in ("made.raw", "foreign.raw", "adopted.raw", "old.raw"):
        storage.make_backing(pool, name, MiB, allocation="sparse")
    ledger.record(pool, ledger.Entry("made.raw", "web", hv, "backing"))
    ledger.record(pool, ledger.Entry("adopted.raw", "web", hv, "backing", adopted=True))
    base = storage.pool_path(pool)

    def purge(volume: str, *, adopted: bool = False, made: tuple[str, ...] = ()) -> tuple[bool, list[str]]:
        notes: list[str] = []
        done = attach._maybe_purge(conn, pool.name(), volume, f"{base}/{volume}",
                                   ledger.Purge.asked(True, adopted), notes, owner=(hv, "web", made))
        return done, notes

    assert purge("made.raw") == (True, [])
    done, notes = purge("foreign.raw")
    assert not done and "nvmprov did not make it for web" in notes[0]
    done, notes = purge("adopted.raw")
    assert not done and "--purge-adopted deletes it" in notes[0]
    assert purge("adopted.raw", adopted=True) == (True, [])
    assert purge("old.raw", made=("old.raw",)) == (True, [])   # a guest made before the ledger: its metadata
    assert sorted(v.name() for v in pool.listAllVolumes(0) if not v.name().startswith("nvmprov-")) == ["foreign.raw"]


def test_list_all_shows_each_hypervisor_once_and_replays_no_program(tmp_path, monkeypatch) -> None:
    from nvmprov import guests, state

    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    here = identity.Hypervisor("u", "default", "test:///default")
    state.guest_files("g1", here)                       # the current one, recorded under its own key
    away = identity.Hypervisor("h", "system", "qemu+ssh://root@hv9/system?command=/tmp/evil", "m2")
    state.guest_files("g2", away)                       # reached once with --connect and a program
    gone = identity.Hypervisor("h", "system", "qemu+unix:///system?socket=/nonexistent/sock", "m3")
    state.guest_files("g3", gone)
    rows = guests.list_all("test:///default")
    by_name = {r["name"]: (r["state"], r["uri"]) for r in rows}
    assert by_name["g2"] == ("not asked", away.uri)     # libvirt never ran /tmp/evil
    assert by_name["g3"] == ("not asked", gone.uri)     # a socket named once on --connect: not replayed either
    assert "g1" not in by_name                           # no domain g1 on the test driver: not a guest there


def test_list_all_puts_the_current_hypervisor_first_whatever_the_uris(tmp_path, monkeypatch) -> None:
    from nvmprov import guests, state

    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(guests, "list_guests", lambda _conn, _hv=None: [{"name": "b-here"}, {"name": "z-here"}])
    gone = identity.Hypervisor("h", "system", "qemu+unix:///system?socket=/nonexistent/sock", "m3")
    state.guest_files("a-away", gone)                   # its URI sorts before test:///default
    rows = guests.list_all("test:///default")
    assert [r["name"] for r in rows] == ["b-here", "z-here", "a-away"]


def test_list_all_follows_connect(monkeypatch) -> None:
    from nvmprov import cli, guests

    asked: list[str | None] = []

    def list_all_text(*, fmt: str, connect: str | None = None) -> str:
        asked.append(connect)
        return ""

    monkeypatch.setattr(guests, "list_all_text", list_all_text)
    assert cli.main(["list", "--all", "--connect", "test:///default"]) == 0
    assert asked == ["test:///default"]


class _NoSecrets:
    """A qemu connection whose daemon will not give nvmprov its identity secret."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def getCapabilities(self) -> str:  # noqa: N802 - libvirt's name
        return "<capabilities><host><uuid>57dbc5b1-46d8-439b-ad5a-533cd39e71cc</uuid></host></capabilities>"

    def getURI(self) -> str:  # noqa: N802 - libvirt's name
        return self.uri

    def secretLookupByUsage(self, *_a: object) -> None:  # noqa: N802 - libvirt's name
        import libvirt

        raise libvirt.libvirtError("operation forbidden: read only access prevents virSecretLookupByUsage")


def test_a_qemu_daemon_without_its_identity_secret_is_an_error_not_a_host_uuid_key() -> None:
    from nvmprov.errors import HostError

    with pytest.raises(HostError, match=r"identity secret .* on qemu\+ssh://root@h/system: .*read only access"):
        identity.of(_NoSecrets("qemu+ssh://root@h/system"))  # type: ignore[arg-type]
    assert identity.of(_NoSecrets("test:///default")).key == "57dbc5b1-46d8-439b-ad5a-533cd39e71cc-default"  # type: ignore[arg-type]


def test_purge_adopted_implies_purge_and_each_purge_deletes_its_own_kinds() -> None:
    assert ledger.Purge.asked(False, True) == ledger.Purge(volumes=True, adopted=True)
    assert ledger.Purge.asked(True, False) == ledger.Purge(volumes=True, adopted=False)
    made, adopted = ledger.Entry("v", "g", "h", "backing"), ledger.Entry("a", "g", "h", "backing", adopted=True)
    overlay = ledger.Entry("o", "g", "h", "overlay")
    table = {ledger.Purge(): (True, False, False), ledger.Purge.asked(True, False): (True, True, False),
             ledger.Purge.asked(False, True): (True, True, True)}
    for purge, expect in table.items():
        assert (purge.deletes(overlay), purge.deletes(made), purge.deletes(adopted)) == expect


def test_a_slot_rewritten_while_it_is_read_is_read_again(conn, pool, monkeypatch) -> None:
    # Eight creates at once: a writer deleted and re-made the older slot between a reader's lookup
    # and its download; the reader failed with "Storage volume not found" (CI, stop 21).
    hv = identity.of(conn).key
    ledger.record(pool, A)
    ledger.record(pool, B)
    real, failed = storage.read_small, []

    def read_small(vol, max_bytes):
        if not failed:
            failed.append(vol.name())
            raise StorageError("Storage volume not found: no storage vol with matching name")
        return real(vol, max_bytes)

    monkeypatch.setattr(storage, "read_small", read_small)
    assert ledger.read(pool) == ledger.Ledger(2, (A, B))
    assert failed  # the failure happened, and the slot was read again
    ledger.forget(pool, hv, [A.volume, B.volume])


def test_a_slot_that_keeps_failing_is_an_error(conn, pool, monkeypatch) -> None:
    ledger.record(pool, A)

    def read_small(vol, max_bytes):
        raise StorageError("I/O error")

    monkeypatch.setattr(storage, "read_small", read_small)
    with pytest.raises(StorageError, match="reading nvmprov-ledger-b.json.*I/O error"):
        ledger.read(pool)


def _taken(pool, operation: int) -> bool:
    """Whether the ledger's slot lock refuses OPERATION (non-blocking) from another open file."""
    import fcntl
    import os

    from nvmprov import state

    fd = os.open(state.state_root() / "locks" / f"host-ledger-slots-{pool.UUIDString()}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_writer_never_replaces_a_slot_while_a_reader_downloads_it(conn, pool, monkeypatch) -> None:
    # libvirt refuses to delete a volume a reader is downloading ("still in use"): eight creates
    # at once failed on it in CI. Readers share the slots' lock; a writer replacing a slot holds it.
    import fcntl

    ledger.record(pool, A)
    seen: list[tuple[str, bool]] = []
    real_read, real_delete = storage.read_small, storage.delete

    def read_small(vol, max_bytes):
        seen.append(("read", _taken(pool, fcntl.LOCK_EX)))   # shared: a writer must wait
        return real_read(vol, max_bytes)

    def delete(p, name):
        seen.append(("delete", _taken(pool, fcntl.LOCK_SH)))  # exclusive: a reader must wait
        return real_delete(p, name)

    monkeypatch.setattr(storage, "read_small", read_small)
    monkeypatch.setattr(storage, "delete", delete)
    ledger.record(pool, B)
    assert ("read", True) in seen and ("delete", True) in seen and all(held for _, held in seen), seen
