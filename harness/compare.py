"""The cross-card table: latencies two reports both measured, side by side, per launch kind and L2 mode.

Reads each report's ``results.csv``. Rows written before the launch dimension covered the CPU have launch
``host`` (read as ``eager``, the CPU's only launch kind); a CSV without a ``launch`` or ``l2`` column reads
them as empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.results import read_csv

COMPARE_TOKENS = (1, 64, 1024, 8192, 65536)


def _launch(row: dict) -> str:
    launch = row.get("launch") or ""
    return "eager" if launch == "host" else launch


def _key(row: dict) -> tuple:
    return (row["preset"], _launch(row), row.get("l2") or "", row["path"], row.get("scores") or "", int(row["T"]))


def _latencies(rows: Sequence[dict], tokens: Sequence[int]) -> dict[tuple, float]:
    return {_key(r): float(r["p50"]) for r in rows if r["metric"] == "latency" and int(r["T"]) in tokens}


def card_of(rows: Sequence[dict]) -> str:
    return next((r["card"] for r in rows if r.get("card")), "unknown card")


def cross_card_table(old: Sequence[dict], new: Sequence[dict], tokens: Sequence[int] = COMPARE_TOKENS) -> list[str]:
    """Markdown lines: one row per latency both runs measured at ``tokens``, with the old/new ratio."""
    before, after = _latencies(old, tokens), _latencies(new, tokens)
    shared = sorted(before.keys() & after.keys())
    old_card, new_card = card_of(old), card_of(new)
    if not shared:
        return [f"no latency measured by both {old_card} and {new_card} at T in {', '.join(map(str, tokens))}"]
    lines = [
        f"µs per call (median); ratio = {old_card} / {new_card} (above 1: faster on {new_card}).",
        "",
        f"| preset | launch | L2 | path | scores | T | {old_card} | {new_card} | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in shared:
        preset, launch, l2, path, scores, t = key
        lines.append(
            f"| {preset} | {launch or '-'} | {l2 or '-'} | {path} | {scores or '-'} | {t} | {before[key]:.2f} "
            f"| {after[key]:.2f} | {before[key] / after[key]:.2f} |"
        )
    return lines


def compare_folders(old: Path, new: Path) -> list[str]:
    """The cross-card table of two report folders (each holding a ``results.csv``)."""
    for folder in (old, new):
        if not (folder / "results.csv").is_file():
            raise ValueError(f"{folder} holds no results.csv: expected a report folder")
    return cross_card_table(read_csv(old / "results.csv"), read_csv(new / "results.csv"))
