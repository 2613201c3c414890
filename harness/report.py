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

from harness import causes
from harness.align import run_alignment
from harness.bench import latency_row
from harness.compare import card_of, cross_card_table
from harness.crossover import BOOTSTRAP_METHOD, describe
from harness.paths import CPU_PATHS, GPU_PATHS, cuda_reason
from harness.plots import plot_grid, plot_preset
from harness.progress import Progress
from harness.results import git_commit, read_csv, write_csv
from harness.sweep import CPU_LAUNCHES, DEFAULT_CPU_PAIRS, DEFAULT_GPU_PAIRS, GPU_LAUNCHES, SweepResult, run_sweep
from op.configs import ALL_CONFIGS

REGRESSION_TOLERANCE = 0.05
# Token counts at which the report times cold L2 in both launch kinds (the sweep itself is hot L2).
MODE_TOKENS = (1, 64, 1024, 8192, 65536)
MODE_PATHS = ("fused", "fused_noscores", "two_kernel", "fused_block")


def _run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, str]:
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        # The subcommand and its options only: the program's own path names the machine, not the run.
        "command": " ".join(["fusedgate", *(shlex.quote(a) for a in sys.argv[1:])]),
        "commit": git_commit(),
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


def _gpu_modes(
    presets: Sequence[str],
    dtype: str,
    tokens: Sequence[int],
    repeats: int,
    context: dict,
    sweeps: dict[str, SweepResult],
    progress,
) -> tuple[list[dict], list[str], list[str]]:
    """Cold-L2 timings in both launch kinds at a few token counts beside the sweep's hot ones, each path's
    fraction of the bandwidth floor, and the harness's own overhead: the rows, a markdown section of them, and
    an overhead section."""
    import torch

    from harness.bench import floor_us, measure
    from harness.timing import copy_bandwidth, harness_overhead, l2_bytes, l2_flusher

    points = [t for t in MODE_TOKENS if t <= max(tokens)]
    bandwidth, flush = copy_bandwidth(), l2_flusher()
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, lines = (
        [],
        [
            "## Launch kinds and L2 modes",
            "",
            f"µs per call (median of {repeats}); `graph` = a CUDA graph of 20 back-to-back calls, `eager` = 20 eager "
            f"calls; `cold` rotates inputs totalling at least 2x the L2 ({l2_bytes() / 2**20:.0f} MiB); floor = bytes "
            f"that must move / measured copy bandwidth ({bandwidth / 1e12:.2f} TB/s, read + write); floor fraction is "
            "cold graph only. The hot columns are the sweep's.",
            "",
            "| preset | T | path | hot graph | cold graph | hot eager | cold eager | floor fraction (cold graph) |",
            "|---|---|---|---|---|---|---|---|",
        ],
    )
    for preset in presets:
        for t in points:
            progress(f"modes {preset} T={t}")
            launches = ["graph", "eager"]
            results, new_rows = measure(
                preset, t, MODE_PATHS, ["cold"], launches, dtype, repeats, generator, flush, bandwidth, context
            )
            rows += new_rows
            config = ALL_CONFIGS[preset]
            elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
            for path in MODE_PATHS:
                scores = not path.endswith("_noscores")
                hot = {launch: sweeps[preset].timings[launch].get(path, {}).get(t) for launch in ("graph", "eager")}
                floor = floor_us(t, config.num_experts, config.top_k, elem, scores, bandwidth)
                cold_graph = results[(path, "cold", "graph")].p50
                lines.append(
                    f"| {preset} | {t} | {path} | {causes.median_text(hot['graph'])} | {cold_graph:.2f} "
                    f"| {causes.median_text(hot['eager'])} | {results[(path, 'cold', 'eager')].p50:.2f} "
                    f"| {floor / cold_graph:.3g} |"
                )
    overhead = [
        "",
        "## Harness overhead",
        "",
        "What measuring costs, timed the same way as the paths (median, IQR).",
        "",
        "| what | p25 | p50 | p75 |",
        "|---|---|---|---|",
    ]
    for what, timing in harness_overhead(repeats).items():
        overhead.append(f"| {what} | {timing.p25:.3f} | {timing.p50:.3f} | {timing.p75:.3f} |")
    return rows, [*lines, ""], [*overhead, ""]


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
    launches = GPU_LAUNCHES if on_gpu else CPU_LAUNCHES
    sweep_paths = len({p for pair in pairs for p in pair})
    modes = len([t for t in MODE_TOKENS if t <= max(tokens)]) if on_gpu else 0
    progress = Progress(
        len(presets) * (len(align_tokens) * 6 * len(paths) + len(tokens) * sweep_paths * len(launches) + modes)
    )

    align = run_alignment(
        paths, presets, [dtype], align_tokens, card=card, stamp=stamp, commit=env["commit"], progress=progress
    )
    skipped += [f"alignment of {name}: {reason}" for name, reason in align.skipped.items()]
    rows = list(align.rows)
    context = {"card": card, "timestamp": stamp, "commit": env["commit"]}
    crossover_lines, sweeps = [], {}
    l2 = "hot" if on_gpu else ""
    for preset in presets:
        config = ALL_CONFIGS[preset]
        sweep = sweeps[preset] = run_sweep(preset, dtype, tokens, pairs, on_gpu, repeats=repeats, progress=progress)
        for launch, per_path in sweep.timings.items():
            for path, per_t in per_path.items():
                for t, timing in sorted(per_t.items()):
                    rows.append(latency_row(path, preset, config, dtype, t, True, l2, launch, timing, context))
        for path, per_t in sweep.host.items():
            for t, timing in sorted(per_t.items()):
                row = latency_row(path, preset, config, dtype, t, True, l2, "eager", timing, context)
                rows.append(row | {"metric": "host_per_call"})
        for launch, pairs_bands in sweep.bands.items():
            for pair, pair_bands in pairs_bands.items():
                candidate, baseline = pair.split(" vs ")
                crossover_lines.append(
                    f"| {preset} | {launch} | {candidate} | {baseline} | {describe(pair_bands, candidate, baseline)} |"
                )
    mode_lines, overhead_lines = [], []
    if on_gpu:
        mode_rows, mode_lines, overhead_lines = _gpu_modes(presets, dtype, tokens, repeats, context, sweeps, progress)
        rows += mode_rows
    progress.close()
    plots = []
    for preset in presets:
        plots += plot_preset(rows, sweeps[preset].bands, preset, dtype, card, folder)
    plots += plot_grid({preset: sweep.bands for preset, sweep in sweeps.items()}, dtype, card, folder)

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
        "| preset | launch | candidate | baseline | result |",
        "|---|---|---|---|---|",
        *crossover_lines,
        "",
    ]
    lines += causes.section(sweeps)
    lines += mode_lines + overhead_lines
    lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots if p.suffix == ".png"], ""]
    if compare is not None:
        old = read_csv(compare / "results.csv")
        if card_of(old) == card:
            slower = regressions(old, rows)
            lines += [f"## Regressions against `{compare}`", ""]
            lines += (
                ["| path | preset | T | old µs | new µs | ratio |", "|---|---|---|---|---|---|", *slower]
                if slower
                else ["none beyond 5% and the interquartile noise band"]
            )
        else:
            lines += [f"## Against `{compare}` ({card_of(old)})", "", *cross_card_table(old, rows)]
        lines.append("")
    (folder / "report.md").write_text("\n".join(lines))
    return folder
