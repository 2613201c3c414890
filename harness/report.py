"""``fusedgate report``: alignment, the crossover sweep and its plots in one folder, ``reports/<date>-<card>/``.

Without a CUDA GPU it runs the CPU paths and says in the report what it skipped.
"""

from __future__ import annotations

import datetime
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.align import run_alignment
from harness.crossover import BOOTSTRAP_METHOD, describe
from harness.paths import CPU_PATHS, GPU_PATHS, cuda_reason
from harness.plots import plot_grid, plot_preset
from harness.results import read_csv, write_csv
from harness.sweep import DEFAULT_CPU_PAIRS, DEFAULT_GPU_PAIRS, run_sweep
from op.configs import ALL_CONFIGS

REGRESSION_TOLERANCE = 0.05


def _run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, str]:
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "commit": _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = str(torch.version.cuda)
        env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    except ImportError:
        env["torch"] = env["gpu"] = "not installed"
    try:
        import paddle

        env["paddle"] = paddle.__version__
    except ImportError:
        env["paddle"] = "not installed"
    env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "none"
    return env


def regressions(old: Sequence[dict], new: Sequence[dict]) -> list[str]:
    """Latencies slower by more than 5% whose interquartile ranges do not overlap (beyond the noise)."""
    key = ("path", "preset", "dtype", "T", "scores", "l2", "launch")
    before = {tuple(r[k] for k in key): r for r in old if r["metric"] == "latency"}
    lines = []
    for row in new:
        if row["metric"] != "latency":
            continue
        prev = before.get(tuple(str(row[k]) for k in key))
        if prev is None:
            continue
        if float(row["p50"]) > float(prev["p50"]) * (1 + REGRESSION_TOLERANCE) and float(row["p25"]) > float(
            prev["p75"]
        ):
            lines.append(
                f"| {row['path']} | {row['preset']} | {row['T']} | {float(prev['p50']):.2f} | {float(row['p50']):.2f} "
                f"| {float(row['p50']) / float(prev['p50']):.2f} |"
            )
    return lines


class _Progress:
    """A one-line progress counter on stderr."""

    def __init__(self, total: int):
        self.total, self.done = max(total, 1), 0

    def __call__(self, what: str) -> None:
        self.done += 1
        print(f"\r[{min(self.done, self.total)}/{self.total}] {what[:70]:<70}", end="", file=sys.stderr, flush=True)


def run_report(
    out_root: Path,
    presets: Sequence[str],
    dtype: str,
    tokens: Sequence[int],
    align_tokens: Sequence[int],
    repeats: int,
    compare: Path | None = None,
) -> Path:
    env = environment()
    on_gpu = cuda_reason() is None
    card = env["gpu"] if on_gpu else "cpu"
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    folder = out_root / f"{datetime.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-').lower()}"
    folder.mkdir(parents=True, exist_ok=True)
    skipped = []
    paths = CPU_PATHS + (GPU_PATHS if on_gpu else ())
    if not on_gpu:
        skipped.append(f"GPU paths {', '.join(GPU_PATHS)} in alignment and timing: {cuda_reason()}")
        skipped.append("graph-replayed and cold-L2 timing, bandwidth-floor fractions: need a CUDA GPU")
    pairs = DEFAULT_GPU_PAIRS if on_gpu else DEFAULT_CPU_PAIRS
    progress = _Progress(len(presets) * len(align_tokens) * 6 * len(paths) + len(presets) * len(tokens) * 4)

    align = run_alignment(
        paths, presets, [dtype], align_tokens, card=card, stamp=stamp, commit=env["commit"], progress=progress
    )
    skipped += [f"alignment of {name}: {reason}" for name, reason in align.skipped.items()]
    rows = list(align.rows)
    crossover_lines, plots, bands_by_preset = [], [], {}
    for preset in presets:
        timings, bands = run_sweep(preset, dtype, tokens, pairs, on_gpu, repeats=repeats, progress=progress)
        for path, per_t in timings.items():
            for t, timing in sorted(per_t.items()):
                rows.append(
                    {
                        "path": path,
                        "preset": preset,
                        "E": ALL_CONFIGS[preset].num_experts,
                        "dtype": dtype,
                        "T": t,
                        "scores": "scores",
                        "l2": "hot" if on_gpu else "",
                        "launch": "graph" if on_gpu else "host",
                        "distribution": "randn",
                        "metric": "latency",
                        "unit": "us",
                        "p25": f"{timing.p25:.3f}",
                        "p50": f"{timing.p50:.3f}",
                        "p75": f"{timing.p75:.3f}",
                        "n": timing.n,
                        "card": card,
                        "timestamp": stamp,
                        "commit": env["commit"],
                    }
                )
        for pair, pair_bands in bands.items():
            candidate, baseline = pair.split(" vs ")
            crossover_lines.append(
                f"| {preset} | {candidate} | {baseline} | {describe(pair_bands, candidate, baseline)} |"
            )
        bands_by_preset[preset] = bands
        plots += plot_preset([r for r in rows if r["metric"] == "latency"], bands, preset, dtype, card, folder)
    plots += plot_grid(bands_by_preset, dtype, card, folder)
    print(file=sys.stderr)

    write_csv(folder / "results.csv", rows)
    (folder / "align.md").write_text(align.table + "\n")
    lines = [f"# fusedgate report: {card}, {dtype}", ""]
    lines += ["## Environment", "", *[f"- {k}: {v}" for k, v in env.items()], ""]
    lines += ["## Skipped", ""] + ([f"- {s}" for s in skipped] or ["- nothing"]) + [""]
    passed = "every case passed" if align.ok else f"{len(align.failures)} failures"
    lines += ["## Alignment", "", f"{passed}; full matrix in `align.md`.", ""]
    lines += [f"- {f}" for f in align.failures[:20]] + [""]
    lines += [
        "## Crossovers",
        "",
        f"Speedup = baseline / candidate; 95% band by {BOOTSTRAP_METHOD}, n = {repeats} "
        "repeats per point; a crossover is reported only where the band excludes 1.0 on both sides.",
        "",
        "| preset | candidate | baseline | result |",
        "|---|---|---|---|",
        *crossover_lines,
        "",
    ]
    lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots if p.suffix == ".png"], ""]
    if compare is not None:
        old = read_csv(compare / "results.csv")
        slower = regressions(old, rows)
        lines += [f"## Regressions against `{compare}`", ""]
        lines += (
            ["| path | preset | T | old µs | new µs | ratio |", "|---|---|---|---|---|---|", *slower]
            if slower
            else ["none beyond 5% and the interquartile noise band"]
        )
        lines.append("")
    (folder / "report.md").write_text("\n".join(lines))
    return folder
