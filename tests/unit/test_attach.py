"""attach/detach decisions on domain XML, without libvirt: what a domain can take, and the fix."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from nvmprov import attach, domain, ledger, plan, spec
from nvmprov.cli import exit_status
from nvmprov.errors import UsageError
from nvmprov.sizes import GiB, MiB

FACTS = plan.HostFacts(builtin_volumes=("base.qcow2", "vmlinuz", "initrd.img"))
CTX = domain.RenderContext(uuid="6f1d9c62-7d2a-4a4b-9a3e-0000000000aa", ssh_port=2222, pool_dir="/p")
GUEST = """\
name: g
hotplug: {slots: 2, headroom: 1GiB}
pmem:
  - {name: nv, size: 256MiB}
  - {name: vp, size: 64MiB, model: virtio-pmem}
"""

# A domain as virt-install makes it: no maxMemory, no NUMA, no root port to spare.
FOREIGN = """\
<domain type='qemu'>
  <name>plain</name>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'><source file='/x.qcow2'/><target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></disk>
    <controller type='pci' index='1' model='pcie-root-port'><address type='pci' bus='0x00' slot='0x02'/></controller>
  </devices>
</domain>
"""


def managed_xml(text: str = GUEST) -> str:
    """As the running guest's live XML: its virtio-pmem hot-plugged into its own root port."""
    return domain.render(plan.build(spec.loads(text).guests[0], FACTS), replace(CTX, include_virtio_pmem=True))


def req(**kw: object) -> attach.AttachRequest:
    base = {"region": "new", "size_bytes": 512 * MiB, "model": "nvdimm", "live": True, "config": False}
    return attach.AttachRequest(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("live", "config", "model", "running", "want"), [
    (False, False, "nvdimm", True, (True, True)),
    (False, False, "nvdimm", False, (False, True)),
    (False, False, "virtio-pmem", True, (True, False)),
    (False, False, "virtio-pmem", False, (False, False)),
    (True, False, "nvdimm", True, (True, False)),
    (False, True, "virtio-pmem", True, (False, True)),
])
def test_targets_default_to_what_works(live: bool, config: bool, model: str, running: bool,
                                       want: tuple[bool, bool]) -> None:
    assert attach.targets(live=live, config=config, model=model, running=running) == want  # type: ignore[arg-type]


def test_managed_guest_takes_nvdimm_live_and_virtio_pmem_live() -> None:
    xml = managed_xml()
    assert attach.attach_problems(xml, req(), running=True) == []
    assert attach.attach_problems(xml, req(model="virtio-pmem"), running=True) == []


@pytest.mark.parametrize(("edit", "request_kw", "running", "expect"), [
    # nvdimm live into a QEMU started without one: the measured refusal, with both ways out.
    (lambda x: x.replace('<memory model="nvdimm"', '<memory model="dimm"'), {}, True,
     ["missing 'nvdimm' in '-M'", "--model virtio-pmem", "--config"]),
    (lambda x: x, {"live": True}, False, ["not running", "drop --live"]),
    (lambda x: x.replace("<acpi />", ""), {}, True, ["no ACPI", "<acpi/>"]),
    (lambda x: x.replace("<numa>", "<numx>").replace("</numa>", "</numx>"), {}, True, ["no NUMA cell", "<cell"]),
    (lambda x: x, {"size_bytes": 2 * GiB}, True, ["raise <maxMemory> to at least", "smaller --size"]),
    (lambda x: x.replace("slots=\"4\"", "slots=\"2\""), {}, True, ["memory slots", "are taken"]),
    (lambda x: x, {"model": "virtio-pmem", "config": True, "live": False}, True,
     ["virtio-pmem memory device info is not handled yet", "--live"]),
    (lambda x: x, {"region": "nv"}, True, ["already has a region named nv"]),
    (lambda x: x, {"model": "virtio-pmem", "label_bytes": 128 * 1024}, True, ["--label is for nvdimm only"]),
])
def test_problem_names_the_fix(edit, request_kw, running, expect) -> None:  # type: ignore[no-untyped-def]
    xml = edit(managed_xml())
    problems = attach.attach_problems(xml, req(**request_kw), running=running)
    text = "\n".join(problems)
    for fragment in expect:
        assert fragment in text, (fragment, problems)


