"""model: cxl (issue 20): what validate refuses, the plan, the QEMU arguments, the metadata, attach."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nvmprov import cli, domain, host, ledger, plan, spec
from nvmprov.errors import HostError, SpecError

MiB = 1024**2
TCG_HOST = plan.HostFacts(kvm_domain_type=True, cpu_virt_extensions=False)
KVM_HOST = plan.HostFacts(kvm_domain_type=True, cpu_virt_extensions=True)
CTX = domain.RenderContext(uuid="00000000-0000-0000-0000-000000000001", ssh_port=2222, pool_dir="/p")


def guest(pmem: str, extra: str = "") -> spec.GuestSpec:
    return spec.loads(f"name: g\n{extra}pmem:\n{pmem}").guests[0]


CXL = "  - {name: c, size: 512MiB, model: cxl}\n"


@pytest.mark.parametrize(("pmem", "extra", "words"), [
    ("  - {name: c, size: 384MiB, model: cxl}\n", "", "pmem[0].size: 384MiB is not a multiple of 256MiB"),
    ("  - {name: c, size: 100MiB, model: cxl}\n", "", "use size: 256MiB"),
    ("  - {name: c, size: 512MiB, model: cxl, readonly: true, filesystem: none}\n", "", "no read-only mode"),
    ("  - {name: c, size: 512MiB, model: cxl, label: 128KiB}\n", "", "label storage area"),
    ("  - {name: c, size: 512MiB, model: cxl, host_pmem: true}\n", "", "has no pmem=on"),
    ("  - {name: c, size: 512MiB, model: cxl, numa_node: 1}\n", "numa_nodes: 2\n", "CEDT"),
    ("  - {name: c, size: 512MiB, model: cxl, volume: mine.raw}\n", "", "neither chowns nor labels"),
    ("  - {name: c, size: 512MiB, model: cxl, mode: devdax}\n", "", "pmem[0].mode: devdax on CXL is not measured"),
    (CXL + "  - {name: d, size: 512MiB, model: cxl}\n", "", "one per guest is what is measured"),
    (CXL, "accel: kvm\n", "accel: kvm with a cxl region is unmeasured here"),
], ids=["384MiB", "100MiB", "readonly", "label", "host_pmem", "numa_node", "volume", "devdax", "two", "kvm"])
def test_validate_refuses_what_cannot_work_with_the_reason(pmem: str, extra: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        guest(pmem, extra)
    assert words in str(info.value)
    assert cli.exit_status(info.value) == 2
    assert len(str(info.value).splitlines()) == 1


def test_validate_exit_2_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "g.yaml"
    f.write_text("name: g\npmem:\n  - {name: c, size: 300MiB, model: cxl}\n")
    assert cli.main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "pmem[0].size" in err and "256MiB" in err


def test_a_cxl_region_beside_an_nvdimm_is_valid_and_fsdax_ext4_by_default() -> None:
    g = guest(CXL + "  - {name: d, size: 256MiB}\n")
    r = g.pmem[0]
    assert (r.model, r.namespace_mode, r.filesystem, r.mount) == ("cxl", "fsdax", "ext4", "/mnt/c")
    assert guest("  - {name: c, size: 1GiB, model: cxl, filesystem: xfs}\n").pmem[0].filesystem == "xfs"


def test_plan_keeps_cxl_out_of_libvirt_memory_and_records_volumes_and_serial() -> None:
    p = plan.build(guest(CXL + "  - {name: d, size: 256MiB}\n"), TCG_HOST)
    c = p.region("c")
    assert c.volume == "g-pmem-c.raw" and c.lsa_volume == "g-pmem-c.lsa"
    assert c.dimm_slot is None and c.pci_slot is None and c.label_bytes is None
    assert 0 < (c.cxl_serial or 0) < 2**63
    assert c.cxl_serial == plan.build(guest(CXL), TCG_HOST).region("c").cxl_serial   # stable
    assert c.cxl_serial != plan.cxl_serial("h", "c")
    assert p.memory_slots == 1 + 4                      # the nvdimm and the hotplug slots, not CXL
    assert p.max_memory_bytes == 1024 * MiB + 256 * MiB + 8192 * MiB
    assert p.cxl_window_bytes == 512 * MiB
    assert p.memory_device_regions == (p.region("d"),)
    assert plan.cxl_region(c).command("mem3") == (
        "cxl create-region -d %s -t pmem -m %s -w %s -g %s", ("decoder0.0", "mem3", "1", "256"))


def test_auto_picks_tcg_for_a_cxl_guest_where_kvm_works() -> None:
    p = plan.build(guest(CXL), KVM_HOST)
    assert p.accel == "tcg" and "CXL under KVM is unmeasured" in (p.accel_notice or "")
    assert plan.build(guest("  - {name: d, size: 256MiB}\n"), KVM_HOST).accel == "kvm"


def _args(xml: str) -> list[str]:
    return [a for a in domain.ET.fromstring(xml).iter(f"{{{domain.QEMU_NS}}}arg")  # noqa: S314
            for a in [a.get("value", "")]]


def test_qemu_arguments_are_the_measured_topology_in_json_form() -> None:
    p = plan.build(guest(CXL), TCG_HOST)
    args = _args(domain.render(p, CTX))
    i = args.index("cxl=on")
    cxl = args[i - 1:]
    assert cxl[:2] == ["-machine", "cxl=on"]
    assert "memory-backend-file,id=cxl-mem0,share=on,mem-path=/p/g-pmem-c.raw,size=536870912" in cxl
    assert "memory-backend-file,id=cxl-lsa0,share=on,mem-path=/p/g-pmem-c.lsa,size=1048576" in cxl
    devices = [json.loads(cxl[j + 1]) for j, a in enumerate(cxl) if a == "-device"]
    assert [d["driver"] for d in devices] == ["pxb-cxl", "cxl-rp", "cxl-rp", "cxl-type3"]
    assert [d.get("port") for d in devices[1:3]] == [0, 1]    # two root ports: one leaves the file unwritten
    t3 = devices[3]
    assert (t3["bus"], t3["memdev"], t3["lsa"], t3["sn"]) == ("rp0", "cxl-mem0", "cxl-lsa0", p.region("c").cxl_serial)
    assert cxl[-2:] == ["-machine", "cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=536870912"]
    assert "g-pmem-c.raw</path>" not in domain.render(p, CTX)   # no <memory> device for it


def test_no_cxl_no_arguments_and_network_mode_still_gets_them() -> None:
    assert "cxl=on" not in _args(domain.render(plan.build(guest("  - {name: d, size: 256MiB}\n"), TCG_HOST), CTX))
    p = plan.build(guest(CXL, "network: {mode: network, name: default}\n"), TCG_HOST)
    args = _args(domain.render(p, CTX))
    assert args[:2] == ["-machine", "cxl=on"] and "-netdev" not in args


def test_a_comma_in_the_pool_path_is_refused() -> None:
    p = plan.build(guest(CXL), TCG_HOST)
    with pytest.raises(HostError, match="comma"):
        domain.render(p, domain.RenderContext(uuid=CTX.uuid, ssh_port=1, pool_dir="/a,b"))


def test_metadata_round_trips_the_cxl_fields() -> None:
    p = plan.build(guest(CXL + "  - {name: d, size: 256MiB}\n"), TCG_HOST)
    md = domain.parse_metadata(domain.render(p, CTX))
    assert md is not None and md.regions == p.regions
    assert "lsa_volume" not in domain.metadata_xml(domain.Metadata.from_plan(  # nvdimm metadata unchanged
        plan.build(guest("  - {name: d, size: 256MiB}\n"), TCG_HOST), ssh_port=1))
    lsa = ("g-pmem-c.lsa", "label")
    assert domain.Metadata("v", "d", 1, "u").with_volume(*lsa).volumes == (lsa,)


def test_the_label_storage_area_is_region_data_kept_unless_purged() -> None:
    entry = ledger.Entry("g-pmem-c.lsa", "g", "hv", "label")
    assert not ledger.Purge.asked(False, False).deletes(entry)
    assert ledger.Purge.asked(True, False).deletes(entry)
    assert ledger.Purge.asked(False, False).deletes(ledger.Entry("g-seed.iso", "g", "hv", "seed"))


def test_qemu_ids_from_the_dac_base_label() -> None:
    caps = ("<capabilities><host><secmodel><model>none</model></secmodel><secmodel><model>dac</model>"
            "<baselabel type='kvm'>+64055:+64055</baselabel><baselabel type='qemu'>+64055:+64055</baselabel>"
            "</secmodel></host></capabilities>")
    assert host.qemu_ids(caps) == (64055, 64055)
    assert host.qemu_ids("<capabilities><host/></capabilities>") is None


def test_attach_refuses_cxl_with_the_reason_before_connecting(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+unix:///system?socket=/nonexistent")  # must not be reached
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))  # noqa: SIM115 - closed by pytest's monkeypatch undo
    assert cli.main(["attach", "g", "--size", "512MiB", "--model", "cxl"]) == 2
    err = capsys.readouterr().err
    assert "no CXL hotplug on this stack" in err and len(err.strip().splitlines()) == 1


def test_who_uses_a_path_sees_a_cxl_guests_volumes_in_its_real_xml() -> None:
    """prune and purge ask domain.references (through virt.path_users): the CXL files are named only in
    <qemu:commandline> arguments (key=value), and in the metadata for a guest whose XML lost them."""
    p = plan.build(guest(CXL + "  - {name: d, size: 256MiB}\n"), TCG_HOST)
    xml = domain.render(p, CTX)
    refs = domain.references(xml)
    assert {"/p/g-pmem-c.raw", "/p/g-pmem-c.lsa", "/p/g-pmem-d.raw"} <= refs.paths
    assert {("nvmprov", "g-pmem-c.raw"), ("nvmprov", "g-pmem-c.lsa")} <= refs.volumes
    bare = domain.ET.fromstring(xml)  # noqa: S314 - our own
    bare.remove(bare.find(f"{{{domain.QEMU_NS}}}commandline"))
    without = domain.references(domain.ET.tostring(bare, encoding="unicode"))
    assert "/p/g-pmem-c.lsa" not in without.paths and ("nvmprov", "g-pmem-c.lsa") in without.volumes


# ---------------------------------------------------------------------------------------------
# the guest side: facts -> commands (pure)

CXL_ND_PATH = "/sys/devices/platform/ACPI0017:00/root0/nvdimm-bridge0/ndbus0/region0"   # measured here


def _facts(*, region: bool, serial: int | None, ns: dict | None = None, modules: tuple[str, ...] = ()) -> object:
    from nvmprov.agent.facts import parse_guest_facts

    mods = ["nd_pmem", "cxl_acpi", "cxl_pci", "cxl_port", "cxl_mem", "cxl_pmem", *modules]
    seed = {"dev": "namespace0.0", "mode": "raw", "size": 0, "uuid": "00000000-0000-0000-0000-000000000000",
            "sector_size": 512, "state": "disabled"}
    listed = {"regions": [{"dev": "region0", "size": 536870912, "type": "pmem", "namespaces": [ns or seed],
                           "mappings": [{"dimm": "nmem0", "offset": 0, "length": 536870912, "position": 0}]}],
              "dimms": [{"dev": "nmem0"}]} if region else {}
    raw = {
        "modules": mods, "ndctl": {"rc": 0, "stdout": json.dumps(listed), "stderr": ""},
        "regions": {"region0": {"path": CXL_ND_PATH, "size": "536870912", "read_only": "0",
                                "mappings": ["nmem0,0,536870912,0"]}} if region else {},
        "nmems": {}, "daxdevs": {}, "mounts": "", "fstab": "",
        "blockdevs": {"pmem0": {"path": CXL_ND_PATH + "/pfn0.0/block/pmem0", "size_sectors": "1028096", "ro": "0",
                                "dax": "1", "blkid": {"rc": 2, "stdout": "", "stderr": ""}}} if ns else {},
        "cxl_memdevs": {"mem0": {"serial": hex(serial) if serial is not None else None}},
        "cxl_windows": {"decoder0.0": {"start": "0x460000000", "size": "0x20000000"}},
    }
    return parse_guest_facts(json.dumps(raw))


def test_the_guest_makes_the_cxl_region_from_its_recorded_parameters_by_serial() -> None:
    from nvmprov.agent import steps

    r = plan.build(guest(CXL), TCG_HOST).region("c")
    [cmd] = steps.plan_commands(_facts(region=False, serial=r.cxl_serial), r, reformat=False)
    assert cmd.render() == "cxl create-region -d decoder0.0 -t pmem -m mem0 -w 1 -g 256"
    assert cmd.phase == "region"
    from nvmprov.agent.converge import SAFE_AFTER_POWER_CYCLE
    assert "region" in SAFE_AFTER_POWER_CYCLE and "namespace" not in SAFE_AFTER_POWER_CYCLE


def test_a_memdev_of_another_serial_is_not_taken() -> None:
    from nvmprov.agent import steps
    from nvmprov.errors import GuestError

    r = plan.build(guest(CXL), TCG_HOST).region("c")
    with pytest.raises(GuestError, match="no CXL memory device with serial"):
        steps.plan_commands(_facts(region=False, serial=12345), r, reformat=False)


def test_a_new_cxl_region_gets_an_fsdax_namespace_then_a_filesystem() -> None:
    from nvmprov.agent import steps

    r = plan.build(guest(CXL), TCG_HOST).region("c")
    [cmd] = steps.plan_commands(_facts(region=True, serial=r.cxl_serial), r, reformat=False)
    assert cmd.render() == "ndctl create-namespace -r region0 -m fsdax" and cmd.phase == "namespace"
    fsdax = {"dev": "namespace0.0", "mode": "fsdax", "size": 526385152, "uuid": "0f1e", "sector_size": 512,
             "blockdev": "pmem0", "align": 2097152}
    cmds = steps.plan_commands(_facts(region=True, serial=r.cxl_serial, ns=fsdax), r, reformat=False)
    assert cmds[0].render().startswith("mkfs.ext4") and "-b 4096" in cmds[0].render()


# ---------------------------------------------------------------------------------------------
# doctor and show


def test_doctor_checks_qemus_cxl_devices_the_guest_kernel_and_confinement() -> None:
    from nvmprov import doctor

    have = 'name "pxb-cxl", bus PCI\nname "cxl-rp", bus PCI\nname "cxl-type3", bus PCI\n'
    assert doctor.cxl_qemu_check(have).status == "ok"
    missing = doctor.cxl_qemu_check('name "nvdimm"\nname "cxl-rp"\n')
    assert missing.status == "warn" and "no pxb-cxl, cxl-type3" in missing.detail and missing.fix
    assert doctor.cxl_qemu_check(None).status == "warn"
    assert doctor.cxl_kernel_check("6.1.0-57-amd64").status == "ok"
    assert doctor.cxl_kernel_check("5.10.0-30-amd64").status == "warn"
    assert doctor.cxl_kernel_check(None).status == "warn"
    assert doctor.cxl_confinement_check(["none", "dac"], (64055, 64055)).status == "ok"
    confined = doctor.cxl_confinement_check(["apparmor", "dac"], (64055, 64055))
    assert confined.status == "warn" and "apparmor" in confined.detail and "abstractions/libvirt-qemu" in (
        confined.fix or "")


def test_kernel_version_from_a_bzimage_header() -> None:
    from nvmprov import doctor

    head = bytearray(0x5000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x42C0).to_bytes(2, "little")
    text = b"6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP\0"
    head[0x44C0:0x44C0 + len(text)] = text
    assert doctor.kernel_version(bytes(head)) == "6.1.0-57-amd64"
    assert doctor.kernel_version(b"\0" * 0x1000) is None


def test_show_maps_the_cxl_window_and_the_region() -> None:
    from nvmprov import show

    p = plan.build(guest(CXL + "  - {name: d, size: 256MiB}\n"), TCG_HOST)
    xml = domain.render(p, CTX)
    md = domain.parse_metadata(xml)
    mm = show.build_map(xml, xml, running=True, md=md)
    view = next(v for v in mm.regions if v.name == "c")
    assert (view.model, view.where, view.backing_path) == ("cxl", "qemu args", "/p/g-pmem-c.raw")
    assert mm.cxl_window == {"size_bytes": 512 * MiB, "regions": ["c"]}
    probe = show.Probe(
        ram=((0, 0x9FBFF),),
        regions=(show.GuestRegion("region0", 0x460000000, 512 * MiB, None, CXL_ND_PATH, ("pmem0",), -1),
                 show.GuestRegion("region1", 0x100000000, 256 * MiB, 1,
                                  "/sys/devices/LNXSYSTM:00/ACPI0012:00/ndbus1/region1", ("pmem1",), 0)),
        cxl_windows=(show.CxlWindow("decoder0.0", 0x460000000, 512 * MiB),))
    assert md is not None
    show.merge_probe(mm, probe, md)
    assert (view.guest_region, view.guest_device, view.guest_start) == ("region0", "/dev/pmem0", 0x460000000)
    text = show.render_text(mm)
    assert "  CXL window      512 MiB  0x00460000000-0x0047fffffff  (decoder0.0; regions: c)" in text, text
    assert "no NUMA node" not in text


def test_the_agents_facts_carry_the_cxl_window_for_show() -> None:
    from nvmprov import show

    r = plan.build(guest(CXL), TCG_HOST).region("c")
    facts = _facts(region=True, serial=r.cxl_serial)
    assert show.probe_of(facts).cxl_windows == (show.CxlWindow("decoder0.0", 0x460000000, 512 * MiB),)
