"""nvmprov benchmark: where `create` spends its time, against a hand-written virsh baseline; start-up
cost per nvdimm region size; guests created in parallel; CLI latency.

    .venv/bin/python bench/run.py [--quick] [--runs N] [--out bench/results/latest.json]
                                  [--only floor,phases,regions,count,latency] [--max-load 3]
                                  [--prefix bench-]

The floor is the built-in image's own kernel and initrd booted by QEMU/TCG straight into a panic
(no userspace at all): nothing that boots this kernel can be faster, and this machine's speed moves
2x between days, so the phases are also given as multiples of the floor measured in the same run.

Progress goes to stderr, the tables (Markdown) to stdout, everything measured to --out as JSON.
It is a benchmark, not a test: it never runs in CI and fails only when a run itself fails.
Guests are named bench-* (--prefix); every domain and volume it makes is removed, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from any directory: import bench.* and nvmprov.*

from bench import baseline, stats  # noqa: E402

GiB = 1024**3
EXPERIMENTS = ("floor", "latency", "regions", "phases", "count")  # run in this order: quick ones first
DEFAULT_REGION_SIZES_GIB = (1, 4, 8, 16)
DEFAULT_COUNTS = (1, 2, 4)
LATENCY_RUNS = 10
DISK_MARGIN_BYTES = 4 * GiB    # left free beyond a region's own size before a region-size run
CREATE_TIMEOUT_S = 1800.0      # one `nvmprov create`; four at once on 2 cores under TCG take ~15 min
POOL_DIR = "/var/lib/nvmprov/pool"
QUIET_POLL_S = 30.0
FLOOR_TIMEOUT_S = 300.0
# The kernel boots, finds no init (rdinit) and no root, panics, and panic=-1 reboots at once;
# -no-reboot turns that reboot into QEMU's exit.
FLOOR_APPEND = "console=ttyS0 panic=-1 rdinit=/nonexistent root=/dev/nonexistent"
PREFIX = "bench-"  # of every guest this run makes (--prefix)

SPEC = """\
version: 1
name: {name}
memory: 1GiB
vcpus: 1
pmem:
  - name: data
    size: {size_gib}GiB
    filesystem: ext4
    mount: /mnt/data
"""


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def nvmprov_bin() -> str:
    venv = ROOT / ".venv" / "bin" / "nvmprov"
    found = str(venv) if venv.exists() else shutil.which("nvmprov")
    if not found:
        sys.exit("bench: no nvmprov command: run scripts/setup.sh (makes .venv) or `pip install -e .`")
    return found


# ---------------------------------------------------------------------------------------------
# the machine and its load


def load() -> dict[str, Any]:
    """Load averages and the domains of others running now: every result carries them."""
    one, five, fifteen = (float(x) for x in Path("/proc/loadavg").read_text().split()[:3])
    names = baseline.virsh("list", "--name", check=False).split()
    return {"loadavg": [one, five, fifteen], "other_domains": sorted(n for n in names if not n.startswith(PREFIX))}


def machine() -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"], check=False).returncode != 0
    return {
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "libvirt": first_line(["virsh", "--version"]), "qemu": first_line(["qemu-system-x86_64", "--version"]),
        "accel": "tcg (no vmx/svm)" if "vmx" not in Path("/proc/cpuinfo").read_text() else "kvm possible",
        "nvmprov_commit": commit + ("+dirty" if dirty else ""),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def preflight(nvmprov: str) -> tuple[str, str, str]:
    """libvirtd answers and the built-in image exists (built now if not: not part of any timing)."""
    from nvmprov import image

    try:
        baseline.virsh("uri")
    except baseline.BenchError as e:
        sys.exit(f"bench: libvirt at {baseline.URI} does not answer ({e}); start `virtlogd -d; libvirtd -d`")
    names = image.builtin_volume_names()
    if baseline.virsh("vol-path", "--pool", "nvmprov", names[0], check=False).strip() == "":
        log("built-in image missing: building it first (not timed)")
        subprocess.run([nvmprov, "image", "build"], check=True)
    return names


# ---------------------------------------------------------------------------------------------
# nvmprov runs


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (nvmprov rolls back what it made), then wait for it."""
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=300)


