"""CPU throughput: the C++ CPU kernel (``cpu_kernel``) against the numpy reference, for every preset.

Float32 numpy input (``randn``), scores returned, at T = 1, 64, 1024, 4096, 65536; the kernel on one thread and
on every CPU this process may run on. The three calls of one (preset, T) take turns, sample by sample, so a
neighbour's load falls on all of them alike. Each sample is the mean per-call time over enough calls to last a
few milliseconds; the table's ratios use the fastest sample (best of several), which on a shared machine is the
one least disturbed, and the CSV keeps the quartiles beside it.

Calls after a pause: a server at low load calls the kernel now and then, with the pool's workers asleep and
their processor idle. Where the kernel splits a batch over threads, the one-thread and all-thread calls are also
timed one call at a time after a pause (``--pause-ms``, 2 ms by default), median over ``--pause-calls``, in turns.

``python -m harness.cpu_throughput --out DIR`` writes ``DIR/cpu_throughput.md`` and the long-format
``DIR/cpu_throughput.csv`` (DESIGN.md's columns, plus ``threads``).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from harness.inputs import generate_input
from harness.results import CSV_COLUMNS, cpu_card, git_commit
from op import grouped_topk, reference
from op.build import library
from op.configs import PRESETS

TOKENS = (1, 64, 1024, 4096, 65536)
COLUMNS = [*CSV_COLUMNS, "threads"]


def _per_call_ms(call: Callable[[], object], min_seconds: float) -> float:
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    inner = max(1, int(min_seconds / max(once, 1e-7)))
    start = time.perf_counter()
    for _ in range(inner):
        call()
    return (time.perf_counter() - start) * 1e3 / inner


def measure_side_by_side(
    calls: dict[str, Callable[[], object]], samples: int, min_seconds: float
) -> dict[str, list[float]]:
    """Per-call ms samples of each call, the calls taking turns within every round."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(samples):
        for name, call in calls.items():
            times[name].append(_per_call_ms(call, min_seconds))
    return times


