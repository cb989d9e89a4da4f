"""Ownership (issue 15): nvmprov deletes only what it made. A volume someone else put in the pool
under the name nvmprov would give a region (same size, mode 0600) survives `create`, an adopting
create that fails and rolls back, `destroy --purge`, and `prune`, with an unchanged sha256.

Nothing boots: every create stops at `--until define`. Guests and volumes are named e2e-own-*.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmprov import sizes

from .conftest import _require_host, nvmprov, write_spec

pytestmark = pytest.mark.e2e

POOL_DIR = Path("/var/lib/nvmprov/pool")


@pytest.fixture(scope="module", autouse=True)
def host() -> None:
    _require_host()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def domains() -> set[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


@pytest.fixture
def foreign() -> Iterator[Path]:
    """e2e-own-a-pmem-data.raw, made with virsh (not nvmprov): 64 MiB raw, 0600, user data in it."""
    name = "e2e-own-a-pmem-data.raw"
    subprocess.run(["virsh", "-q", "vol-create-as", "nvmprov", name, str(sizes.backing_bytes_for(64 * 1024**2)),
                    "--format", "raw"], check=True, capture_output=True)
    path = POOL_DIR / name
    path.chmod(0o600)
    with open(path, "r+b") as fh:
        fh.write(b"precious user data " * 1000)
    yield path
    nvmprov("destroy", "e2e-own-a", "--purge", "--yes")
    subprocess.run(["virsh", "-q", "vol-delete", "--pool", "nvmprov", name], capture_output=True)


def spec(tmp_path: Path, *, adopt: bool = False, image: str | None = None) -> Path:
    region: dict[str, object] = {"name": "data", "size": "64MiB"}
    if adopt:
        region["volume"] = "e2e-own-a-pmem-data.raw"
    body: dict[str, object] = {"name": "e2e-own-a", "memory": "512MiB", "pmem": [region]}
    if image:
        body["image"] = image
    return write_spec(tmp_path, "e2e-own-a", body)


def test_foreign_volume_under_nvmprov_name_survives_create_destroy_prune_and_rollback(
        tmp_path: Path, foreign: Path) -> None:
    before = sha256(foreign)
    assert foreign.stat().st_mode & 0o777 == 0o600

    # create: refused, one line naming the volume and both ways out; nothing made
    proc = nvmprov("create", str(spec(tmp_path)), "--until", "define")
    assert proc.returncode == 3, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("nvmprov: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"volume {foreign.name} ({foreign}) is in the way of region data of guest e2e-own-a" in errors[0]
    assert f"`volume: {foreign.name}`" in errors[0] and "virsh vol-delete" in errors[0]
    assert "e2e-own-a" not in domains() and sha256(foreign) == before

    # destroy --purge of a guest that has nothing: the volume is not its own
    proc = nvmprov("destroy", "e2e-own-a", "--purge", "--yes")
    assert proc.returncode == 3 and "nvmprov keeps nothing for it" in proc.stderr, proc.stderr
    assert sha256(foreign) == before

    # prune never offers it, even named
    proc = nvmprov("prune", "--only", foreign.name, "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"unused": [], "deleted": []}
    assert sha256(foreign) == before

    # adopted by a create that fails (no such image): the rollback keeps it
    proc = nvmprov("create", str(spec(tmp_path, adopt=True, image="/nope.qcow2")), "--until", "define")
    assert proc.returncode == 3, proc.stderr
    assert f"rolled back: volume {foreign.name}" not in proc.stderr
    assert "e2e-own-a" not in domains() and sha256(foreign) == before

    # adopted by a create that works, then destroy --purge: handed back, not deleted
    proc = nvmprov("create", str(spec(tmp_path, adopt=True)), "--until", "define")
    assert proc.returncode == 0, proc.stderr
    assert f"adopting backing volume {foreign.name}" in proc.stderr
    proc = nvmprov("destroy", "e2e-own-a", "--purge", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"kept adopted volumes {foreign.name}" in proc.stderr
    assert "e2e-own-a" not in domains() and sha256(foreign) == before
    assert not (POOL_DIR / "e2e-own-a-root.qcow2").exists() and not (POOL_DIR / "e2e-own-a-seed.iso").exists()

    # and prune still does not touch it
    proc = nvmprov("prune", "--only", foreign.name, "--yes", "--json")
    assert json.loads(proc.stdout)["deleted"] == [] and sha256(foreign) == before


def test_destroy_purge_after_destroy_deletes_what_nvmprov_kept(tmp_path: Path) -> None:
    name = "e2e-own-b"
    path = write_spec(tmp_path, name, {"name": name, "memory": "512MiB", "pmem": [{"name": "data", "size": "16MiB"}]})
    try:
        assert nvmprov("create", str(path), "--until", "define").returncode == 0
        proc = nvmprov("destroy", name)
        assert proc.returncode == 0 and f"kept backing volumes (region data): {name}-pmem-data.raw" in proc.stderr
        assert (POOL_DIR / f"{name}-pmem-data.raw").exists()
        proc = nvmprov("destroy", name, "--purge", "--yes")
        assert proc.returncode == 0, proc.stderr
        assert f"no domain named {name}" in proc.stderr
        assert f"deleted backing volume {name}-pmem-data.raw (--purge)" in proc.stderr
        assert not (POOL_DIR / f"{name}-pmem-data.raw").exists()
        proc = nvmprov("destroy", name, "--purge", "--yes")
        assert proc.returncode == 3 and "nvmprov keeps nothing for it" in proc.stderr, proc.stderr
    finally:
        nvmprov("destroy", name, "--purge", "--yes")


RECORDER = """
import sys
import libvirt
from nvmprov import identity, ledger, storage
conn = libvirt.open("qemu:///system")
pool = storage.pool_of(conn, sys.argv[1])
hv = identity.of(conn).key
for i in range(5):
    ledger.record(pool, ledger.Entry(f"{sys.argv[2]}-{i}.raw", sys.argv[2], hv, "backing"))
"""


def test_concurrent_ledger_writers_lose_no_record(tmp_path: Path) -> None:
    """Six nvmprov processes record five volumes each into one pool at once: all 30 are there."""
    import shutil
    import sys
    import uuid

    import libvirt

    from nvmprov import ledger, storage

    from .conftest import REPO

    conn = libvirt.open("qemu:///system")
    name = f"e2e-own-{uuid.uuid4().hex[:8]}"
    parent = Path("/var/tmp") / name
    pool = storage.ensure_pool(conn, name, str(parent / "pool"))
    try:
        procs = [subprocess.Popen([sys.executable, "-c", RECORDER, name, f"w{n}"], cwd=REPO) for n in range(6)]
        assert [p.wait(timeout=300) for p in procs] == [0] * 6
        book = ledger.read(pool)
        assert len(book.entries) == 30 and book.generation == 30
        assert sorted(v.name() for v in pool.listAllVolumes(0)) == sorted(ledger.SLOTS)
    finally:
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        pool.undefine()
        conn.close()
        shutil.rmtree(parent, ignore_errors=True)