def test_every_spare_root_port_used_refuses_virtio_pmem() -> None:
    xml = managed_xml(GUEST.replace("slots: 2", "slots: 0"))   # no spare ports at all
    problems = attach.attach_problems(xml, req(model="virtio-pmem", size_bytes=64 * MiB), running=True)
    assert any("no free hot-pluggable pcie-root-port" in p for p in problems), problems


def test_foreign_domain_gets_the_full_list_of_changes() -> None:
    problems = attach.attach_problems(FOREIGN, req(model="virtio-pmem"), running=True)
    text = "\n".join(problems)
    assert "no <maxMemory>" in text and "<maxMemory slots='4' unit='KiB'>" in text
    assert "no NUMA cell" in text
    assert "no free hot-pluggable pcie-root-port" in text   # its only port holds the disk
    assert "power the domain off and start it again" in text


def test_no_max_memory_suggestion_covers_ram_region_and_headroom() -> None:
    (problem,) = [p for p in attach.attach_problems(FOREIGN, req(), running=False) if "maxMemory" in p]
    kib = int(problem.split("unit='KiB'>")[1].split("<")[0])
    assert kib * 1024 == 1 * GiB + 512 * MiB + attach.SUGGESTED_HEADROOM_BYTES


def test_parse_counts_every_memory_device_against_slots_and_max_memory() -> None:
    d = domain.parse(managed_xml())
    assert d.slots == 4 and len(d.devices) == 2 and d.free_slots == 2
    assert d.ram_bytes == 1 * GiB
    assert d.device_bytes == 256 * MiB + 64 * MiB
    assert d.headroom_bytes == 1 * GiB
    assert {p.alias for p in d.free_root_ports} == {"ua-port-spare0", "ua-port-spare1"}
    assert d.free_dimm_slot() == 1


def test_parse_live_address_base() -> None:
    live = managed_xml().replace("<address type=\"dimm\" slot=\"0\" />",
                                 "<address type='dimm' slot='0' base='0x100000000'/>")
    dev = domain.parse(live).device("ua-pmem-nv")
    assert dev is not None
    assert dev.base == 0x100000000 and dev.dimm_slot == 0 and dev.shared


def test_foreign_region_plan_takes_free_slot_and_port() -> None:
    d = domain.parse(managed_xml())
    r = attach.foreign_region_plan(d, req(model="virtio-pmem", size_bytes=100 * MiB), "x-pmem-new.raw")
    assert (r.pci_bus, r.pci_slot) == (2, 0x11)   # spare0: after the guest's own virtio-pmem port
    assert r.backing_bytes == 100 * MiB and r.alias == "ua-pmem-new" and r.dimm_slot is None
    n = attach.foreign_region_plan(d, req(label_bytes=128 * 1024), "x-pmem-new.raw")
    assert n.dimm_slot == 1 and n.label_bytes == 2 * MiB and n.pci_bus is None
    assert 'access="shared"' in domain.region_device_xml(n, "/p")


def test_volume_name_escapes_foreign_names_instead_of_folding_them() -> None:
    assert attach.volume_name("Web_Server.01", "data") == "_57eb_5f_53erver_2e01.domain.data.raw"
    assert attach.volume_name("demo", "x") == "demo.domain.x.raw"
    assert attach.volume_name("web_01", "d") != attach.volume_name("web-01", "d")


def test_recorded_spec_keeps_domain_slots_and_max_memory() -> None:
    g = spec.loads(GUEST).guests[0]
    before = plan.build(g, FACTS)
    entry = attach.region_spec(req(region="more", size_bytes=128 * MiB), managed=True)
    assert entry["filesystem"] == "ext4" and entry["mount"] == "/mnt/more"
    after_json = attach.managed_spec_json(g.model_dump_json(by_alias=True), entry, 128 * MiB)
    after = plan.build(spec.GuestSpec.model_validate(json.loads(after_json)), FACTS)
    assert after.memory_slots == before.memory_slots
    assert after.max_memory_bytes == before.max_memory_bytes
    new = after.region("more")
    assert new.dimm_slot == 1 and new.volume == "g-pmem-more.raw"
    # and detaching it gives the reserve back: the same plan as before
    back = attach.managed_spec_without(after_json, new)
    assert plan.build(spec.GuestSpec.model_validate(json.loads(back)), FACTS).spec_digest == before.spec_digest


