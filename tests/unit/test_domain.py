"""The QEMU rules of the domain XML (the test driver checks far less than QEMU), and metadata."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from nvmprov import domain, plan, spec

FACTS = plan.HostFacts(kvm_domain_type=True, builtin_volumes=("base.qcow2", "vmlinuz", "initrd.img"))
CTX = domain.RenderContext(uuid="6f1d9c62-7d2a-4a4b-9a3e-0000000000aa", ssh_port=2222,
                           pool_dir="/var/lib/nvmprov/pool", console_log="/var/log/nvmprov/demo.log")
QEMU = "{http://libvirt.org/schemas/domain/qemu/1.0}"
ALL_KINDS = """\
name: demo
hotplug: {slots: 2, headroom: 1GiB}
pmem:
  - {name: lab, size: 512MiB, label: 128KiB, filesystem: xfs}
  - {name: ro, size: 64MiB, readonly: true, filesystem: none}
  - {name: real, size: 64MiB, host_pmem: true}
  - {name: vp, size: 64MiB, model: virtio-pmem}
"""


def the_plan(text: str = ALL_KINDS, facts: plan.HostFacts = FACTS) -> plan.Plan:
    return plan.build(spec.loads(text).guests[0], facts)


def rendered(p: plan.Plan | None = None, ctx: domain.RenderContext = CTX) -> ET.Element:
    return ET.fromstring(domain.render(p or the_plan(), ctx))


def memories(root: ET.Element) -> dict[str, ET.Element]:
    return {m.find("alias").get("name"): m for m in root.iterfind("devices/memory")}  # type: ignore[union-attr]


def test_every_pmem_device_is_shared() -> None:
    root = rendered(ctx=replace(CTX, include_virtio_pmem=True))
    mems = root.findall("devices/memory")
    assert len(mems) == 4
    assert all(m.get("access") == "shared" for m in mems)
    for r in the_plan().regions:
        assert ET.fromstring(domain.region_device_xml(r, CTX.pool_dir)).get("access") == "shared"


def test_acpi_maxmemory_slots_and_numa_are_present() -> None:
    p = the_plan()
    root = rendered(p)
    assert root.find("features/acpi") is not None
    mm = root.find("maxMemory")
    assert mm is not None and mm.get("slots") == str(p.memory_slots) == "6"
    assert mm.get("unit") == "KiB" and int(mm.text or 0) * 1024 == p.max_memory_bytes
    cell = root.find("cpu/numa/cell")
    assert cell is not None and cell.get("id") == "0" and cell.get("cpus") == "0-0"
    assert int(cell.get("memory", "0")) * 1024 == p.memory_bytes


def test_pmem_only_with_host_pmem_readonly_only_when_asked() -> None:
    mems = memories(rendered())
    assert [a for a, m in mems.items() if m.find("source/pmem") is not None] == ["ua-pmem-real"]
    assert [a for a, m in mems.items() if m.find("target/readonly") is not None] == ["ua-pmem-ro"]


def test_nvdimm_addresses_sizes_and_label() -> None:
    mems = memories(rendered())
    lab = mems["ua-pmem-lab"]
    assert lab.get("model") == "nvdimm"
    assert lab.find("source/path").text == "/var/lib/nvmprov/pool/demo-pmem-lab.raw"  # type: ignore[union-attr]
    assert lab.find("target/size").text == str(512 * 1024)  # type: ignore[union-attr]
    assert lab.find("target/label/size").text == str(2 * 1024)  # 128 KiB asked, rounded to 2 MiB  # type: ignore[union-attr]
    assert lab.find("target/node").text == "0"  # type: ignore[union-attr]
    assert [(m.find("address").get("type"), m.find("address").get("slot")) for m in mems.values()] == [  # type: ignore[union-attr]
        ("dimm", "0"), ("dimm", "1"), ("dimm", "2")]
    assert mems["ua-pmem-ro"].find("target/label") is None


def test_virtio_pmem_only_when_asked_and_behind_its_root_port() -> None:
    assert "ua-pmem-vp" not in memories(rendered())
    root = rendered(ctx=replace(CTX, include_virtio_pmem=True))
    vp = memories(root)["ua-pmem-vp"]
    assert vp.find("target/node") is None and vp.find("target/label") is None
    addr = vp.find("address")
    assert addr is not None and (addr.get("type"), addr.get("bus"), addr.get("slot")) == ("pci", "0x01", "0x00")
    port = root.find("devices/controller[@index='1']")
    assert port is not None and port.get("model") == "pcie-root-port"
    assert port.find("alias").get("name") == "ua-port-vp"  # type: ignore[union-attr]
    assert port.find("address").get("slot") == "0x10"  # type: ignore[union-attr]


def test_every_pci_device_has_a_fixed_address_off_the_hotplug_ports() -> None:
    # otherwise libvirt parks its own devices in the root ports kept for virtio-pmem
    root = rendered()
    assert root.find("devices/controller[@type='usb']").get("model") == "none"  # type: ignore[union-attr]
    disk = root.find("devices/disk[@device='disk']/address")
    assert disk is not None and (disk.get("bus"), disk.get("slot")) == ("0x00", "0x0f")
    slots = [c.find("address").get("slot") for c in root.iterfind("devices/controller[@model='pcie-root-port']")]  # type: ignore[union-attr]
    assert slots == ["0x10", "0x11", "0x12"]    # vp's port + 2 spares (hotplug.slots)
    assert root.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]


def test_user_network_is_loopback_only_and_restricted() -> None:
    root = rendered()
    args = [a.get("value") for a in root.iterfind(f"{QEMU}commandline/{QEMU}arg")]
    p = the_plan()
    assert args == [
        "-netdev", "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", f"virtio-net-pci,netdev=net0,mac={p.mac},bus=pcie.0,addr=0x1e",
    ]
    assert root.find("devices/interface") is None


def test_outbound_turns_restrict_off_only_then() -> None:
    p = the_plan("name: d\nnetwork: {outbound: true}\npmem: [{name: a, size: 64MiB}]\n")
    root = rendered(p)
    netdev = [a.get("value") for a in root.iterfind(f"{QEMU}commandline/{QEMU}arg")][1]
    assert netdev == "user,id=net0,restrict=off,hostfwd=tcp:127.0.0.1:2222-:22"


def test_network_mode_is_a_plain_interface() -> None:
    p = the_plan("name: d\nnetwork: {mode: network, name: default}\npmem: [{name: a, size: 64MiB}]\n")
    root = rendered(p)
    assert root.find(f"{QEMU}commandline") is None
    iface = root.find("devices/interface[@type='network']")
    assert iface is not None and iface.find("source").get("network") == "default"  # type: ignore[union-attr]
    assert iface.find("mac").get("address") == p.mac  # type: ignore[union-attr]


def test_direct_boot_tcg_cpu_and_lifecycle() -> None:
    root = rendered()
    assert root.get("type") == "qemu"
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    assert root.find("os/kernel").text == "/var/lib/nvmprov/pool/vmlinuz"  # type: ignore[union-attr]
    assert root.find("os/initrd").text == "/var/lib/nvmprov/pool/initrd.img"  # type: ignore[union-attr]
    assert root.find("os/cmdline").text == "root=/dev/vda console=ttyS0"  # type: ignore[union-attr]
    cpu = root.find("cpu")
    assert cpu is not None and (cpu.get("mode"), cpu.get("match")) == ("custom", "exact")
    assert cpu.find("model").text == "Nehalem" and cpu.find("model").get("fallback") == "allow"  # type: ignore[union-attr]
    assert [root.find(t).text for t in ("on_poweroff", "on_reboot", "on_crash")] == [  # type: ignore[union-attr]
        "destroy", "restart", "destroy"]


def test_kvm_uses_host_passthrough() -> None:
    root = rendered(the_plan(facts=replace(FACTS, cpu_virt_extensions=True)))
    assert root.get("type") == "kvm" and root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert root.find("cpu/numa/cell") is not None


def test_bios_boot_for_user_images() -> None:
    root = rendered(the_plan("name: d\nimage: /img/x.qcow2\npmem: [{name: a, size: 64MiB}]\n"))
    assert root.find("os/kernel") is None and root.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    efi = rendered(the_plan("name: d\nimage: /img/x.qcow2\nfirmware: efi\npmem: [{name: a, size: 64MiB}]\n"))
    assert efi.find("os").get("firmware") == "efi"  # type: ignore[union-attr]


def test_disks_and_serial_log() -> None:
    root = rendered()
    vda = root.find("devices/disk[@device='disk']")
    assert vda.find("source").get("file") == "/var/lib/nvmprov/pool/demo-root.qcow2"  # type: ignore[union-attr]
    assert vda.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    cd = root.find("devices/disk[@device='cdrom']")
    assert cd.find("readonly") is not None and cd.find("target").get("bus") == "sata"  # type: ignore[union-attr]
    log = root.find("devices/serial/log")
    assert log is not None and (log.get("file"), log.get("append")) == ("/var/log/nvmprov/demo.log", "off")
    assert root.find("devices/console").get("type") == "pty"  # type: ignore[union-attr]
    assert rendered(ctx=replace(CTX, console_log=None)).find("devices/serial/log") is None


def test_memory_counts_ram_plus_devices_in_the_config() -> None:
    p = the_plan()
    nv = sum(r.backing_bytes for r in p.nvdimm_regions)
    assert int(rendered(p).find("memory").text) * 1024 == p.memory_bytes + nv  # type: ignore[union-attr,arg-type]


def test_metadata_round_trip() -> None:
    p = the_plan()
    md = domain.Metadata.from_plan(p, ssh_port=2299, spec_path="/x/guest.yaml")
    md = md.with_volume("demo-pmem-lab.raw", "backing").with_volume("demo-root.qcow2", "overlay")
    md = md.with_volume("demo-root.qcow2", "overlay")     # idempotent
    back = domain.parse_metadata(domain.render(p, CTX, metadata=md))
    assert back == md
    assert back is not None and back.regions == p.regions and p.region("lab").notes
    assert back.volumes == (("demo-pmem-lab.raw", "backing"), ("demo-root.qcow2", "overlay"))
    with pytest.raises(ValueError):
        md.with_volume("x", "kernel")


def test_metadata_inner_element_has_no_namespace_of_its_own() -> None:
    # virDomainSetMetadata puts the element into the namespace it is given; declaring it in the
    # element too fails with "failed to create a new XML namespace" (seen on libvirt 9.0).
    el = ET.fromstring(domain.metadata_xml(domain.Metadata.from_plan(the_plan(), ssh_port=1)))
    assert all(not e.tag.startswith("{") for e in el.iter())
    assert el.tag == "guest"


def test_render_embeds_plan_metadata_without_volumes() -> None:
    md = domain.parse_metadata(domain.render(the_plan(), CTX))
    assert md is not None and md.ssh_port == 2222 and md.volumes == () and md.spec_digest == the_plan().spec_digest


def test_parse_metadata_absent() -> None:
    assert domain.parse_metadata("<domain type='qemu'><name>x</name></domain>") is None
    assert domain.parse_metadata("<domain type='qemu'><metadata><other xmlns='urn:x'/></metadata></domain>") is None


def test_names_reach_xml_as_text_not_markup() -> None:
    # names are validated before this point; the tree escapes anything that still slipped through
    p = replace(the_plan(), name="a<b>&c")
    assert ET.fromstring(domain.render(p, CTX)).find("name").text == "a<b>&c"  # type: ignore[union-attr]


def test_domain_xml_is_parsed_only_in_the_model() -> None:
    """domain.py is the one module that reads domain XML; the other ElementTree parses read other
    libvirt documents, each named here (a new one must say which document it reads)."""
    import re
    from pathlib import Path

    other_documents = {
        "storage.py",    # pool and volume XML (storage._parse)
        "host.py",       # capabilities
        "identity.py",   # capabilities: the host UUID
        "doctor.py",     # domain capabilities: the emulator's path
    }
    package = Path(domain.__file__).parent
    parses = re.compile(r"\b(?:fromstring|ET\.parse|XMLParser|iterparse)\(")
    found = {p.name: len(parses.findall(p.read_text())) for p in package.rglob("*.py")}
    assert {name for name, n in found.items() if n} == {"domain.py", *other_documents}
    assert found["domain.py"] == 1   # domain._tree: every domain XML