def measure_after_pause(calls: dict[str, Callable[[], object]], count: int, pause: float) -> dict[str, list[float]]:
    """ms of single calls, each after ``pause`` seconds of sleep, the calls taking turns."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(count):
        for name, call in calls.items():
            time.sleep(pause)
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def run(
    out: Path,
    presets: list[str],
    tokens: list[int],
    samples: int,
    min_seconds: float,
    seed: int,
    pause_ms: float = 2.0,
    pause_calls: int = 40,
) -> list[dict[str, object]]:
    all_threads = len(os.sched_getaffinity(0))
    card, stamp, commit = cpu_card(), datetime.now(UTC).isoformat(timespec="seconds"), git_commit()
    rows, table, paused = [], [], []
    for name in presets:
        config = PRESETS[name]
        for num_tokens in tokens:
            x, bias = generate_input(config, num_tokens, "float32", seed, "randn")
            calls: dict[str, Callable[[], object]] = {
                "reference": lambda x=x, bias=bias, c=config: reference.grouped_topk(x, bias, *c.args()),
                "one": lambda x=x, bias=bias, c=config: grouped_topk(x, bias, *c.args(), num_threads=1),
                "all": lambda x=x, bias=bias, c=config: grouped_topk(x, bias, *c.args(), num_threads=all_threads),
            }
            used = {
                "reference": 1,
                "one": 1,
                "all": library().cpu_thread_count(num_tokens, config.num_experts, all_threads),
            }
            # The reference at 65536 tokens takes most of a second a call: fewer samples there.
            times = measure_side_by_side(calls, samples if num_tokens < 65536 else max(3, samples // 2), min_seconds)
            # The CSV fields every row of this preset and batch shares; a row adds its call's and metric's.
            shared = {"preset": name, "E": config.num_experts, "dtype": "float32", "T": num_tokens}
            shared |= {"scores": "scores", "l2": "", "distribution": "randn", "unit": "ms", "card": card}
            shared |= {"timestamp": stamp, "commit": commit}

            def call_fields(label: str, ms: list[float], launch: str, shared=shared, used=used) -> dict[str, object]:
                path = "reference" if label == "reference" else "cpu_kernel"
                return shared | {"path": path, "launch": launch, "n": len(ms), "threads": used[label]}

            for label, ms in times.items():
                q = statistics.quantiles(ms, n=4, method="inclusive")
                base = call_fields(label, ms, "eager")
                rows.append(base | {"metric": "time", "p25": q[0], "p50": q[1], "p75": q[2]})
                rows.append(base | {"metric": "best_time", "p25": "", "p50": min(ms), "p75": ""})
            best = {label: min(ms) for label, ms in times.items()}
            table.append((name, num_tokens, best["reference"], best["one"], best["all"], used["all"]))
            print(f"{name} T={num_tokens}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in best.items()), flush=True)
            if used["all"] > 1 and pause_calls > 0:
                kernel = {label: calls[label] for label in ("one", "all")}
                after = measure_after_pause(kernel, pause_calls, pause_ms / 1e3)
                for label, ms in after.items():
                    q = statistics.quantiles(ms, n=4, method="inclusive")
                    base = call_fields(label, ms, f"after {pause_ms:g} ms pause")
                    rows.append(base | {"metric": "time", "p25": q[0], "p50": q[1], "p75": q[2]})
                medians = {label: statistics.median(ms) for label, ms in after.items()}
                paused.append((name, num_tokens, medians["one"], medians["all"], used["all"]))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cpu_throughput.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(table, card, all_threads, samples, commit, stamp)
    (out / "cpu_throughput.md").write_text(text + paused_markdown(paused, pause_ms, pause_calls))
    return rows


def markdown(table: list[tuple], card: str, all_threads: int, samples: int, commit: str, stamp: str) -> str:
    lines = [
        f"# CPU throughput: `cpu_kernel` against `reference` on {card}",
        "",
        f"Commit {commit}, {stamp}, the kernel's {library().cpu_isa()} loop. Float32 numpy input (`randn`), scores"
        f" returned; ms per call, best of {samples}"
        " samples taken in turns (fewer at T=65536), each the mean over calls lasting a few ms. The machine is"
        " shared, so the best sample is the least disturbed one; the CSV holds the quartiles.",
        f"`ref/k1`: reference time over the kernel's on one thread; `k1/kN`: one thread over {all_threads} asked"
        " for (`threads used`: fewer where the batch is too small to split).",
        "",
        "| preset | T | reference ms | cpu_kernel 1 thread ms | cpu_kernel all ms | threads used | ref/k1 | k1/kN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, tokens, ref, one, many, used in table:
        times = f"{ref:.3f} | {one:.3f} | {many:.3f} | {used}"
        lines.append(f"| {preset} | {tokens} | {times} | {ref / one:.1f}x | {one / many:.2f}x |")
    return "\n".join(lines) + "\n"


def paused_markdown(paused: list[tuple], pause_ms: float, pause_calls: int) -> str:
    if not paused:
        return ""
    lines = [
        "",
        f"## Calls after a {pause_ms:g} ms pause",
        "",
        f"One call at a time after a {pause_ms:g} ms sleep (the pool's workers asleep), one thread and all in turns,"
        f" median of {pause_calls} calls each; only where the batch is split.",
        "",
        "| preset | T | cpu_kernel 1 thread ms | cpu_kernel all ms | threads used | k1/kN |",
        "|---|---|---|---|---|---|",
    ]
    for preset, tokens, one, many, used in paused:
        lines.append(f"| {preset} | {tokens} | {one:.3f} | {many:.3f} | {used} | {one / many:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.cpu_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for cpu_throughput.md and .csv")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--samples", type=int, default=7, help="samples per call (default 7)")
    parser.add_argument("--min-seconds", type=float, default=5e-3, help="least time one sample's calls take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pause-ms", type=float, default=2.0, help="sleep before each paused call (default 2)")
    parser.add_argument("--pause-calls", type=int, default=40, help="paused calls of each kind; 0 for none")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples={args.samples} is out of range: allowed --samples >= 2")
    if args.pause_ms < 0 or args.pause_calls < 0:
        parser.error("--pause-ms and --pause-calls are out of range: allowed values >= 0")
    run(args.out, args.presets, args.tokens, args.samples, args.min_seconds, args.seed, args.pause_ms, args.pause_calls)
    print((args.out / "cpu_throughput.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
