"""``fusedgate profile``: Nsight Compute over one NVTX range of the bench, with a per-kernel summary table.

The bench wraps each timed configuration in an NVTX range of the ``fusedgate`` domain, so
``ncu --nvtx --nvtx-include "fusedgate@<range>/"`` profiles exactly that configuration's kernels.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

from harness.timing import NVTX_DOMAIN, range_name

STALL_METRIC = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
# Each summary column lists the metric names it may go by (Nsight Compute renamed some across versions).
SUMMARY_METRICS = {
    ("gpu__time_duration.sum",): "duration (ns)",
    (
        "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
        "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    ): "DRAM throughput %",
    ("sm__warps_active.avg.pct_of_peak_sustained_active",): "achieved occupancy %",
    ("launch__registers_per_thread",): "registers",
    ("launch__grid_size",): "grid",
    ("launch__block_size",): "block",
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
        # One launch: the timed replays run the same kernel on the same input, and a report stays small.
        "--launch-count",
        "1",
        "-f",
        "-o",
        str(report),
        *bench,
    ]
    print(" ".join(cmd), file=sys.stderr)
    if subprocess.run(cmd, check=False).returncode != 0:
        return 1
    raw = subprocess.run(
        [ncu, "--import", f"{report}.ncu-rep", "--csv", "--page", "raw", "--print-units", "base"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    summary = summarize(raw)
    (out_dir / f"{report.name}-summary.md").write_text(summary + "\n")
    print(summary)
    return 0


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(raw_csv: str) -> str:
    """A markdown table per profiled kernel from ``ncu --import ... --csv --page raw`` output.

    The top stall reason is the largest ``smsp__average_warps_issue_stalled_<reason>_per_issue_active`` ratio
    (cycles a warp spends stalled for that reason per issued instruction).
    """
    rows = list(csv.DictReader(io.StringIO(raw_csv)))
    # The first data row of the raw page holds the units.
    if rows and not rows[0].get("Kernel Name", "").strip():
        rows = rows[1:]
    head = [*SUMMARY_METRICS.values(), "top stall (cycles per issue)"]
    table = ["| kernel | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for row in rows:
        stalls = {
            m.group(1): value
            for key, text in row.items()
            if key and (m := STALL_METRIC.fullmatch(key)) and (value := _number(text)) is not None
        }
        top = max(stalls, key=stalls.get) if stalls else None
        cells = [next((row[n] for n in names if row.get(n, "").strip()), "") for names in SUMMARY_METRICS]
        cells.append(f"{top} ({stalls[top]:.2f})" if top else "-")
        kernel = row.get("Kernel Name", "?").split("(")[0].removeprefix("void ")
        table.append(f"| {kernel} | " + " | ".join(cells) + " |")
    return "\n".join(table)