def wait_for_quiet(max_load: float | None, max_wait_s: float) -> None:
    """Other engineers' guests boot on this machine too: wait (bounded) until the 1-minute load
    average is below max_load, so a run does not start in the middle of their burst."""
    if max_load is None:
        return
    deadline = time.monotonic() + max_wait_s
    while (now := load()["loadavg"][0]) >= max_load and time.monotonic() < deadline:
        log(f"load {now:.2f} >= {max_load}: waiting (up to {deadline - time.monotonic():.0f} s more)")
        time.sleep(QUIET_POLL_S)


class Runner:
    def __init__(self, nvmprov: str, workdir: Path, quiet: Callable[[], None] = lambda: None) -> None:
        self.nvmprov = nvmprov
        self.workdir = workdir
        self.quiet = quiet
        workdir.mkdir(parents=True, exist_ok=True)

    def spec(self, name: str, size_gib: int = 1) -> Path:
        path = self.workdir / f"{name}.yaml"
        path.write_text(SPEC.format(name=name, size_gib=size_gib))
        return path

    def popen(self, name: str, size_gib: int, extra: Sequence[str]) -> tuple[subprocess.Popen[bytes], float]:
        err = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        argv = [self.nvmprov, "create", str(self.spec(name, size_gib)), "--json", *extra]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err), time.monotonic()

    def finish(self, name: str, proc: subprocess.Popen[bytes], began: float) -> dict[str, Any]:
        out, _ = proc.communicate(timeout=CREATE_TIMEOUT_S)
        wall = round(time.monotonic() - began, 2)
        try:
            guest = json.loads(out)["guests"][0]
        except (ValueError, KeyError, IndexError):
            tail = (self.workdir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise baseline.BenchError(f"nvmprov create {name}: exit {proc.returncode}, no report: {tail}") from None
        if not guest["ok"]:
            raise baseline.BenchError(f"nvmprov create {name} failed: {guest.get('error')}")
        return {"wall_s": wall, "timings_s": guest["timings_s"]}

    def create(self, name: str, size_gib: int = 1, extra: Sequence[str] = ()) -> dict[str, Any]:
        proc = None
        try:
            proc, began = self.popen(name, size_gib, extra)
            return self.finish(name, proc, began)
        finally:
            if proc is not None:
                stop(proc)
            self.destroy(name)

    def destroy(self, name: str) -> None:
        subprocess.run([self.nvmprov, "destroy", name, "--purge", "--yes"], capture_output=True, check=False)


# ---------------------------------------------------------------------------------------------
# experiments


def floor(image_names: tuple[str, str, str], runs: int) -> dict[str, Any]:
    """The image's kernel + initrd under TCG straight into a panic: wall time of the whole QEMU
    process (start-up included, as a guest's boot includes it), median of RUNS."""
    _base, kernel_vol, initrd_vol = image_names
    kernel = baseline.virsh("vol-path", "--pool", "nvmprov", kernel_vol).strip()
    initrd = baseline.virsh("vol-path", "--pool", "nvmprov", initrd_vol).strip()
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "1024", "-smp", "1",
            "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "null",
            "-kernel", kernel, "-initrd", initrd, "-append", FLOOR_APPEND, "-no-reboot"]
    times = []
    for i in range(runs):
        log(f"floor run {i + 1}/{runs}: the image's kernel into a panic under TCG")
        began = time.monotonic()
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=FLOOR_TIMEOUT_S)
        times.append(time.monotonic() - began)
    s = stats.summarize(times)
    table = stats.render_table(["what", "median s", "min s", "max s"],
                               [["kernel + initrd into a panic (TCG)", f"{s.median:.2f}", f"{s.low:.2f}",
                                 f"{s.high:.2f}"]])
    return {**s.as_dict(), "runs_s": [round(t, 2) for t in times], "argv": argv, "table": table, "load": load()}


