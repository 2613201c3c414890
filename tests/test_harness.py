"""The harness on the CPU: crossover detection on synthetic curves, CSV schema, plots, the CPU report, the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from harness.crossover import Band, describe, find_crossovers, refinement_points, speedup_band
from harness.report import regressions
from harness.results import CSV_COLUMNS

TOKENS = [1, 4, 16, 64, 256, 1024, 4096]


def bands_from(speedups, noise, seed, repeats=15):
    rng = np.random.default_rng(seed)
    out = []
    for t, s in zip(TOKENS, speedups, strict=True):
        baseline = 10.0 * (1 + noise * rng.standard_normal(repeats))
        candidate = 10.0 / s * (1 + noise * rng.standard_normal(repeats))
        out.append(speedup_band(baseline, candidate, t, seed=seed))
    return out


def test_clear_crossing_is_found_between_the_right_points(seed):
    bands = bands_from([3, 2.5, 2, 1.5, 0.7, 0.5, 0.4], 0.01, seed)
    (crossing,) = find_crossovers(bands)
    assert (crossing.low_tokens, crossing.high_tokens) == (64, 256)
    assert 64 < crossing.at_tokens < 256 and crossing.direction == "candidate stops winning"
    assert "between T=64 and T=256" in describe(bands, "fused", "two_kernel")


def test_no_crossing_reports_the_smallest_speedup(seed):
    bands = bands_from([3, 2.5, 2, 1.6, 1.4, 1.3, 1.2], 0.01, seed)
    assert find_crossovers(bands) == []
    text = describe(bands, "fused", "two_kernel")
    assert text.startswith("no crossover in range") and "T=4096" in text


def test_medians_wobbling_around_one_inside_their_bands_are_not_a_crossing(seed):
    # Bands built directly: each interval holds 1.0 while the medians fall on either side of it. (Sampled noise
    # would decide a band now and then, and a test that fails for one seed in a hundred proves nothing.)
    rng = np.random.default_rng(seed)
    medians = 1.0 + rng.uniform(-0.03, 0.03, len(TOKENS))
    bands = [Band(t, m - 0.1, m, m + 0.1, 15) for t, m in zip(TOKENS, medians, strict=True)]
    assert all(b.side == 0 for b in bands)
    assert find_crossovers(bands) == []
    assert describe(bands, "fused", "two_kernel").startswith("no crossover in range")


def test_two_crossings(seed):
    bands = bands_from([2, 2, 0.5, 0.5, 0.5, 2, 2], 0.01, seed)
    crossings = find_crossovers(bands)
    assert [(c.low_tokens, c.high_tokens) for c in crossings] == [(4, 16), (256, 1024)]
    assert [c.direction for c in crossings] == ["candidate stops winning", "candidate starts winning"]


def test_refinement_asks_for_midpoints_where_sides_differ():
    bands = [Band(1, 1.5, 2, 2.5, 10), Band(64, 0.4, 0.5, 0.6, 10), Band(4096, 0.4, 0.5, 0.6, 10)]
    assert refinement_points(bands) == [8]


def test_speedup_band_rejects_empty_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        speedup_band([], [1.0], 1)


def test_regressions_flag_only_slower_beyond_noise():
    old = [
        {
            "path": "fused",
            "preset": "p",
            "dtype": "bfloat16",
            "T": "64",
            "scores": "scores",
            "l2": "hot",
            "launch": "graph",
            "metric": "latency",
            "p25": "9",
            "p50": "10",
            "p75": "11",
        }
    ]
    slow = dict(old[0], p25="12", p50="13", p75="14")
    noisy = dict(old[0], p25="10.5", p50="10.8", p75="11.5")
    assert len(regressions(old, [slow])) == 1
    assert regressions(old, [noisy]) == []


def _capture_figures(monkeypatch):
    from harness import plots

    captured = []
    original = plots._save

    def keep(fig, out_dir, stem):
        captured.append(fig.axes)
        return original(fig, out_dir, stem)

    monkeypatch.setattr(plots, "_save", keep)
    return captured


def crossing_bands(seed):
    """Eager: the candidate stops winning between T=64 and T=256; graph: it never wins."""
    return {
        "graph": {"a vs b": bands_from([0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.3], 0.01, seed)},
        "eager": {"a vs b": bands_from([3, 2.5, 2, 1.5, 0.7, 0.5, 0.4], 0.01, seed)},
    }


def test_plots_have_labelled_axes_bands_and_labelled_crossovers(tmp_path, monkeypatch, seed):
    import matplotlib.pyplot as plt

    from harness import plots

    rows = [
        {
            "path": p,
            "preset": "x",
            "metric": "latency",
            "T": t,
            "p25": v * 0.9,
            "p50": v,
            "p75": v * 1.1,
            "l2": "",
            "launch": launch,
        }
        for p, f in (("a", 1.0), ("b", 2.0))
        for launch in ("graph", "eager")
        for t, v in ((1, f), (64, 4 * f), (4096, 100 * f))
    ]
    captured = _capture_figures(monkeypatch)
    files = plots.plot_preset(rows, crossing_bands(seed), "x", "bfloat16", "cpu", tmp_path)
    files += plots.plot_grid({"x": crossing_bands(seed), "y": crossing_bands(seed)}, "bfloat16", "cpu", tmp_path)
    assert {f.suffix for f in files} == {".png", ".svg"} and all(f.stat().st_size > 0 for f in files)
    preset_axes, grid_axes = captured
    labels = [(ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) for ax in preset_axes]
    assert ("tokens T", "latency per call (µs)", "latency") in labels
    latency_legend = [t.get_text() for t in preset_axes[0].get_legend().get_texts()]
    assert any("eager" in t for t in latency_legend) and any("graph" in t for t in latency_legend)
    for speed_ax in (preset_axes[1], grid_axes[0], grid_axes[1]):
        assert speed_ax.get_yscale() == "log" and "log scale" in grid_axes[0].get_ylabel()
        # One shaded bootstrap band per pair and launch kind, one labelled crossover (eager only).
        assert len([c for c in speed_ax.collections if c.get_label().startswith("_")]) >= 2
        (note,) = [t.get_text() for t in speed_ax.texts]
        assert note.startswith("T≈") and "[64, 256]" in note and note.endswith("eager")
    plt.close("all")


def test_cpu_report_completes_and_lists_what_it_skipped(tmp_path):
    from harness.cli import main

    assert (
        main(
            [
                "report",
                "--out",
                str(tmp_path),
                "--preset",
                "glm45_air",
                "--tokens",
                "1,64",
                "--align-tokens",
                "1,9",
                "--repeats",
                "3",
            ]
        )
        == 0
    )
    (folder,) = tmp_path.iterdir()
    text = (folder / "report.md").read_text()
    assert "## Skipped" in text and "GPU paths" in text and "every case passed" in text
    assert "| glm45_air | eager | cpu_kernel | composite_torch |" in text and "## What sets each crossover" in text
    with open(folder / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert {r["metric"] for r in rows} >= {"latency", "mismatches", "max_rel_weight_error"}
    assert {r["path"] for r in rows} >= {"reference", "cpu_kernel", "composite_torch"}
    assert {r["launch"] for r in rows if r["metric"] == "latency"} == {"eager"}
    assert (folder / "glm45_air-bfloat16.png").exists() and (folder / "summary-bfloat16.svg").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["report", "--tokens", "0,4"], "must be >= 1"),
        (["report", "--tokens", "a,b"], "comma-separated"),
        (["crossover", "--repeats", "1"], "--repeats=1"),
        (["align", "--preset", "nope"], "invalid choice"),
        (["reference", "--tokens", "-3"], "--tokens=-3"),
        (["serve", "--preset", "deepseek_v3", "--bias", "kimi_k2=b.npy"], "NAME one of the served presets"),
        (["serve", "--preset", "deepseek_v3", "--max-queue-size", "0"], "max_queue_size=0"),
        (["serve", "--preset", "nope"], "invalid choice"),
        (["loadtest", "--clients", "0"], "--clients"),
    ],
)
def test_cli_argument_errors(argv, needle, capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_align_cli_exits_zero_on_cpu_paths(capsys):
    from harness.cli import main

    assert main(["align", "--preset", "x_e72", "--tokens", "0,5", "--distribution", "ties"]) == 0
    assert "| cpu_kernel | x_e72 |" in capsys.readouterr().out


def test_report_default_token_range_on_the_cpu(tmp_path, monkeypatch):
    import harness.report
    from harness.cli import main

    seen = {}

    def fake_report(out, presets, dtype, tokens, align_tokens, repeats, compare):
        seen.update(tokens=tokens, presets=presets)
        out.mkdir(parents=True, exist_ok=True)
        return out

    monkeypatch.setattr(harness.report, "run_report", fake_report)
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert seen["tokens"] == [1, 4, 16, 64, 256, 1024, 4096] and len(seen["presets"]) == 6


def test_profile_summary_reads_the_raw_page_and_picks_the_top_stall():
    from harness.profile import summarize

    raw = (
        '"ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread",'
        '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
        '"smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio"\n'
        '"","","nsecond","register/thread","ratio","ratio"\n'
        '"0","void fused_grouped_topk_kernel<__nv_bfloat16, 8>(const T1 *, int)","1,234","72","0.85","2.10"\n'
        '"1","noaux_tc_kernel","900","64","3.5","0.2"\n'
    )
    lines = summarize(raw).splitlines()
    assert lines[0].startswith("| kernel | duration (ns)") and lines[0].endswith("top stall (cycles per issue) |")
    assert len(lines) == 4
    assert lines[2].startswith("| fused_grouped_topk_kernel<__nv_bfloat16, 8> | 1,234 |")
    assert "math_pipe_throttle (2.10)" in lines[2]
    assert "long_scoreboard (3.50)" in lines[3]


def test_plot_series_keep_scores_and_no_scores_apart():
    from harness.plots import _series

    rows = [
        {"path": "fused", "preset": "x", "metric": "floor_fraction", "T": t, "p25": v, "p50": v, "p75": v}
        | {"scores": scores, "l2": "cold", "launch": "graph"}
        for t in (1, 64)
        for scores, v in (("scores", 0.3), ("noscores", 0.1))
    ]
    series = _series(rows, "x", "floor_fraction")
    assert sorted(series) == ["fused (cold, graph)", "fused no scores (cold, graph)"]
    assert [p[2] for p in series["fused no scores (cold, graph)"]] == [0.1, 0.1]