def test_recorded_virtio_pmem_lands_on_the_first_spare_port() -> None:
    g = spec.loads(GUEST).guests[0]
    entry = attach.region_spec(req(region="v2", model="virtio-pmem", size_bytes=64 * MiB), managed=True)
    after = plan.build(spec.GuestSpec.model_validate(json.loads(
        attach.managed_spec_json(g.model_dump_json(by_alias=True), entry, 64 * MiB))), FACTS)
    d = domain.parse(managed_xml())
    assert attach.placement_problems(d, after.region("v2")) == []
    assert after.region("v2").pci_bus == d.free_root_ports[0].index


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"region": "Bad_Name"}, "--name"),
    ({"size_bytes": 1 * MiB}, "too small"),
    ({"filesystem": "xfs", "size_bytes": 64 * MiB}, "xfs needs at least 300MiB"),
    ({"mount": "/etc"}, "--mount"),
    ({"model": "virtio-pmem", "mode": "devdax"}, "--mode: is for nvdimm only: virtio-pmem has no namespaces"),
    ({"mode": "devdax", "filesystem": "ext4"}, "devdax is a character device"),
    ({"mode": "devdax", "align_bytes": 1024**3}, "pdpe1gb"),
    ({"mode": "sector", "align_bytes": 2 * MiB}, "--align: is for mode: devdax only"),
])
def test_region_rules_are_the_spec_rules(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment.replace("-", r"\-")):
        attach.region_spec(req(**kw), managed=True)


def test_attach_mode_joins_the_recorded_spec() -> None:
    """--mode on a managed guest: the region joins the spec with its mode; devdax gets no filesystem."""
    g = spec.loads(GUEST).guests[0]
    entry = attach.region_spec(req(region="dd", size_bytes=128 * MiB, mode="devdax"), managed=True)
    assert (entry["mode"], entry["filesystem"], entry["mount"]) == ("devdax", "none", None)
    after = plan.build(spec.GuestSpec.model_validate(json.loads(
        attach.managed_spec_json(g.model_dump_json(by_alias=True), entry, 128 * MiB))), FACTS)
    new = after.region("dd")
    assert (new.effective_mode, new.align_bytes, new.reserved_tail) == ("devdax", 2 * MiB, True)


# ---------------------------------------------------------------------------------------------
# plan_detach: (live XML, config XML, metadata, flags) -> steps or problems

KEEP, PURGE = ledger.Purge(), ledger.Purge.asked(True, False)
TWO_NVDIMMS = """\
name: g
hotplug: {slots: 2, headroom: 1GiB}
pmem:
  - {name: nv, size: 256MiB}
  - {name: nv2, size: 256MiB}
"""


def managed_guest(text: str = GUEST) -> tuple[str, str, domain.Metadata]:
    """(live XML, config XML, metadata) of a running managed guest: virtio-pmem live only."""
    g = spec.loads(text).guests[0]
    the_plan = plan.build(g, FACTS)
    md = replace(domain.Metadata.from_plan(the_plan, ssh_port=2222, spec_json=g.model_dump_json(by_alias=True)),
                 volumes=tuple((r.volume, "backing") for r in the_plan.regions))
    return managed_xml(text), domain.render(the_plan, CTX), md


def with_nvdimm(xml: str, alias: str = "ua-pmem-nv") -> str:
    """FOREIGN with an nvdimm someone attached (by nvmprov or by hand)."""
    dev = (f"<memory model='nvdimm' access='shared'><source><path>/var/lib/nvmprov/pool/plain.domain.nv.raw</path>"
           f"</source><target><size unit='KiB'>65536</size><node>0</node></target><alias name='{alias}'/></memory>")
    return xml.replace("</devices>", f"{dev}</devices>")


def kinds(p: attach.DetachPlan) -> list[str]:
    return [type(s).__name__ for s in p.steps]


def test_detach_plan_refuses_live_nvdimm_and_names_the_way_that_works() -> None:
    live, cfg, md = managed_guest()
    for flags in ({}, {"live": True}, {"live": True, "config": True}):
        p = attach.plan_detach(live, cfg, md, "nv", running=True, purge=KEEP,
                               **{"live": False, "config": False, **flags})
        (problem,) = p.problems
        assert "nvdimm device hot unplug is not supported yet" in problem and "detach g nv --config" in problem
        assert p.steps == ()


