"""The long-format results CSV shared by the bench, the alignment matrix and the report (DESIGN's Names)."""

from __future__ import annotations

import csv
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
