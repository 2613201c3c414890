"""The long-format results CSV shared by the bench, the alignment matrix and the report (DESIGN.md's Names)."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

CSV_COLUMNS = [
    "path",
    "preset",
    "E",
    "dtype",
    "T",
    "scores",
    "l2",
    "launch",
    "distribution",
    "metric",
    "unit",
    "p25",
    "p50",
    "p75",
    "n",
    "card",
    "timestamp",
    "commit",
]


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cpu_card(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CSV's ``card`` column for CPU figures: the cores this process may use, the architecture, the processor
    model and, on x86, its family and model numbers, e.g. ``2-core x86_64 (AMD EPYC, family 26 model 2)``: a
    virtual machine may name only the vendor, while the processor generation behind it decides how fast the
    kernel's vector loop runs."""
    fields = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        model += f", family {fields['cpu family']} model {fields['model']}"
    return f"{len(os.sched_getaffinity(0))}-core {platform.machine()} ({model})"


def git_commit() -> str:
    """The CSV's ``commit`` column: ``$FUSEDGATE_COMMIT`` where set (a copy of the tree without its git history
    sets it), else the checkout's short commit, else ``unknown``."""
    if os.environ.get("FUSEDGATE_COMMIT"):
        return os.environ["FUSEDGATE_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"
