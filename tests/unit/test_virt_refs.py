"""Who uses a backing volume (virt.path_users, domain.references): file paths, pool/volume sources,
<qemu:commandline> arguments and nvmprov's metadata, on libvirt's test:///default."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET

import libvirt

from nvmprov import doctor, domain, identity, ledger, storage, virt
from tests.volumes import create_backing

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

MiB = 1 << 20


def users(conn: libvirt.virConnect, path: str) -> list[str]:
    return virt.path_users(conn, [path])[path]

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
        assert users(conn, vol.path()) == ["volume-user"]
        assert virt.path_users(conn, [vol.path()], exclude="volume-user")[vol.path()] == []
        dom.create()  # the live XML too (test driver: no QEMU)
        assert users(conn, vol.path()) == ["volume-user"]
        dom.destroy()
    finally:
        dom.undefine()


def test_a_volume_source_of_another_pool_or_volume_does_not(conn, pool) -> None:
    vol = create_backing(pool, "mine.raw", 16 * MiB, allocation="full")
    create_backing(pool, "theirs.raw", 16 * MiB, allocation="full")
    dom = conn.defineXML(DOMAIN.format(name="volume-other", pool=pool.name(), volume="theirs.raw"))
    try:
        assert users(conn, vol.path()) == []
    finally:
        dom.undefine()


def test_a_volume_source_libvirt_cannot_resolve_is_skipped_not_an_error(conn, pool) -> None:
    vol = create_backing(pool, "held.raw", 16 * MiB, allocation="full")
    held = conn.defineXML(DOMAIN.format(name="volume-held", pool=pool.name(), volume="held.raw"))
    gone = conn.defineXML(DOMAIN.format(name="volume-gone", pool="no-such-pool", volume="x.raw"))
    try:
        assert users(conn, vol.path()) == ["volume-held"]
    finally:
        held.undefine()
        gone.undefine()


def test_references_reads_files_and_volume_sources() -> None:
    xml = DOMAIN.format(name="d", pool="p", volume="v.raw").replace(
        "</devices>", "<memory model='nvdimm'><source><path>/x/n.raw</path></source>"
        "<target><size unit='KiB'>1024</size></target></memory></devices>")
    assert domain.references(xml) == domain.References(frozenset({"/x/n.raw"}), frozenset({("p", "v.raw")}))


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


def _domain_xml(name: str, disk_path: str) -> str:
    dom = ET.Element("domain", type="test")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory").text = "65536"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type").text = "hvm"
    disk = ET.SubElement(ET.SubElement(dom, "devices"), "disk", type="file", device="disk")
    ET.SubElement(disk, "source", file=disk_path)
    ET.SubElement(disk, "target", dev="vda")
    return ET.tostring(dom, encoding="unicode")


def test_path_users_finds_active_and_inactive_domains(conn, pool):
    vol = create_backing(pool, "shared.raw", MiB, allocation="sparse")
    names = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    running = conn.defineXML(_domain_xml(names[0], vol.path()))
    stopped = conn.defineXML(_domain_xml(names[1], vol.path()))
    other = conn.defineXML(_domain_xml(names[2], "/elsewhere/disk.raw"))
    try:
        running.create()
        assert stopped.isActive() == 0
        assert users(conn, vol.path()) == sorted(names[:2])
        assert users(conn, "/nothing/uses/this") == []
    finally:
        running.destroy()
        for d in (running, stopped, other):
            d.undefine()


def test_path_users_ignores_prefix_matches(conn, pool):
    vol = create_backing(pool, "a.raw", MiB, allocation="sparse")
    name = f"u-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(_domain_xml(name, vol.path() + ".old"))
    try:
        assert users(conn, vol.path()) == []
    finally:
        dom.undefine()


def _with_qemu_args(*args: str) -> str:
    xml = DOMAIN.format(name="cxl", pool="p", volume="v.raw").replace(
        "<domain type='test'>", f"<domain type='qemu' xmlns:qemu='{domain.QEMU_NS}'>")
    cmd = "".join(f"<qemu:arg value='{a}'/>" for a in args)
    return xml.replace("</domain>", f"<qemu:commandline>{cmd}</qemu:commandline></domain>")


def test_references_reads_paths_in_qemu_commandline_key_value_arguments() -> None:
    xml = _with_qemu_args("-object", "memory-backend-file,id=cxl-mem0,share=on,mem-path=/pool/cxl-mem0.raw,size=256M",
                          "-object", "memory-backend-file,id=cxl-lsa0,mem-path=/pool/cxl-lsa0.raw",
                          "-drive", "if=none,id=d,file=/pool/disk,,with,,commas.raw",
                          "-chardev", "socket,id=c,path=/run/x.sock", "-netdev", "user,id=n")
    paths = domain.references(xml).paths
    assert {"/pool/cxl-mem0.raw", "/pool/cxl-lsa0.raw", "/pool/disk,with,commas.raw", "/run/x.sock"} <= paths
    assert not any("=" in p for p in paths)


def test_references_reads_paths_in_qemu_commandline_json_arguments() -> None:
    backend = {"qom-type": "memory-backend-file", "id": "cxl-mem1", "share": True, "mem-path": "/pool/cxl-mem1.raw",
               "size": 268435456}
    nested = {"driver": "cxl-type3", "id": "t3", "persistent-memdev": "cxl-mem1",
              "lsa": {"file": {"filename": "/pool/cxl-lsa1.raw"}}, "ports": ["/pool/in-a-list.raw"]}
    xml = _with_qemu_args("-object", json.dumps(backend), "-device", json.dumps(nested))
    assert {"/pool/cxl-mem1.raw", "/pool/cxl-lsa1.raw", "/pool/in-a-list.raw"} <= domain.references(xml).paths


def test_references_keeps_a_broken_json_argument_as_key_value() -> None:
    assert "/pool/x.raw" in domain.references(_with_qemu_args("{not json,mem-path=/pool/x.raw")).paths


def test_references_normalises_paths_and_reads_nvmprov_metadata_regions() -> None:
    xml = DOMAIN.format(name="d", pool="p", volume="v.raw").replace(
        "</devices>", "<disk type='file'><source file='/pool//a/../b.qcow2'/></disk></devices>")
    assert "/pool/b.qcow2" in domain.references(xml).paths
    md = ("<metadata><nvmprov:guest xmlns:nvmprov='https://nvmprov.dev/xmlns/domain/1' version='1'>"
          "<nvmprov:pool name='mypool'/><nvmprov:regions><nvmprov:region name='vp' model='virtio-pmem' "
          "volume='g-pmem-vp.raw'/></nvmprov:regions></nvmprov:guest></metadata>")
    refs = domain.references(xml.replace("<memory", md + "<memory", 1))
    assert ("mypool", "g-pmem-vp.raw") in refs.volumes


def test_a_stopped_guests_virtio_pmem_region_in_its_metadata_is_used_and_not_pruned(conn, pool) -> None:
    """virtio-pmem is never in a stopped managed guest's libvirt XML (start plugs it from the metadata)."""
    vol = create_backing(pool, "g-pmem-vp.raw", 16 * MiB, allocation="full")
    ledger.record(pool, ledger.Entry(vol.name(), "g-stopped", identity.of(conn).key, "backing"))
    md = (f"<metadata><nvmprov:guest xmlns:nvmprov='{domain.METADATA_NS}' version='1'>"
          f"<nvmprov:pool name='{pool.name()}'/><nvmprov:regions><nvmprov:region name='vp' model='virtio-pmem' "
          f"volume='{vol.name()}'/></nvmprov:regions></nvmprov:guest></metadata>")
    xml = _domain_xml("g-stopped", "/elsewhere/root.qcow2").replace("<memory>", md + "<memory>", 1)
    dom = conn.defineXML(xml)
    try:
        assert users(conn, vol.path()) == ["g-stopped"]
        assert vol.name() not in [left.name for left in doctor.leftovers(conn, pool)]
    finally:
        dom.undefine()
    assert users(conn, vol.path()) == []
    assert vol.name() in [left.name for left in doctor.leftovers(conn, pool)]

