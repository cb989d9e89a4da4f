"""The benchmark's pure parts (bench/stats.py, the baseline's XML) and the speed-up it led to:
nvdimm backing files mapped 2 MiB-aligned (<alignsize>)."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from bench import baseline, stats
from nvmprov import domain, plan, spec
from nvmprov.sizes import MiB

FACTS = plan.HostFacts(builtin_volumes=("base.qcow2", "vmlinuz", "initrd.img"))
CTX = domain.RenderContext(uuid="6f1d9c62-7d2a-4a4b-9a3e-0000000000aa", ssh_port=2222, pool_dir="/p")
SPEC = """\
name: demo
pmem:
  - {name: plain, size: 1GiB}
  - {name: lab, size: 510MiB, label: 128KiB}
  - {name: real, size: 64MiB, host_pmem: true}
  - {name: vp, size: 64MiB, model: virtio-pmem}
"""


def memories() -> dict[str, ET.Element]:
    p = plan.build(spec.loads(SPEC).guests[0], FACTS)
    root = ET.fromstring(domain.render(p, replace(CTX, include_virtio_pmem=True)))
    return {m.find("alias").get("name"): m for m in root.iterfind("devices/memory")}  # type: ignore[union-attr,misc]


def test_every_nvdimm_is_mapped_2mib_aligned_and_virtio_pmem_is_not_touched() -> None:
    mems = memories()
    for alias in ("ua-pmem-plain", "ua-pmem-lab", "ua-pmem-real"):
        source = mems[alias].find("source")
        assert source is not None
        align = source.find("alignsize")
        assert align is not None, alias
        assert (int(align.text or 0) * 1024, align.get("unit")) == (2 * MiB, "KiB")
        # libvirt's schema order: path, alignsize, pmem
        assert [c.tag for c in source] == (["path", "alignsize", "pmem"] if alias == "ua-pmem-real"
                                           else ["path", "alignsize"])
    assert mems["ua-pmem-vp"].find("source/alignsize") is None  # libvirt takes alignsize for nvdimm only


def test_every_backing_size_is_a_multiple_of_the_mapping_alignment() -> None:
    # QEMU refuses a backend whose size is not a multiple of its align=.
    p = plan.build(spec.loads(SPEC).guests[0], FACTS)
    assert all(r.backing_bytes % domain.NVDIMM_MMAP_ALIGN_BYTES == 0 for r in p.nvdimm_regions)


def test_nvmprov_phases_fold_timings_and_charge_untimed_wall_to_prepare() -> None:
    timings = {"host": 0.1, "keys": 0.05, "define": 0.05, "volumes": 0.3, "start": 2.5, "ssh": 60.0,
               "agent": 25.0, "verify": 7.0, "power-cycle": 100.0}
    got = stats.nvmprov_phases(timings, wall_s=195.5)
    assert got == {"prepare": 1.0, "start": 2.5, "boot_to_ssh": 60.0, "agent": 32.0, "power_cycle": 100.0,
                   "total": 195.5}


def test_unknown_nvmprov_phase_is_an_error_not_silently_dropped() -> None:
    with pytest.raises(ValueError, match="'attach'"):
        stats.nvmprov_phases({"attach": 1.0}, wall_s=2.0)


def test_summary_median_and_spread() -> None:
    s = stats.summarize([3.0, 1.0, 10.0])
    assert (s.n, s.median, s.low, s.high, s.spread) == (3, 3.0, 1.0, 10.0, 9.0)
    assert stats.summarize([1.0, 2.0]).median == 1.5
    with pytest.raises(ValueError):
        stats.summarize([])


def test_summarize_runs_leaves_out_phases_no_run_has() -> None:
    got = stats.summarize_runs([{"start": 1.0, "total": 5.0}, {"start": 3.0, "total": 7.0}])
    assert set(got) == {"start", "total"}
    assert got["start"].median == 2.0


def test_ratio_and_verdict() -> None:
    assert stats.ratio(105.0, 100.0) == pytest.approx(1.05)
    assert stats.ratio(1.0, 0.0) is None
    assert "within" in stats.verdict(1.05)
    assert "OVER" in stats.verdict(1.06)
    assert stats.per_gib(14.0, 2 * 1024**3) == 7.0


def test_phase_table_rows_in_phase_order_with_ratio_of_medians() -> None:
    n = stats.summarize_runs([{"start": 2.0, "total": 110.0}, {"start": 4.0, "total": 90.0}])
    b = stats.summarize_runs([{"start": 2.0, "total": 100.0}])
    table = stats.phase_table(n, b).splitlines()
    assert table[0].split("|")[1].strip() == "phase"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert list(rows) == list(stats.PHASES)
    assert rows["start"] == ["3.0 (2.0-4.0)", "2.0", "1.50"]
    assert rows["total"] == ["100.0 (90.0-110.0)", "100.0", "1.00"]
    assert rows["agent"] == ["-", "-", "-"]


def test_phase_table_with_the_floor_gives_each_median_as_a_multiple_of_it() -> None:
    n = stats.summarize_runs([{"boot_to_ssh": 30.0, "total": 61.0}])
    b = stats.summarize_runs([{"boot_to_ssh": 15.0}])
    table = stats.phase_table(n, b, floor_s=6.1).splitlines()
    assert "floor (6.1 s)" in table[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert rows["boot_to_ssh"][3:] == ["4.9x", "2.5x"]
    assert rows["total"][3:] == ["10.0x", "-"]
    assert stats.fmt_floor(12.2, None) == "-"


def test_render_table_pads_columns() -> None:
    out = stats.render_table(["a", "bb"], [["long", "1"]])
    assert out.splitlines() == ["| a    | bb |", "|------|----|", "| long | 1  |"]


def test_baseline_xml_is_well_formed_and_equivalent_in_what_matters() -> None:
    g = baseline.BaselineGuest("bench-x", "base.qcow2", "vmlinuz", "initrd.img", region_bytes=4 * 1024**3)
    root = ET.fromstring(baseline.domain_xml(g, ssh_port=40123, mac="52:54:00:aa:bb:cc"))
    assert root.get("type") == "qemu"   # TCG: this host's /dev/kvm has no vmx
    mem = root.find("devices/memory")
    assert mem is not None and (mem.get("model"), mem.get("access")) == ("nvdimm", "shared")
    assert mem.findtext("source/alignsize") == "2048"
    assert mem.findtext("target/size") == str(4 * 1024**2)
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40123-:22" in args
    unaligned = ET.fromstring(baseline.domain_xml(replace(g, align=False), ssh_port=1, mac="52:54:00:aa:bb:cc"))
    assert unaligned.find("devices/memory/source/alignsize") is None


def test_baseline_guest_script_runs_the_agents_commands() -> None:
    script = baseline.setup_script("BASELINE-abc")
    for needle in ("ndctl create-namespace -f -e namespace0.0 -m fsdax", "mkfs.ext4 -q -F -b 4096 /dev/pmem0",
                   "mount -o dax /dev/pmem0 /mnt/data", "printf %s BASELINE-abc", "sync"):
        assert needle in script
    # sshd now answers before udev's coldplug loaded the nvdimm drivers: the script loads them first
    for s in (script, baseline.recheck_script()):
        assert s.index("modprobe -a nfit nd_pmem") < s.index("until [ -b /dev/pmem0 ]") < s.index("mount -o dax")
    assert subprocess.run(["sh", "-n", "-c", baseline.recheck_script()], check=False).returncode == 0


def test_fmt_summary_single_run_and_digits() -> None:
    assert stats.fmt_summary(stats.summarize([0.391])) == "0.4"
    assert stats.fmt_summary(stats.summarize([0.391, 0.5, 5.234]), 2) == "0.50 (0.39-5.23)"
    assert stats.fmt_summary(None) == "-"
