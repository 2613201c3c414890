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

from harness.crossover import Band, find_crossovers  # noqa: E402


def _series(rows: Sequence[dict], preset: str, metric: str) -> dict[str, list[tuple[int, float, float, float]]]:
    series = defaultdict(list)
    for row in rows:
        if row["preset"] == preset and row["metric"] == metric:
            name = row["path"] + (" no scores" if row.get("scores") == "noscores" else "")
            label = name if not row.get("l2") else f"{name} ({row['l2']}, {row['launch']})"
            series[label].append((int(row["T"]), float(row["p25"]), float(row["p50"]), float(row["p75"])))
    return {k: sorted(v) for k, v in series.items()}


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def plot_preset(
    rows: Sequence[dict],
    bands: dict[str, Sequence[Band]],
    preset: str,
    dtype: str,
    card: str,
    out_dir: Path,
) -> list[Path]:
    """Latency vs T (log-log, IQR bands), speedup vs T with the 1.0 line and crossovers, bandwidth fraction."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fraction = _series([r for r in rows if r.get("launch") != "eager"], preset, "floor_fraction")
    fig, axes = plt.subplots(1, 3 if fraction else 2, figsize=(16 if fraction else 11, 4.2))
    latency_ax, speed_ax = axes[0], axes[1]
    # Eager timings sit in the report's tables; the latency panel holds graph replays (and host timings).
    graphed = [r for r in rows if r.get("launch") != "eager"]
    for label, points in _series(graphed, preset, "latency").items():
        t = [p[0] for p in points]
        latency_ax.plot(t, [p[2] for p in points], marker="o", ms=3, label=label)
        latency_ax.fill_between(t, [p[1] for p in points], [p[3] for p in points], alpha=0.25)
    latency_ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="latency per call (µs)", title="latency")
    latency_ax.legend(fontsize=7)
    speed_ax.axhline(1.0, color="black", lw=0.8)
    for pair, pair_bands in bands.items():
        ordered = sorted(pair_bands, key=lambda b: b.tokens)
        t = [b.tokens for b in ordered]
        speed_ax.plot(t, [b.median for b in ordered], marker="o", ms=3, label=pair)
        speed_ax.fill_between(t, [b.low for b in ordered], [b.high for b in ordered], alpha=0.25)
        for crossing in find_crossovers(ordered):
            speed_ax.axvline(crossing.at_tokens, ls="--", lw=0.8, color="red")
            speed_ax.annotate(f"T≈{crossing.at_tokens:.0f}", (crossing.at_tokens, 1.0), fontsize=7, color="red")
    speed_ax.set(
        xscale="log", yscale="log", xlabel="tokens T", ylabel="speedup (baseline / candidate, ×)", title="speedup"
    )
    speed_ax.legend(fontsize=7)
    if fraction:
        for label, points in fraction.items():
            axes[2].plot([p[0] for p in points], [p[2] for p in points], marker="o", ms=3, label=label)
        axes[2].set(xscale="log", xlabel="tokens T", ylabel="fraction of copy bandwidth", title="bandwidth (cold L2)")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"{preset}, {dtype}, {card}")
    return _save(fig, out_dir, f"{preset}-{dtype}")


def plot_grid(
    bands_by_preset: dict[str, dict[str, Sequence[Band]]], dtype: str, card: str, out_dir: Path
) -> list[Path]:
    """One speedup panel per preset."""
    names = sorted(bands_by_preset)
    cols = min(3, max(1, len(names)))
    rows_n = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.axhline(1.0, color="black", lw=0.8)
        for pair, pair_bands in bands_by_preset[name].items():
            ordered = sorted(pair_bands, key=lambda b: b.tokens)
            ax.plot([b.tokens for b in ordered], [b.median for b in ordered], marker="o", ms=2, label=pair)
        ax.set(xscale="log", title=name, xlabel="tokens T", ylabel="speedup (×)")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"speedup summary, {dtype}, {card}")
    return _save(fig, out_dir, f"summary-{dtype}")