def _floor_s(result: dict[str, Any]) -> float | None:
    median = result.get("floor", {}).get("median")
    return None if median is None else float(median)


def phases(r: Runner, image_names: tuple[str, str, str], runs: int, floor_s: float | None = None) -> dict[str, Any]:
    """nvmprov and the baseline alternately (which goes first swaps every run, so drift in the
    machine's load hits both alike)."""
    nvm_runs, base_runs, raw = [], [], []
    for i in range(runs):
        def nvm(i: int = i) -> None:
            r.quiet()
            log(f"phases run {i + 1}/{runs}: nvmprov create {PREFIX}n{i}")
            res = r.create(f"{PREFIX}n{i}")
            nvm_runs.append(stats.nvmprov_phases(res["timings_s"], res["wall_s"]))
            raw.append({"who": "nvmprov", "run": i, **res, "load": load()})

        def base(i: int = i) -> None:
            r.quiet()
            log(f"phases run {i + 1}/{runs}: baseline {PREFIX}b{i}")
            g = baseline.BaselineGuest(f"{PREFIX}b{i}", *image_names)
            res = baseline.measure(g)
            base_runs.append(res)
            raw.append({"who": "baseline", "run": i, "phases_s": res, "load": load()})

        order: list[Callable[[], None]] = [nvm, base] if i % 2 == 0 else [base, nvm]
        for step in order:
            step()
    n_sum, b_sum = stats.summarize_runs(nvm_runs), stats.summarize_runs(base_runs)
    total = stats.ratio(n_sum["total"].median, b_sum["total"].median)
    return {
        "nvmprov": {k: v.as_dict() for k, v in n_sum.items()},
        "baseline": {k: v.as_dict() for k, v in b_sum.items()},
        "ratio_total": None if total is None else round(total, 3),
        "runs": raw,
        "table": stats.phase_table(n_sum, b_sum, floor_s),
        "floor_s": floor_s,
        "verdict": stats.verdict(total),
    }


def regions(r: Runner, image_names: tuple[str, str, str], sizes_gib: Sequence[int]) -> dict[str, Any]:
    """Start-up cost (define + start until QEMU runs) per nvdimm size: nvmprov (2 MiB-aligned
    mapping) against the same hand-written XML without <alignsize> (libvirt's default)."""
    rows: list[dict[str, Any]] = []
    for size in sizes_gib:
        free = shutil.disk_usage(POOL_DIR).free
        if free < size * GiB + DISK_MARGIN_BYTES:
            log(f"regions: {size} GiB skipped, only {free / GiB:.1f} GiB free in {POOL_DIR}")
            rows.append({"size_gib": size, "skipped": f"{free / GiB:.1f} GiB free"})
            continue
        try:
            r.quiet()
            log(f"regions: {size} GiB nvmprov create --until start")
            res = r.create(f"{PREFIX}r{size}", size, ["--until", "start"])
            log(f"regions: {size} GiB hand-written XML without alignsize, virsh create --paused")
            g = baseline.BaselineGuest(f"{PREFIX}u{size}", *image_names, region_bytes=size * GiB, align=False)
            unaligned = baseline.start_only(g)
        except baseline.BenchError as e:  # keep the other sizes' numbers
            log(f"regions: {size} GiB FAILED: {e}")
            rows.append({"size_gib": size, "skipped": f"failed: {e}"})
            continue
        rows.append({
            "size_gib": size, "nvmprov_start_s": res["timings_s"].get("start"),
            "nvmprov_define_to_running_s": round(sum(res["timings_s"].values()), 2),
            "unaligned_start_s": unaligned, "load": load(),
        })
    table_rows = [
        [str(x["size_gib"]),
         f"{x['nvmprov_start_s']:.1f}", f"{stats.per_gib(x['nvmprov_start_s'], x['size_gib'] * GiB):.2f}",
         f"{x['unaligned_start_s']:.1f}", f"{stats.per_gib(x['unaligned_start_s'], x['size_gib'] * GiB):.2f}",
         f"{x['load']['loadavg'][0]:.2f}"]
        for x in rows if "skipped" not in x
    ]
    table = stats.render_table(
        ["GiB", "nvmprov start s", "s/GiB", "no alignsize s", "s/GiB", "load"], table_rows)
    return {"rows": rows, "table": table}


