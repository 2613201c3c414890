"""The report's tables on the CPU: what sets each crossover (from a sweep's timings) and the cross-card table
(from two report folders, old CSVs included)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

from harness.causes import crossover_notes, section
from harness.compare import cross_card_table
from harness.crossover import find_crossovers, speedup_band
from harness.results import CSV_COLUMNS, read_csv
from harness.sweep import SweepResult
from harness.timing import quartiles

H100 = Path(__file__).resolve().parent.parent / "reports" / "2026-11-28-nvidia-h100-80gb-hbm3"
TOKENS = (1, 64, 1024, 4096)


def _timings(medians, rng):
    """15 samples per T spread symmetrically (in random order) about the given median, which stays exact."""
    return {
        t: quartiles(list(m * (1 + 0.005 * rng.permutation(np.arange(-7, 8)))))
        for t, m in zip(TOKENS, medians, strict=True)
    }


def gpu_sweep(seed) -> SweepResult:
    """A host-light candidate with slow kernels against a host-heavy baseline with fast ones: eager per call is
    about max(host, GPU), so the candidate wins eager until its GPU time passes the baseline's host time."""
    rng = np.random.default_rng(seed)
    gpu = {"cand": [20, 20, 22, 100], "base": [4, 5, 6, 19]}
    host = {"cand": [8, 8, 8, 8], "base": [35, 35, 35, 35]}
    eager = {p: [max(g, h) for g, h in zip(gpu[p], host[p], strict=True)] for p in gpu}
    timings = {"graph": {p: _timings(gpu[p], rng) for p in gpu}, "eager": {p: _timings(eager[p], rng) for p in gpu}}
    bands = {
        launch: {
            "cand vs base": [
                speedup_band(per_path["base"][t].samples, per_path["cand"][t].samples, t, seed=seed) for t in TOKENS
            ]
        }
        for launch, per_path in timings.items()
    }
    return SweepResult(timings, bands, {p: _timings(host[p], rng) for p in host})


def test_eager_crossover_is_explained_by_host_and_gpu_time(seed):
    (note,) = crossover_notes("deepseek_v3", gpu_sweep(seed))
    assert note.startswith("- deepseek_v3, cand vs base, eager: candidate stops winning between T=1024 and T=4096")
    at_low, at_high = note.split("; at T=4096: ")
    assert "at T=1024: cand GPU-bound (eager 22.00, host 8.00, GPU 22.00 µs)" in at_low
    assert "base host-bound (eager 35.00, host 35.00, GPU 6.00 µs)" in at_low
    assert "cand GPU-bound (eager 100.00" in at_high and "base host-bound" in at_high
    assert note.endswith("set by cand's GPU time against base's host time")


def test_report_section_holds_the_per_token_costs(seed):
    lines = section({"deepseek_v3": gpu_sweep(seed)})
    header = next(line for line in lines if line.startswith("| preset | T |"))
    assert header == "| preset | T | base GPU | base host | base eager | cand GPU | cand host | cand eager |"
    assert "| deepseek_v3 | 4096 | 19.00 | 35.00 | 35.00 | 100.00 | 8.00 | 100.00 |" in lines


def test_no_crossover_is_said_once():
    assert "- no crossover found in range" in section({})


def _latency(path, launch, l2, t, p50, card):
    return {
        "path": path,
        "preset": "deepseek_v3",
        "E": 256,
        "dtype": "bfloat16",
        "T": t,
        "scores": "scores",
        "l2": l2,
        "launch": launch,
        "distribution": "randn",
        "metric": "latency",
        "unit": "us",
        "p25": p50,
        "p50": p50,
        "p75": p50,
        "n": 15,
        "card": card,
        "timestamp": "",
        "commit": "",
    }


def test_cross_card_table_against_the_committed_h100_report():
    old = read_csv(H100 / "results.csv")
    h100 = {
        (r["launch"], r["path"]): float(r["p50"])
        for r in old
        if r["metric"] == "latency" and r["preset"] == "deepseek_v3" and r["T"] == "1" and r["l2"] == "hot"
    }
    new = [_latency("fused_block", launch, "hot", 1, 5.0, "NVIDIA H200") for launch in ("graph", "eager")]
    lines = cross_card_table(old, new)
    assert lines[0].startswith("µs per call (median); ratio = NVIDIA H100 80GB HBM3 / NVIDIA H200")
    for launch in ("graph", "eager"):
        old_us = h100[(launch, "fused_block")]
        row = f"| deepseek_v3 | {launch} | hot | fused_block | scores | 1 | {old_us:.2f} | 5.00 | {old_us / 5:.2f} |"
        assert row in lines
    assert len(lines) == 4 + 2


