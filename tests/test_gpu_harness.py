"""The harness on a GPU: a short report end to end, and the profile session's NVTX filter under Nsight Compute."""

from __future__ import annotations

import csv
import shutil

import pytest

from harness.results import CSV_COLUMNS

pytestmark = pytest.mark.gpu


def test_short_gpu_report_end_to_end(tmp_path):
    from harness.cli import main

    argv = ["report", "--out", str(tmp_path), "--preset", "glm45_air", "--tokens", "1,64", "--align-tokens", "1,9"]
    assert main([*argv, "--repeats", "3"]) == 0
    (folder,) = tmp_path.iterdir()
    text = (folder / "report.md").read_text()
    assert "every case passed" in text and "## Crossovers" in text and "## Harness overhead" in text
    for launch in ("graph", "eager"):
        assert f"| glm45_air | {launch} | fused | two_kernel |" in text
        assert f"| glm45_air | {launch} | fused_block | two_kernel |" in text
    assert "## What sets each crossover" in text and "fused_block host" in text
    with open(folder / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    timed = {(r["path"], r["l2"], r["launch"]) for r in rows if r["metric"] == "latency"}
    for path in ("fused", "two_kernel", "fused_block"):
        assert {(path, "hot", "graph"), (path, "cold", "graph"), (path, "hot", "eager")} <= timed
    hosts = [float(r["p50"]) for r in rows if r["metric"] == "host_per_call"]
    assert hosts and all(0 < h < 1000 for h in hosts)
    fractions = [float(r["p50"]) for r in rows if r["metric"] == "floor_fraction"]
    assert fractions and all(0 < f < 1.5 for f in fractions)
    assert {r["path"] for r in rows if r["metric"] == "mismatches"} >= {"fused", "two_kernel", "fused_block"}
    assert (folder / "glm45_air-bfloat16.png").stat().st_size > 0


@pytest.mark.skipif(shutil.which("ncu") is None, reason="ncu (Nsight Compute) is not on PATH")
def test_profile_selects_one_configuration_by_its_nvtx_range(tmp_path):
    from harness.profile import profile

    assert profile("fused", "glm45_air", "bfloat16", 64, tmp_path) == 0
    assert (tmp_path / "fused-glm45_air-T64.ncu-rep").stat().st_size > 0
    summary = (tmp_path / "fused-glm45_air-T64-summary.md").read_text().splitlines()
    kernels = [line for line in summary[2:] if line.startswith("|")]
    # Only a kernel of the fused path in that range was profiled: no L2 flush, copy or other path's kernel.
    assert kernels and all(line.startswith("| fused_") and "fused_block" not in line for line in kernels)
