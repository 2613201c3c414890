"""Plots of a timing sweep, read from the long-format rows: latency, speedup with crossovers, bandwidth.

Each figure is written as PNG and SVG; titles carry preset, dtype and card, axes carry units.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from harness.crossover import Band, find_crossovers  # noqa: E402


def _series(rows: Sequence[dict], preset: str, metric: str) -> dict[str, list[tuple[int, float, float, float]]]:
    series = defaultdict(list)
    for row in rows:
        if row["preset"] == preset and row["metric"] == metric:
            name = row["path"] + (" no scores" if row.get("scores") == "noscores" else "")
            kinds = ", ".join(k for k in (row.get("l2"), row.get("launch")) if k)
            label = f"{name} ({kinds})" if kinds else name
            series[label].append((int(row["T"]), float(row["p25"]), float(row["p50"]), float(row["p75"])))
    return {k: sorted(v) for k, v in series.items()}


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


# Launch kinds share a colour per pair and differ by line style, so a reader compares eager and graph at a glance.
LINE_STYLES = {"graph": "-", "eager": "--"}


def _speedup_panel(
    ax, bands_by_launch: dict[str, dict[str, Sequence[Band]]], fontsize: int, legend: bool = True
) -> None:
    """Median speedup per pair and launch kind, its bootstrap band shaded, each crossover marked and labelled
    with its token count and the band of token counts it lies in; log scale, so 100x and 1.1x both read."""
    ax.axhline(1.0, color="black", lw=0.8)
    pairs = sorted({pair for bands in bands_by_launch.values() for pair in bands})
    colours = {pair: f"C{i}" for i, pair in enumerate(pairs)}
    for launch, bands in bands_by_launch.items():
        for pair, pair_bands in bands.items():
            ordered = sorted(pair_bands, key=lambda b: b.tokens)
            t = [b.tokens for b in ordered]
            colour = colours[pair]
            ls = LINE_STYLES.get(launch, "-")
            ax.plot(t, [b.median for b in ordered], ls=ls, marker="o", ms=2.5, color=colour, label=f"{pair}, {launch}")
            ax.fill_between(t, [b.low for b in ordered], [b.high for b in ordered], color=colour, alpha=0.2, lw=0)
            for crossing in find_crossovers(ordered):
                ax.axvspan(crossing.low_tokens, crossing.high_tokens, color=colour, alpha=0.08, lw=0)
                ax.axvline(crossing.at_tokens, ls=ls, lw=0.9, color=colour)
                # Hung from the top of the panel, inside it, beside its line.
                ax.annotate(
                    f"{crossing.label} {launch}",
                    (crossing.at_tokens, 0.98),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, 0),
                    textcoords="offset points",
                    fontsize=fontsize + 1,
                    color=colour,
                    rotation=90,
                    va="top",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                )
    ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="speedup (baseline / candidate, ×, log scale)")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    if legend:
        ax.legend(fontsize=fontsize)


def plot_preset(
    rows: Sequence[dict],
    bands_by_launch: dict[str, dict[str, Sequence[Band]]],
    preset: str,
    dtype: str,
    card: str,
    out_dir: Path,
) -> list[Path]:
    """Latency vs T (log-log, IQR bands) for every launch kind, speedup vs T per launch kind with its bands and
    crossovers, and the bandwidth fraction where measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fraction = _series([r for r in rows if r.get("launch") != "eager"], preset, "floor_fraction")
    fig, axes = plt.subplots(1, 3 if fraction else 2, figsize=(17 if fraction else 12, 4.8), layout="constrained")
    latency_ax, speed_ax = axes[0], axes[1]
    # The latency panel holds the sweep (hot L2 or host timings); cold-L2 timings sit in the report's tables.
    swept = [r for r in rows if r.get("l2") in ("hot", "", None)]
    latency = _series(swept, preset, "latency")
    # One colour per path, one line style per launch kind, as in the speedup panel.
    colours = {name: f"C{i}" for i, name in enumerate(sorted({label.split(" (")[0] for label in latency}))}
    for label, points in sorted(latency.items()):
        t = [p[0] for p in points]
        colour, ls = colours[label.split(" (")[0]], "--" if "eager" in label else "-"
        latency_ax.plot(t, [p[2] for p in points], ls=ls, color=colour, marker="o", ms=3, label=label)
        latency_ax.fill_between(t, [p[1] for p in points], [p[3] for p in points], color=colour, alpha=0.2)
    latency_ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="latency per call (µs)", title="latency")
    latency_ax.legend(fontsize=7)
    _speedup_panel(speed_ax, bands_by_launch, 7)
    speed_ax.set_title("speedup (band: 95% bootstrap; shaded span: crossover band)")
    if fraction:
        for label, points in fraction.items():
            axes[2].plot([p[0] for p in points], [p[2] for p in points], marker="o", ms=3, label=label)
        axes[2].set(xscale="log", xlabel="tokens T", ylabel="fraction of copy bandwidth", title="bandwidth (cold L2)")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"{preset}, {dtype}, {card}")
    return _save(fig, out_dir, f"{preset}-{dtype}")


def plot_grid(
    bands_by_preset: dict[str, dict[str, dict[str, Sequence[Band]]]], dtype: str, card: str, out_dir: Path
) -> list[Path]:
    """One speedup panel per preset, every launch kind in it, bands and crossovers as in the per-preset figures."""
    names = sorted(bands_by_preset)
    cols = min(3, max(1, len(names)))
    rows_n = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows_n, cols, figsize=(5.5 * cols, 4.2 * rows_n), squeeze=False, layout="constrained", sharey=True
    )
    for i, (ax, name) in enumerate(zip(axes.flat, names, strict=False)):
        _speedup_panel(ax, bands_by_preset[name], 7, legend=False)
        ax.set_title(name)
        if i % cols:
            ax.set_ylabel("")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    # One legend for every panel: the pairs and launch kinds are the same in each.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8)
    fig.suptitle(f"speedup summary, {dtype}, {card}\nband: 95% bootstrap; shaded span: crossover band")
    return _save(fig, out_dir, f"summary-{dtype}")