def test_cross_card_table_reads_old_csvs(tmp_path):
    # Before the launch dimension: CPU timings were launch "host"; older files lack the launch and l2 columns.
    old = [_latency("cpu_kernel", "host", "", 64, 30.0, "cpu a")]
    new = [_latency("cpu_kernel", "eager", "", 64, 15.0, "cpu b")]
    assert "| deepseek_v3 | eager | - | cpu_kernel | scores | 64 | 30.00 | 15.00 | 2.00 |" in cross_card_table(old, new)
    columns = [c for c in CSV_COLUMNS if c not in ("launch", "l2")]
    with open(tmp_path / "old.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(_latency("cpu_kernel", "", "", 64, 30.0, "cpu a"))
    stripped = [_latency("cpu_kernel", "", "", 64, 10.0, "cpu b")]
    table = cross_card_table(read_csv(tmp_path / "old.csv"), stripped)
    assert "| deepseek_v3 | - | - | cpu_kernel | scores | 64 | 30.00 | 10.00 | 3.00 |" in table


def test_compare_command_on_two_report_folders(tmp_path, capsys):
    from harness.cli import main
    from harness.results import write_csv

    new = tmp_path / "h200"
    write_csv(new / "results.csv", [_latency("fused", "graph", "hot", 1, 2.0, "NVIDIA H200")])
    out = tmp_path / "compare.md"
    assert main(["compare", str(H100), str(new), "--out", str(out)]) == 0
    assert "| deepseek_v3 | graph | hot | fused | scores | 1 |" in out.read_text()
    shutil.copytree(H100, tmp_path / "copy", ignore=shutil.ignore_patterns("*.png", "*.svg", "profile"))
    assert main(["compare", str(tmp_path / "nothing"), str(new)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no results.csv" in err


def test_sweep_refines_each_crossing_in_every_launch_kind(monkeypatch, seed):
    import harness.sweep

    rng = np.random.default_rng(seed)

    def fake_timer(path, preset, dtype, repeats, launch, host):
        # "b" takes 100 + T µs. Eager "a" 50 + 2T: it wins below T=50 and loses above; graph "a" always loses.
        def timer(tokens):
            base, slope = (100, 1) if path == "b" else (50, 2) if launch == "eager" else (200, 3)
            return quartiles(list((base + slope * tokens) * (1 + 0.002 * rng.standard_normal(15))))

        return timer

    monkeypatch.setattr(harness.sweep, "_cpu_timer", fake_timer)
    result = harness.sweep.run_sweep(
        "x_e72", "float32", [1, 16, 256, 4096], [("a", "b")], False, launches=["graph", "eager"]
    )
    graph_tokens, eager_tokens = (sorted(result.timings[k]["a"]) for k in ("graph", "eager"))
    assert graph_tokens == eager_tokens and len(eager_tokens) > 4
    assert [len(find_crossovers(result.bands[k]["a vs b"])) for k in ("graph", "eager")] == [0, 1]


def test_gpu_report_layout_with_fake_timers(tmp_path, monkeypatch, seed):
    """The report's GPU branch on the CPU: both launch kinds swept, host cost rows, crossover table and notes,
    one figure per preset with both kinds; the GPU paths' timers and the cold-L2 section are replaced."""
    import harness.report
    import harness.sweep

    rng = np.random.default_rng(seed)
    gpu_us = {"fused": (3, 0.001), "two_kernel": (4, 0.002), "fused_block": (8, 0.01)}
    host_us = {"fused": 6, "two_kernel": 12, "fused_block": 6}

    def fake_timer(path, preset, dtype, repeats, launch, host):
        def timer(tokens):
            base, slope = gpu_us[path]
            gpu = base + slope * tokens
            if launch == "eager":
                host[tokens] = quartiles(list(host_us[path] * (1 + 0.002 * rng.standard_normal(repeats))))
                gpu = max(gpu, host_us[path])
            return quartiles(list(gpu * (1 + 0.002 * rng.standard_normal(repeats))))

        return timer

    monkeypatch.setattr(harness.report, "cuda_reason", lambda: None)
    monkeypatch.setattr(harness.sweep, "_gpu_timer", fake_timer)
    monkeypatch.setattr(harness.report, "_gpu_modes", lambda *args: ([], ["## Launch kinds and L2 modes", ""], []))
    folder = harness.report.run_report(tmp_path, ["deepseek_v3"], "bfloat16", [1, 64, 1024, 8192], [1], 5)
    text = (folder / "report.md").read_text()
    for launch in ("graph", "eager"):
        for candidate in ("fused", "fused_block"):
            assert f"| deepseek_v3 | {launch} | {candidate} | two_kernel |" in text
    # Eager: fused_block's 8 µs kernel beats two_kernel's 12 µs of host cost per call until its kernel time
    # passes 12 µs (T=400); under graph replay its kernel never beats two_kernel's.
    assert "- deepseek_v3, fused_block vs two_kernel, eager: candidate stops winning between" in text
    assert "fused_block vs two_kernel, graph: candidate" not in text
    assert "two_kernel host-bound" in text
    rows = read_csv(folder / "results.csv")
    hosts = {(r["path"], r["launch"]) for r in rows if r["metric"] == "host_per_call"}
    assert hosts == {(p, "eager") for p in gpu_us}
    launches = {(r["path"], r["launch"]) for r in rows if r["metric"] == "latency"}
    assert launches == {(p, k) for p in gpu_us for k in ("graph", "eager")}
    assert (folder / "deepseek_v3-bfloat16.png").stat().st_size > 0


def test_hostcost_ratios_follow_the_chosen_statistic(monkeypatch):
    """With ``--statistic min`` the ratio and the printed figure are each row's least time, else its median; the
    samples are set so that the two give far apart ratios."""
    import pytest

    pytest.importorskip("torch")
    from harness import hostcost

    rows = [hostcost.Row("base", None), hostcost.Row("op", None, "base", 3.0)]
    samples = {"base": [1.0, 10.0, 10.0], "op": [3.0, 4.0, 100.0]}
    monkeypatch.setattr(hostcost, "_rows", lambda torch, device, tokens: rows)
    monkeypatch.setattr(hostcost, "_time_rows", lambda *args: samples)
    for statistic, figure, ratio, status in (("min", 3.0, 3.0, "met"), ("median", 4.0, 0.4, "met")):
        table = hostcost.measure("cpu", 1, calls=1, repeats=3, clock="thread", statistic=statistic)
        op = table[1]
        assert (op["statistic"], op["ratio"], op["status"]) == (statistic, ratio, status)
        assert f"| `op` | {figure} | 3.0-100.0 | {ratio}x base |" in hostcost.markdown(table)
    samples["op"][0] = 3.5
    assert hostcost.measure("cpu", 1, 1, 3, "thread", "min")[1]["status"] == "missed"