def count(r: Runner, ns: Sequence[int], single_s: float | None = None) -> dict[str, Any]:
    """N full creates at once (N separate processes, as N CI jobs would start them): total wall
    against N x the single-guest time (the N=1 run, else `single_s`: the phases median)."""
    rows: list[dict[str, Any]] = []
    single = single_s
    for n in ns:
        names = [f"{PREFIX}c{n}-{i}" for i in range(n)]
        r.quiet()
        log(f"count: {n} guest(s) at once: {', '.join(names)}")
        before = load()
        began = time.monotonic()
        procs = []
        try:
            for name in names:
                procs.append((name, *r.popen(name, 1, [])))
            results = [r.finish(name, proc, t0) for name, proc, t0 in procs]
            wall = round(time.monotonic() - began, 2)
        finally:
            for _, proc, _ in procs:
                stop(proc)
            for name in names:
                r.destroy(name)
        if n == 1:
            single = results[0]["wall_s"]
        rows.append({
            "n": n, "wall_s": wall, "per_guest_wall_s": [x["wall_s"] for x in results],
            "per_guest_timings_s": [x["timings_s"] for x in results],
            "n_times_single_s": None if single is None else round(n * single, 2),
            "ratio": None if single is None else round(wall / (n * single), 3), "load_before": before,
        })
    table = stats.render_table(
        ["guests", "wall s", "N x single s", "wall / (N x single)", "slowest guest s"],
        [[str(x["n"]), f"{x['wall_s']:.1f}", "-" if x["n_times_single_s"] is None else f"{x['n_times_single_s']:.1f}",
          stats.fmt_ratio(x["ratio"]), f"{max(x['per_guest_wall_s']):.1f}"] for x in rows],
    )
    return {"rows": rows, "table": table}


def latency(nvmprov: str, runs: int = LATENCY_RUNS) -> dict[str, Any]:
    """Whole processes, as a user starts them (one warm-up run first: page cache, .pyc)."""
    commands = {"nvmprov --help": [nvmprov, "--help"],
                "nvmprov render examples/guest.yaml": [nvmprov, "render", str(ROOT / "examples" / "guest.yaml")]}
    out: dict[str, Any] = {}
    for label, argv in commands.items():
        subprocess.run(argv, capture_output=True, check=True)
        times = []
        for _ in range(runs):
            began = time.monotonic()
            subprocess.run(argv, capture_output=True, check=True)
            times.append(time.monotonic() - began)
        out[label] = stats.summarize(times).as_dict()
    table = stats.render_table(
        ["command", "median s", "min s", "max s", "target"],
        [[k, f"{v['median']:.3f}", f"{v['min']:.3f}", f"{v['max']:.3f}", "< 0.3 s"] for k, v in out.items()],
    )
    return {"commands": out, "table": table, "load": load()}


# ---------------------------------------------------------------------------------------------


