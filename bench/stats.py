"""Pure parts of the benchmark: phase mapping, medians and spread, ratios, the text table.

No subprocesses, no libvirt: tests/unit/test_bench.py covers all of it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# The phases of `create` the benchmark reports, in order. "prepare" is spec + plan + XML + keys
# + volumes (+ for nvmprov the process start-up, which no phase timer sees).
PHASES = ("prepare", "start", "boot_to_ssh", "agent", "power_cycle", "total")

# nvmprov's report (`create --json` -> guests[].timings_s) names -> benchmark phases.
NVMPROV_PHASE_OF = {
    "host": "prepare",
    "keys": "prepare",
    "define": "prepare",
    "volumes": "prepare",
    "start": "start",
    "ssh": "boot_to_ssh",
    "agent": "agent",
    "verify": "agent",
    "power-cycle": "power_cycle",
}

TARGET_RATIO = 1.05


def nvmprov_phases(timings_s: Mapping[str, float], wall_s: float) -> dict[str, float]:
    """Fold nvmprov's own phase timings into PHASES; the wall time the timers miss (interpreter
    start, imports, report output) counts as "prepare"."""
    phases = dict.fromkeys(PHASES[:-1], 0.0)
    for name, seconds in timings_s.items():
        phase = NVMPROV_PHASE_OF.get(name)
        if phase is None:
            raise ValueError(f"unknown nvmprov phase {name!r} in timings_s; add it to NVMPROV_PHASE_OF")
        phases[phase] += seconds
    phases["prepare"] += max(wall_s - sum(timings_s.values()), 0.0)
    phases["total"] = wall_s
    return {k: round(v, 2) for k, v in phases.items()}


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    low: float
    high: float

    @property
    def spread(self) -> float:
        return self.high - self.low

    def as_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "median": round(self.median, 2), "min": round(self.low, 2),
                "max": round(self.high, 2)}


def summarize(values: Iterable[float]) -> Summary:
    vals = sorted(values)
    if not vals:
        raise ValueError("no values to summarize")
    return Summary(n=len(vals), median=statistics.median(vals), low=vals[0], high=vals[-1])


def summarize_runs(runs: Sequence[Mapping[str, float]], phases: Sequence[str] = PHASES) -> dict[str, Summary]:
    """Per phase over runs; phases missing from every run are left out."""
    out = {}
    for phase in phases:
        values = [r[phase] for r in runs if phase in r]
        if values:
            out[phase] = summarize(values)
    return out


def ratio(numerator: float, denominator: float) -> float | None:
    """None when the baseline took no measurable time (a ratio would mean nothing)."""
    if denominator <= 0.005:
        return None
    return numerator / denominator


def per_gib(seconds: float, size_bytes: int) -> float:
    return seconds / (size_bytes / 1024**3)


def fmt_summary(s: Summary | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return f"{s.median:.{digits}f}"
    return f"{s.median:.{digits}f} ({s.low:.{digits}f}-{s.high:.{digits}f})"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain left-aligned text table (Markdown pipe syntax, so it pastes into docs as is)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)]) + "\n"


def fmt_floor(seconds: float | None, floor_s: float | None) -> str:
    """SECONDS as a multiple of the floor (the kernel's own boot into a panic), e.g. "8.5x"."""
    r = None if seconds is None or floor_s is None else ratio(seconds, floor_s)
    return "-" if r is None else f"{r:.1f}x"


def phase_table(
    nvmprov: Mapping[str, Summary], baseline: Mapping[str, Summary], floor_s: float | None = None
) -> str:
    """Per phase: nvmprov median (min-max), baseline median (min-max), ratio of medians; with
    FLOOR_S also each median as a multiple of the floor."""
    rows = []
    for phase in PHASES:
        a, b = nvmprov.get(phase), baseline.get(phase)
        r = ratio(a.median, b.median) if a and b else None
        row = [phase, fmt_summary(a), fmt_summary(b), fmt_ratio(r)]
        if floor_s is not None:
            row += [fmt_floor(a.median if a else None, floor_s), fmt_floor(b.median if b else None, floor_s)]
        rows.append(row)
    headers = ["phase", "nvmprov s", "baseline s", "ratio"]
    if floor_s is not None:
        headers += [f"nvmprov / floor ({floor_s:.1f} s)", "baseline / floor"]
    return render_table(headers, rows)


def verdict(total_ratio: float | None, target: float = TARGET_RATIO) -> str:
    if total_ratio is None:
        return "no ratio (baseline missing)"
    word = "within" if total_ratio <= target else "OVER"
    return f"total nvmprov/baseline = {total_ratio:.3f}: {word} the target of {target:.2f}"
