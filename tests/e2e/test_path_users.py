"""Who uses a volume, on the real qemu:///system (the test driver drops <qemu:commandline>): a
domain that names its backing and label files only in QEMU arguments, as `model: cxl` guests do,
keeps prune and detach --purge away from them. Defines a domain, boots nothing (about 1 s)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from nvmprov import attach, doctor, domain, identity, ledger, storage, virt
from tests.volumes import create_backing

pytestmark = pytest.mark.e2e

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

MiB = 1 << 20
GUEST = "e2e-xmlmodel-qemu-args"


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    if os.geteuid() != 0:
        pytest.fail("e2e tests need root (qemu:///system); run them through scripts/test.sh")
    c = libvirt.open("qemu:///system")
    yield c
    c.close()


@pytest.fixture
def pool(conn: libvirt.virConnect, tmp_path, monkeypatch) -> Iterator[libvirt.virStoragePool]:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path / "state"))
    parent = Path(tempfile.mkdtemp(prefix="nvmprov-e2e-users-", dir="/var/tmp"))
    p = storage.ensure_pool(conn, f"e2e-{uuid.uuid4().hex[:8]}", str(parent / "pool"))
    yield p
    for vol in p.listAllVolumes(0):
        vol.delete(0)
    p.destroy()
    p.undefine()
    shutil.rmtree(parent)


def _domain_xml(mem_path: str, label_path: str) -> str:
    label = {"qom-type": "memory-backend-file", "id": "cxl-lsa0", "share": True, "mem-path": label_path,
             "size": MiB}
    args = ["-object", f"memory-backend-file,id=cxl-mem0,share=on,mem-path={mem_path},size={16 * MiB}",
            "-object", json.dumps(label)]
    cmd = "".join(f"<qemu:arg value='{a}'/>" for a in args)
    return (f"<domain type='qemu' xmlns:qemu='{domain.QEMU_NS}'><name>{GUEST}</name>"
            "<memory unit='KiB'>262144</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>"
            f"<devices/><qemu:commandline>{cmd}</qemu:commandline></domain>")


def test_prune_and_detach_purge_keep_volumes_named_only_in_qemu_arguments(conn, pool) -> None:
    hv = identity.of(conn).key
    mem, lsa, free = (create_backing(pool, n, MiB, allocation="sparse")
                      for n in ("cxl-mem0.raw", "cxl-lsa0.raw", "unused.raw"))
    for vol in (mem, lsa, free):
        ledger.record(pool, ledger.Entry(vol.name(), "e2e-xmlmodel-gone", hv, "backing"))
    assert virt.lookup(conn, GUEST) is None, f"a domain {GUEST} is left from an earlier run: undefine it"
    dom = conn.defineXML(_domain_xml(mem.path(), lsa.path()))
    try:
        found = virt.path_users(conn, [mem.path(), lsa.path(), free.path()])
        assert found == {mem.path(): [GUEST], lsa.path(): [GUEST], free.path(): []}
        assert [v.name for v in doctor.leftovers(conn, pool)] == ["unused.raw"]
        assert doctor.prune(conn, pool.name(), ["cxl-mem0.raw", "cxl-lsa0.raw", "unused.raw"]) == ["unused.raw"]
        for vol in (mem, lsa):
            notes: list[str] = []
            assert not attach._maybe_purge(conn, pool.name(), vol.name(), vol.path(), ledger.Purge.asked(True, False),
                                           notes, owner=(hv, "e2e-xmlmodel-gone", ()))
            assert f"still used by {GUEST}" in notes[0]
        assert sorted(v.name() for v in pool.listAllVolumes(0) if v.name().endswith(".raw")) == [
            "cxl-lsa0.raw", "cxl-mem0.raw"]
    finally:
        dom.undefine()