def test_detach_plan_nvdimm_config_leaves_at_the_next_start_and_keeps_the_data() -> None:
    live, cfg, md = managed_guest()
    p = attach.plan_detach(live, cfg, md, "nv", running=True, live=False, config=True, purge=KEEP)
    assert p.problems == () and kinds(p) == ["DropFromConfig", "Unrecord"]
    assert p.targets == ["config", "metadata"] and p.volume == "g-pmem-nv.raw"
    drop, unrecord = p.steps
    assert "ua-pmem-nv" in drop.device_xml and 'model="nvdimm"' in drop.device_xml  # type: ignore[union-attr]
    assert [r["name"] for r in json.loads(unrecord.spec_json)["pmem"]] == ["vp"]  # type: ignore[union-attr]
    assert p.notes[0] == "nv stays in the running guest until g is powered off"
    assert p.notes[1].startswith("kept the backing volume g-pmem-nv.raw (its data)")


def test_detach_plan_managed_virtio_pmem_is_unplugged_live_and_unrecorded_never_in_config() -> None:
    live, cfg, md = managed_guest()
    p = attach.plan_detach(live, cfg, md, "vp", running=True, live=False, config=False, purge=KEEP)
    assert kinds(p) == ["Unplug", "Unrecord"] and p.targets == ["live", "metadata"]
    assert p.steps[0] == attach.Unplug(p.steps[0].device_xml, "vp", managed=True)  # type: ignore[union-attr]
    # --config: its record is nvmprov's metadata, the running guest keeps it until it stops
    p = attach.plan_detach(live, cfg, md, "vp", running=True, live=False, config=True, purge=KEEP)
    assert kinds(p) == ["Unrecord"] and "the next start does not plug it" in p.notes[0]
    # a stopped guest: only the record holds it
    p = attach.plan_detach(cfg, cfg, md, "vp", running=False, live=False, config=False, purge=KEEP)
    assert kinds(p) == ["Unrecord"] and p.problems == ()


def test_detach_plan_purges_what_the_guest_made_with_its_metadata_as_witness() -> None:
    live, cfg, md = managed_guest()
    p = attach.plan_detach(cfg, cfg, md, "nv", running=False, live=False, config=False, purge=PURGE)
    assert kinds(p) == ["DropFromConfig", "Unrecord", "PurgeVolume"]
    purge = p.steps[-1]
    assert purge == attach.PurgeVolume("nvmprov", "g-pmem-nv.raw", "/p/g-pmem-nv.raw", False,
                                       ("g-pmem-nv.raw", "g-pmem-vp.raw"))
    assert not any("kept" in n for n in p.notes)   # the purge step says what it keeps, when it runs


@pytest.mark.parametrize(("region", "running", "flags", "fragment"), [
    ("nope", True, {}, "guest g has no region nope (nv, vp)"),
    ("nv", False, {"live": True}, "domain g is not running: drop --live"),
    ("vp", False, {"live": True}, "domain g is not running: drop --live"),
])
def test_detach_plan_problems_on_a_managed_guest(region: str, running: bool, flags: dict[str, bool],
                                                 fragment: str) -> None:
    live, cfg, md = managed_guest()
    p = attach.plan_detach(live if running else cfg, cfg, md, region, running=running, purge=PURGE,
                           **{"live": False, "config": False, **flags})
    assert [fragment in x for x in p.problems] == [True] and p.steps == ()


def test_detach_plan_keeps_the_order_that_places_regions() -> None:
    live, cfg, md = managed_guest(TWO_NVDIMMS)
    (problem,) = attach.plan_detach(cfg, cfg, replace(md, spec_json=None), "nv2", running=False, live=False,
                                    config=False, purge=KEEP).problems
    assert "holds no spec; recreate it" in problem
    (problem,) = attach.plan_detach(cfg, cfg, md, "nv", running=False, live=False, config=False,
                                    purge=KEEP).problems
    assert "detach the later nvdimm regions first" in problem
    assert attach.plan_detach(cfg, cfg, md, "nv2", running=False, live=False, config=False,
                              purge=KEEP).problems == ()