def _phases_total(result: dict[str, Any]) -> float | None:
    total = result.get("phases", {}).get("nvmprov", {}).get("total")
    return None if total is None else float(total["median"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one run per measurement (default runs: 3)")
    p.add_argument("--runs", type=int, help="runs of nvmprov and of the baseline (default 3, --quick 1)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"), help="JSON results file")
    p.add_argument("--only", default=",".join(EXPERIMENTS), help=f"comma list of {', '.join(EXPERIMENTS)}")
    p.add_argument("--prefix", default=PREFIX, help=f"of the guests' names (default {PREFIX})")
    p.add_argument("--max-load", type=float, help="before each run wait until the 1-min load is below this")
    p.add_argument("--max-wait-s", type=float, default=900.0, help="... but at most this long (default 900)")
    p.add_argument("--region-sizes", default=",".join(map(str, DEFAULT_REGION_SIZES_GIB)), help="GiB, comma list")
    p.add_argument("--counts", default=",".join(map(str, DEFAULT_COUNTS)),
                   help="guests at once, comma list (without 1, the phases median is the single time)")
    args = p.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    bad = [x for x in args.only if x not in EXPERIMENTS]
    if bad:
        p.error(f"--only: unknown experiment(s) {', '.join(bad)}; pick from {', '.join(EXPERIMENTS)}")
    args.runs = args.runs or (1 if args.quick else 3)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    try:
        args.region_sizes = [int(x) for x in args.region_sizes.split(",") if x]
        args.counts = [int(x) for x in args.counts.split(",") if x]
    except ValueError:
        p.error("--region-sizes and --counts take whole numbers separated by commas, e.g. 1,4,8")
    return args


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    global PREFIX
    args = parse_args(argv)
    PREFIX = args.prefix
    nvmprov = nvmprov_bin()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "load_at_start": load(), "runs": args.runs,
                              "argv": list(sys.argv[1:] if argv is None else argv)}
    runner = Runner(nvmprov, out_path.parent / "work", lambda: wait_for_quiet(args.max_load, args.max_wait_s))
    signal.signal(signal.SIGTERM, _interrupted)  # a killed benchmark still stops its guests
    image_names = preflight(nvmprov) if set(args.only) - {"latency"} else ("", "", "")
    experiments: dict[str, Callable[[], dict[str, Any]]] = {
        "latency": lambda: (runner.quiet(), latency(nvmprov))[1],
        "floor": lambda: floor(image_names, args.runs),
        "phases": lambda: phases(runner, image_names, args.runs, _floor_s(result)),
        "regions": lambda: regions(runner, image_names, args.region_sizes),
        "count": lambda: count(runner, args.counts, _phases_total(result)),
    }
    status = 0
    for name in EXPERIMENTS:
        if name not in args.only:
            continue
        began = time.monotonic()
        try:
            result[name] = experiments[name]()
        except KeyboardInterrupt:
            log(f"{name}: interrupted; its guests were stopped and removed")
            return 130
        except (baseline.BenchError, subprocess.SubprocessError) as e:
            log(f"{name}: FAILED: {e}")
            result[name] = {"error": str(e)}
            status = 1
        result[name]["took_s"] = round(time.monotonic() - began, 1)
        out_path.write_text(json.dumps(result, indent=2) + "\n")  # after each: a long run keeps what it got
    result["load_at_end"] = load()
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(render_report(result))
    log(f"results in {out_path}")
    return status


def render_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# nvmprov benchmark {m['when']} (commit {m['nvmprov_commit']})", "",
             f"{m['cpus']} CPUs, {m['accel']}, {m['libvirt']} libvirt, {m['qemu']}; "
             f"load at start {result['load_at_start']['loadavg']}, "
             f"other guests {result['load_at_start']['other_domains']}",
             ""]
    titles = {"floor": f"## the floor: the image's kernel into a panic ({result['runs']} run(s))",
              "phases": f"## create, per phase ({result['runs']} run(s): median (min-max))",
              "regions": "## nvdimm region size: start-up", "count": "## guests created at once",
              "latency": "## CLI latency"}
    for name in EXPERIMENTS:
        if name in result:
            lines += [titles[name], ""]
            lines.append(result[name].get("table") or f"FAILED: {result[name].get('error')}")
            if name == "phases" and "verdict" in result[name]:
                lines.append(result[name]["verdict"])
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
