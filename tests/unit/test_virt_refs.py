"""Who uses a backing volume: file paths and pool/volume sources, on libvirt's test:///default."""

from __future__ import annotations

import libvirt

from nvmprov import doctor, identity, ledger, storage, virt
from tests.volumes import create_backing

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

MiB = 1 << 20

DOMAIN = """\
<domain type='test'>
  <name>{name}</name>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='volume' device='disk'>
      <source pool='{pool}' volume='{volume}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def test_a_volume_source_counts_as_using_the_backing_volume(conn, pool) -> None:
    vol = create_backing(pool, "other-pmem-data.raw", 16 * MiB, allocation="full")
    dom = conn.defineXML(DOMAIN.format(name="volume-user", pool=pool.name(), volume=vol.name()))
    try:
        assert virt.domains_using_path(conn, vol.path()) == ["volume-user"]
        assert virt.domains_using_path(conn, vol.path(), exclude="volume-user") == []
        dom.create()  # the live XML too (test driver: no QEMU)
        assert virt.domains_using_path(conn, vol.path()) == ["volume-user"]
        dom.destroy()
    finally:
        dom.undefine()


def test_a_volume_source_of_another_pool_or_volume_does_not(conn, pool) -> None:
    vol = create_backing(pool, "mine.raw", 16 * MiB, allocation="full")
    create_backing(pool, "theirs.raw", 16 * MiB, allocation="full")
    dom = conn.defineXML(DOMAIN.format(name="volume-other", pool=pool.name(), volume="theirs.raw"))
    try:
        assert virt.domains_using_path(conn, vol.path()) == []
    finally:
        dom.undefine()


def test_a_volume_source_libvirt_cannot_resolve_is_skipped_not_an_error(conn, pool) -> None:
    vol = create_backing(pool, "held.raw", 16 * MiB, allocation="full")
    held = conn.defineXML(DOMAIN.format(name="volume-held", pool=pool.name(), volume="held.raw"))
    gone = conn.defineXML(DOMAIN.format(name="volume-gone", pool="no-such-pool", volume="x.raw"))
    try:
        assert virt.domains_using_path(conn, vol.path()) == ["volume-held"]
    finally:
        held.undefine()
        gone.undefine()


def test_references_reads_files_and_volume_sources() -> None:
    xml = DOMAIN.format(name="d", pool="p", volume="v.raw").replace(
        "</devices>", "<memory model='nvdimm'><source><path>/x/n.raw</path></source>"
        "<target><size unit='KiB'>1024</size></target></memory></devices>")
    assert virt.references(xml) == ({"/x/n.raw"}, {("p", "v.raw")})


def test_prune_does_not_offer_a_volume_a_domain_uses_by_pool_and_name(conn, pool) -> None:
    vol = create_backing(pool, "other-pmem-data.raw", 16 * MiB, allocation="full")
    create_backing(pool, "gone-pmem-data.raw", 16 * MiB, allocation="full")
    create_backing(pool, "users-pmem-own.raw", 16 * MiB, allocation="full")  # not nvmprov's
    hv = identity.of(conn).key
    for name in ("other-pmem-data.raw", "gone-pmem-data.raw"):
        ledger.record(pool, ledger.Entry(name, "g", hv, "backing"))
    dom = conn.defineXML(DOMAIN.format(name="volume-user", pool=pool.name(), volume=vol.name()))
    try:
        assert [left.name for left in doctor.leftovers(conn, pool)] == ["gone-pmem-data.raw"]
    finally:
        dom.undefine()


def test_prune_offers_stale_built_in_images_no_overlay_uses_never_the_current_one(conn, pool) -> None:
    from nvmprov import image

    current = image.builtin_volume_names()
    stale = "nvmprov-debian12-000000000000"
    for name in (*current, f"{stale}.qcow2", f"{stale}-vmlinuz", f"{stale}-initrd.img",
                 "nvmprov-debian12-111111111111.qcow2", "nvmprov-debian12-notadigest.qcow2"):
        if storage.lookup(pool, name) is None:
            storage.make_backing(pool, name, MiB, allocation="sparse")
    dom = conn.defineXML(DOMAIN.format(name="old-image-user", pool=pool.name(),
                                       volume="nvmprov-debian12-111111111111.qcow2"))
    try:
        offered = [left.name for left in doctor.leftovers(conn, pool)]
    finally:
        dom.undefine()
    assert [n for n in offered if n.startswith("nvmprov-debian12-")] == [
        f"{stale}-initrd.img", f"{stale}-vmlinuz", f"{stale}.qcow2"]
    assert doctor.prune(conn, pool.name(), [f"{stale}.qcow2", current[0]]) == [f"{stale}.qcow2"]
    assert storage.lookup(pool, current[0]) is not None
