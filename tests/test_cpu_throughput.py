"""The CPU throughput table's files: columns, one row per call and metric, ratios in the markdown."""

from __future__ import annotations

from harness.cpu_throughput import COLUMNS, main
from harness.results import read_csv


def test_cpu_throughput_writes_markdown_and_long_csv(tmp_path):
    assert main(["--out", str(tmp_path), "--presets", "glm45_air", "--tokens", "1", "3", "--samples", "2"]) == 0
    rows = read_csv(tmp_path / "cpu_throughput.csv")
    assert list(rows[0]) == COLUMNS
    # reference, one thread and all threads; quartiles and the best sample of each, at two batch sizes.
    assert len(rows) == 2 * 3 * 2
    assert {r["path"] for r in rows} == {"reference", "cpu_kernel"}
    assert {r["metric"] for r in rows} == {"time", "best_time"}
    assert all(float(r["p50"]) > 0 and r["unit"] == "ms" and r["threads"] == "1" for r in rows)
    table = (tmp_path / "cpu_throughput.md").read_text()
    assert "| glm45_air | 3 |" in table and "ref/k1" in table
