"""``fusedgate profile``: Nsight Compute over one NVTX range of the bench, with a per-kernel summary table.

The bench wraps each timed configuration in an NVTX range of the ``fusedgate`` domain, so
``ncu --nvtx --nvtx-include "fusedgate@<range>/"`` profiles exactly that configuration's kernels.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

from harness.timing import NVTX_DOMAIN, range_name

SUMMARY_METRICS = {
    "gpu__time_duration.sum": "duration (ns)",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM throughput %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved occupancy %",
    "launch__registers_per_thread": "registers",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
}


def profile(path: str, preset: str, dtype: str, tokens: int, out_dir: Path) -> int:
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu (Nsight Compute) is not on PATH: nothing profiled", file=sys.stderr)
        return 2
    if shutil.which("nsys") is None:
        print("nsys (Nsight Systems) is not installed here: system-wide timelines skipped", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = range_name(path, preset, dtype, tokens, path != "fused_noscores", "hot", "graph")
    report = out_dir / f"{path}-{preset}-T{tokens}"
    bench = [
        sys.executable,
        "-m",
        "harness.bench",
        "--configs",
        preset,
        "--tokens",
        str(tokens),
        "--paths",
        path,
        "--l2",
        "hot",
        "--launch",
        "graph",
        "--repeats",
        "3",
        "--dtype",
        dtype,
    ]
    cmd = [
        ncu,
        "--nvtx",
        "--nvtx-include",
        f"{NVTX_DOMAIN}@{label}/",
        "--section",
        "SpeedOfLight",
        "--section",
        "LaunchStats",
        "--section",
        "Occupancy",
        "--section",
        "WarpStateStats",
        "--launch-count",
        "5",
        "-f",
        "-o",
        str(report),
        *bench,
    ]
    print(" ".join(cmd), file=sys.stderr)
    if subprocess.run(cmd, check=False).returncode != 0:
        return 1
    raw = subprocess.run(
        [ncu, "--import", f"{report}.ncu-rep", "--csv", "--page", "raw", "--metrics", ",".join(SUMMARY_METRICS)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(raw)))
    table = ["| kernel | " + " | ".join(SUMMARY_METRICS.values()) + " |", "|---" * (len(SUMMARY_METRICS) + 1) + "|"]
    for row in rows[1:] if rows and not rows[0].get("Kernel Name", "x").strip() else rows:
        name = row.get("Kernel Name", "?")[:60]
        table.append(f"| {name} | " + " | ".join(row.get(m, "") for m in SUMMARY_METRICS) + " |")
    summary = "\n".join(table)
    (out_dir / f"{report.name}-summary.md").write_text(summary + "\n")
    print(summary)
    return 0