def test_detach_plan_refuses_a_cxl_region_which_only_a_recreate_removes() -> None:
    text = "name: g\npmem:\n  - {name: cxl, size: 256MiB, model: cxl}\n  - {name: nv, size: 64MiB}\n"
    live, cfg, md = managed_guest(text)
    p = attach.plan_detach(live, cfg, md, "cxl", running=True, live=False, config=False, purge=PURGE)
    assert p.steps == () and [("no CXL hot-unplug" in x and "recreate the guest" in x) for x in p.problems] == [True]


def test_detach_plan_on_a_foreign_domain() -> None:
    cfg = with_nvdimm(FOREIGN)
    p = attach.plan_detach(cfg, cfg, None, "nv", running=False, live=False, config=False, purge=PURGE)
    assert kinds(p) == ["DropFromConfig", "PurgeVolume"] and p.targets == ["config"]
    assert p.steps[-1] == attach.PurgeVolume("nvmprov", "plain.domain.nv.raw",
                                             "/var/lib/nvmprov/pool/plain.domain.nv.raw", False, ())
    (problem,) = attach.plan_detach(FOREIGN, FOREIGN, None, "nv", running=False, live=False, config=False,
                                    purge=KEEP).problems
    assert problem.startswith("domain plain has no region nv (alias ua-pmem-nv)")
    (problem,) = attach.plan_detach(FOREIGN, FOREIGN, None, "nv", running=True, live=False, config=True,
                                    purge=KEEP).problems
    assert problem.startswith("the config of domain plain has no region nv")
    # running, the nvdimm in the config only (attached --config): live is refused, --config is the way
    (problem,) = attach.plan_detach(FOREIGN, cfg, None, "nv", running=True, live=True, config=False,
                                    purge=KEEP).problems
    assert "nvdimm device hot unplug is not supported yet" in problem
    p = attach.plan_detach(FOREIGN, cfg, None, "nv", running=True, live=False, config=False, purge=KEEP)
    assert kinds(p) == ["DropFromConfig"] and "stays in the running guest" in p.notes[0]


# A foreign domain that could take virtio-pmem live (ACPI, maxMemory, a NUMA cell, a spare port).
HOTPLUGGABLE = """\
<domain type='test'>
  <name>{name}</name>
  <memory unit='KiB'>1048576</memory>
  <maxMemory slots='4' unit='KiB'>16777216</maxMemory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <features><acpi/><apic/></features>
  <cpu><numa><cell id='0' cpus='0' memory='1048576' unit='KiB'/></numa></cpu>
  <devices>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'><address type='pci' bus='0x00' slot='0x10'/></controller>
  </devices>
</domain>
"""


def test_stopped_foreign_domain_refuses_virtio_pmem_before_making_anything() -> None:
    import io
    import uuid

    import libvirt

    from nvmprov.progress import Progress

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    name = f"stopped-{uuid.uuid4().hex[:6]}"
    dom = conn.defineXML(HOTPLUGGABLE.format(name=name))
    try:
        pools_before = sorted(conn.listAllStoragePools(0), key=lambda p: p.name())
        vols_before = {p.name(): sorted(p.listVolumes()) for p in pools_before if p.isActive()}
        with pytest.raises(UsageError) as info:
            attach.attach(conn, name, req(model="virtio-pmem", live=False, config=False), Progress(io.StringIO()))
        assert f"virtio-pmem attaches live only on this libvirt: start {name} first" in str(info.value)
        assert "nothing was changed" in str(info.value)
        assert exit_status(info.value) == 2
        pools_after = sorted(conn.listAllStoragePools(0), key=lambda p: p.name())
        assert [p.name() for p in pools_after] == [p.name() for p in pools_before], "no pool defined"
        assert {p.name(): sorted(p.listVolumes()) for p in pools_after if p.isActive()} == vols_before
        assert "<memory model" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        dom.undefine()
        conn.close()


def test_unplugged_problems_only_when_the_request_goes_nowhere() -> None:
    assert attach.unplugged_problems("d", req(model="virtio-pmem", live=True, config=False)) == []
    assert attach.unplugged_problems("d", req(model="nvdimm", live=False, config=True)) == []
    assert attach.unplugged_problems("d", req(model="virtio-pmem", live=False, config=False)) == [
        "virtio-pmem attaches live only on this libvirt: start d first"]
    later = req(model="virtio-pmem", live=False, config=False, virtio_pmem_in_config=True)
    assert "or pass --config" in attach.unplugged_problems("d", later)[0]


