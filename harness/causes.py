"""What sets each crossover, from the sweep that found it: per path and token count, the GPU time (graph
replay), the host's time to issue one eager call and the eager time per call, and one line per crossover
naming, on either side of it, which of host and GPU time each path's eager cost follows.
"""

from __future__ import annotations

from harness.crossover import Crossover, find_crossovers
from harness.sweep import SweepResult
from harness.timing import Timing

EXPLANATION = (
    "Back-to-back eager calls take about the larger of the host's time to issue one call (`host`, the issuing "
    "loop's wall time) and the GPU time per call (`GPU`, graph replay, which has no host cost). A path is "
    "host-bound where its host time is the larger: its eager time then hides GPU time, and shrinking it moves "
    "the eager crossover; under graph replay the GPU time alone sets the crossover."
)


def median_text(timing: Timing | None) -> str:
    return f"{timing.p50:.2f}" if timing is not None else "-"


def _columns(sweep: SweepResult) -> list[tuple[str, dict[str, dict[int, Timing]]]]:
    columns = []
    if "graph" in sweep.timings:
        columns.append(("GPU", sweep.timings["graph"]))
    if sweep.host:
        columns.append(("host", sweep.host))
    if "eager" in sweep.timings:
        columns.append(("eager", sweep.timings["eager"]))
    return columns


def cost_table(preset: str, sweep: SweepResult) -> list[str]:
    """Markdown rows, one per token count any launch kind measured: µs per call of each path in each column."""
    columns = _columns(sweep)
    paths = sorted({p for _, per_path in columns for p in per_path})
    tokens = sorted({t for _, per_path in columns for per_t in per_path.values() for t in per_t})
    head = " | ".join(f"{p} {name}" for p in paths for name, _ in columns)
    lines = [f"| preset | T | {head} |", "|---|---|" + "---|" * (len(paths) * len(columns))]
    for t in tokens:
        cells = " | ".join(median_text(per_path[p].get(t)) for p in paths for _, per_path in columns)
        lines.append(f"| {preset} | {t} | {cells} |")
    return lines


def _bound(sweep: SweepResult, path: str, tokens: int) -> str | None:
    """``host`` or ``GPU``: whichever time is the larger at ``tokens``, or None where either is unmeasured."""
    gpu = sweep.timings.get("graph", {}).get(path, {}).get(tokens)
    host = sweep.host.get(path, {}).get(tokens)
    if gpu is None or host is None:
        return None
    return "host" if host.p50 > gpu.p50 else "GPU"


def _state(sweep: SweepResult, path: str, tokens: int) -> str:
    eager = sweep.timings.get("eager", {}).get(path, {}).get(tokens)
    bound = _bound(sweep, path, tokens)
    if bound is None:
        return f"{path} {median_text(eager)} µs"
    host, gpu = sweep.host[path][tokens], sweep.timings["graph"][path][tokens]
    return f"{path} {bound}-bound (eager {median_text(eager)}, host {host.p50:.2f}, GPU {gpu.p50:.2f} µs)"


def explain(sweep: SweepResult, launch: str, candidate: str, baseline: str, crossing: Crossover) -> str:
    """One line: the crossover, then each path's cost at the two token counts that bracket it."""
    head = (
        f"{candidate} vs {baseline}, {launch}: {crossing.direction} between T={crossing.low_tokens} and "
        f"T={crossing.high_tokens} (about T={crossing.at_tokens:.0f})"
    )
    timings = sweep.timings[launch]
    low, high = crossing.low_tokens, crossing.high_tokens
    spans = ", ".join(
        f"{p} {median_text(timings[p].get(low))} → {median_text(timings[p].get(high))} µs"
        for p in (candidate, baseline)
    )
    if launch == "graph":
        return f"{head}: GPU time alone, {spans}"
    if not sweep.host:
        return f"{head}: host time is the whole cost on the CPU, {spans}"
    sides = "; ".join(
        f"at T={t}: " + ", ".join(_state(sweep, p, t) for p in (candidate, baseline)) for t in (low, high)
    )
    bounds = [_bound(sweep, p, high) for p in (candidate, baseline)]
    if None in bounds:
        return f"{head}: {sides}"
    return f"{head}: {sides}; set by {candidate}'s {bounds[0]} time against {baseline}'s {bounds[1]} time"


def crossover_notes(preset: str, sweep: SweepResult) -> list[str]:
    """One markdown bullet per crossover the sweep found, any launch kind, any pair."""
    notes = []
    for launch, pairs in sweep.bands.items():
        for pair, bands in pairs.items():
            candidate, baseline = pair.split(" vs ")
            notes += [f"- {preset}, {explain(sweep, launch, candidate, baseline, c)}" for c in find_crossovers(bands)]
    return notes


def section(sweeps: dict[str, SweepResult]) -> list[str]:
    """The report's section: every crossover explained, then the per-T cost table of each preset."""
    notes = [note for preset, sweep in sweeps.items() for note in crossover_notes(preset, sweep)]
    lines = ["## What sets each crossover", "", EXPLANATION, "", *(notes or ["- no crossover found in range"]), ""]
    lines += ["### µs per call by token count (medians, same run)", ""]
    for preset, sweep in sweeps.items():
        lines += [*cost_table(preset, sweep), ""]
    return lines
