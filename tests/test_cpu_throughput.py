"""The CPU throughput table's files: columns, one row per call and metric, ratios in the markdown."""

from __future__ import annotations

import os

import pytest

from harness.cpu_throughput import COLUMNS, main
from harness.results import cpu_card, read_csv
from op.build import library


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


def test_split_batches_are_also_timed_after_a_pause(tmp_path):
    args = ["--out", str(tmp_path), "--presets", "glm45_air", "--tokens", "1", "1024", "--samples", "2"]
    assert main([*args, "--pause-calls", "3", "--pause-ms", "0.5"]) == 0
    rows = read_csv(tmp_path / "cpu_throughput.csv")
    paused = [r for r in rows if r["launch"] == "after 0.5 ms pause"]
    split = library().cpu_thread_count(1024, 128, len(os.sched_getaffinity(0))) > 1
    # One thread and all, at the batch that is split (1 token never is).
    assert len(paused) == (2 if split else 0)
    assert all(r["T"] == "1024" and r["n"] == "3" and float(r["p50"]) > 0 for r in paused)
    assert ("## Calls after a 0.5 ms pause" in (tmp_path / "cpu_throughput.md").read_text()) == split


def test_negative_pauses_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--pause-ms", "-1"])
    assert "--pause-ms and --pause-calls are out of range" in capsys.readouterr().err


def test_the_cpu_card_names_the_processor_generation(tmp_path):
    """Processors of different generations may all call themselves "AMD EPYC" in a virtual machine: the family
    and model numbers tell them apart."""
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n")
    assert cpu_card(x86).endswith("(AMD EPYC, family 26 model 2)")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n")
    assert "family" not in cpu_card(arm)
    assert cpu_card(tmp_path / "missing").startswith(f"{len(os.sched_getaffinity(0))}-core ")