def test_attach_defines_a_missing_pool_where_the_uri_keeps_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from nvmprov import storage

    seen: list[str] = []

    def ensure_pool(_conn: object, _name: str, path: str) -> object:
        seen.append(path)
        return object()

    monkeypatch.setattr(storage, "ensure_pool", ensure_pool)
    monkeypatch.setattr(storage, "pool_path", lambda _pool: seen[-1])
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))

    class Conn:
        def __init__(self, uri: str) -> None:
            self.uri = uri

        def getURI(self) -> str:  # noqa: N802 - libvirt's name
            return self.uri

    assert attach._pool(Conn("qemu:///session"), "nvmprov")[1] == str(tmp_path / "data" / "nvmprov" / "pool")
    assert attach._pool(Conn("qemu:///system"), "nvmprov")[1] == "/var/lib/nvmprov/pool"


def test_the_default_region_name_is_picked_under_the_domain_lock(conn, monkeypatch, tmp_path) -> None:
    """attach without --name reads the domain's devices to pick hpN: under its lock, like the rest."""
    import contextlib

    monkeypatch.setenv("NVMPROV_STATE_DIR", str(tmp_path))
    held: list[bool] = [False]

    @contextlib.contextmanager
    def lock(_conn, _name, _hv):  # type: ignore[no-untyped-def]
        held[0] = True
        yield
        held[0] = False

    picked: list[tuple[bool, str]] = []
    real = attach.with_default_name

    def pick(dom, request):  # type: ignore[no-untyped-def]
        named = real(dom, request)
        picked.append((held[0], named.region))
        raise UsageError("stop here")

    monkeypatch.setattr(attach, "domain_lock", lock)
    monkeypatch.setattr(attach, "with_default_name", pick)
    request = attach.AttachRequest(region="", size_bytes=16 * MiB, model="nvdimm", label_bytes=None,
                                   filesystem="none", mount=None, allocation="sparse", live=False, config=False)
    with pytest.raises(UsageError, match="stop here"):
        attach.attach(conn, "test", request, None)  # type: ignore[arg-type]
    assert picked == [(True, "hp0")]


NUMA_GUEST = """\
name: g
numa_nodes: 2
hotplug: {slots: 2, headroom: 1GiB}
pmem:
  - {name: nv, size: 256MiB}
"""


def test_numa_node_needs_a_cell_of_the_domain_and_an_nvdimm() -> None:
    two = managed_xml(NUMA_GUEST)
    assert attach.attach_problems(two, req(size_bytes=256 * MiB, numa_node=1), running=True) == []
    (problem,) = attach.attach_problems(managed_xml(), req(size_bytes=256 * MiB, numa_node=1), running=True)
    assert problem.startswith("domain g has no NUMA node 1 (its nodes: 0) and a memory device lands in an existing "
                              "one: use --numa-node 0 or lower;")
    (problem,) = attach.attach_problems(two, req(size_bytes=64 * MiB, model="virtio-pmem", numa_node=1),
                                        running=True)
    assert problem.startswith("--numa-node is for nvdimm only: libvirt 9.0 refuses a NUMA node on virtio-pmem")


def test_numa_node_reaches_the_device_xml_the_recorded_spec_and_the_report_entry() -> None:
    d = domain.parse(managed_xml(NUMA_GUEST))
    assert [(c.id, c.cpus) for c in d.cells] == [(0, "0-0"), (1, None)]
    n = attach.foreign_region_plan(d, req(numa_node=1), "x-pmem-new.raw")
    assert n.numa_node == 1 and "<node>1</node>" in domain.region_device_xml(n, "/p")
    g = spec.loads(NUMA_GUEST).guests[0]
    entry = attach.region_spec(req(region="far", size_bytes=128 * MiB, numa_node=1), managed=True)
    after = plan.build(spec.GuestSpec.model_validate(json.loads(
        attach.managed_spec_json(g.model_dump_json(by_alias=True), entry, 128 * MiB))), FACTS)
    assert after.region("far").numa_node == 1
    with pytest.raises(UsageError, match=r"--numa-node: "):
        attach.region_spec(req(numa_node=-1), managed=True)
