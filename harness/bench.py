"""``nox -s bench``: every GPU path timed side by side, hot and cold L2, against the bandwidth floor.

Prints one markdown table (µs per call, ratios measured in the same run, fraction of the floor in cold mode)
and writes the long-format CSV of DESIGN.md's Names section.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.results import git_commit, write_csv
from harness.timing import (
    cold_input_sets,
    copy_bandwidth,
    l2_bytes,
    l2_flusher,
    range_name,
    time_eager,
    time_graph,
)
from op.configs import ALL_CONFIGS

DEFAULT_CONFIGS = ["deepseek_v3", "kimi_k2", "glm45_air", "glm45", "fd_qwen3_30b_a3b", "fd_kimi_k2", "x_e72", "x_e1024"]
DEFAULT_TOKENS = [2**i for i in range(17)]


def floor_bytes(tokens: int, experts: int, top_k: int, elem: int, scores: bool, index_bytes: int = 8) -> int:
    """Bytes that must move: logits read once, weights and ids written, plus the float32 scores if written."""
    return tokens * experts * elem + tokens * top_k * (4 + index_bytes) + (tokens * experts * 4 if scores else 0)


def floor_us(tokens: int, experts: int, top_k: int, elem: int, scores: bool, bandwidth: float) -> float:
    """The bandwidth floor in µs: bytes that must move over the measured copy bandwidth (bytes/s)."""
    return floor_bytes(tokens, experts, top_k, elem, scores) / bandwidth * 1e6


def floor_fraction_row(latency: dict, floor: float, timing) -> dict:
    """The ``floor_fraction`` row (floor time / measured time) beside a latency row."""
    return {
        **latency,
        "metric": "floor_fraction",
        "unit": "fraction",
        # A fraction falls as time rises, so the quartiles swap ends.
        "p25": f"{floor / timing.p75:.4g}",
        "p50": f"{floor / timing.p50:.4g}",
        "p75": f"{floor / timing.p25:.4g}",
    }


def _paths():
    from op import fused_block_grouped_topk, grouped_topk, two_kernel_grouped_topk
    from op.composite import composite_torch

    return {
        "fused": (grouped_topk, True),
        "fused_noscores": (grouped_topk, False),
        "two_kernel": (two_kernel_grouped_topk, True),
        "fused_block": (fused_block_grouped_topk, True),
        "composite_torch": (composite_torch, True),
    }


def latency_row(path, preset, config, dtype, tokens, scores, l2, launch, timing, context) -> dict:
    """One long-format latency row (DESIGN.md's Names); ``context`` holds card, timestamp and commit."""
    return {
        "path": path,
        "preset": preset,
        "E": config.num_experts,
        "dtype": dtype,
        "T": tokens,
        "scores": "scores" if scores else "noscores",
        "l2": l2,
        "launch": launch,
        "distribution": "randn",
        "metric": "latency",
        "unit": "us",
        "p25": f"{timing.p25:.3f}",
        "p50": f"{timing.p50:.3f}",
        "p75": f"{timing.p75:.3f}",
        "n": timing.n,
        **context,
    }


def measure(
    preset: str,
    tokens: int,
    paths: Sequence[str],
    l2_modes: Sequence[str],
    launches: Sequence[str],
    dtype_name: str,
    repeats: int,
    generator,
    flush: Callable[[], None],
    bandwidth: float,
    context: dict,
) -> tuple[dict, list[dict]]:
    """Time ``paths`` on one preset and token count in every L2 mode and launch kind.

    Returns the timings keyed by ``(path, l2, launch)`` and the long-format rows: latencies, and in cold mode
    each path's fraction of the bandwidth floor (floor time / measured time).
    """
    import torch

    config = ALL_CONFIGS[preset]
    dtype = getattr(torch, dtype_name)
    elem = torch.empty((), dtype=dtype).element_size()
    per_set = tokens * config.num_experts * elem
    cold_sets = cold_input_sets(per_set)
    sets = {"hot": 1, "cold": cold_sets}
    flush_cold = cold_sets * per_set < 2 * l2_bytes()
    inputs = [
        torch.randn((tokens, config.num_experts), generator=generator, device="cuda").to(dtype)
        for _ in range(max(sets[m] for m in l2_modes))
    ]
    bias = (torch.randn(config.num_experts, generator=generator, device="cuda") * 0.1).float()
    routes = _paths()
    result, rows = {}, []
    for mode in l2_modes:
        for name in paths:
            route, scores = routes[name]
            path = name.replace("_noscores", "")

            def call(i, route=route, scores=scores):
                return route(inputs[i], bias, *config.args(), return_scores=scores)

            for launch in launches:
                label = range_name(path, preset, dtype_name, tokens, scores, mode, launch)
                if launch == "graph":
                    before = flush if mode == "cold" and flush_cold else None
                    timing = time_graph(call, sets[mode], label, repeats=repeats, before_replay=before)
                else:
                    timing = time_eager(call, sets[mode], label, repeats=repeats)
                result[(name, mode, launch)] = timing
                row = latency_row(path, preset, config, dtype_name, tokens, scores, mode, launch, timing, context)
                rows.append(row)
                if mode == "cold":
                    floor = floor_us(tokens, config.num_experts, config.top_k, elem, scores, bandwidth)
                    rows.append(floor_fraction_row(row, floor, timing))
    return result, rows


def run(args: argparse.Namespace) -> int:
    import torch

    card = torch.cuda.get_device_name()
    context = {
        "card": card,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }
    bandwidth = copy_bandwidth()
    print(f"card: {card}; L2 {l2_bytes() / 2**20:.0f} MiB; copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)")
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    rows, table = [], []
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    flush = l2_flusher()
    for preset in args.configs:
        for tokens in args.tokens:
            result, new_rows = measure(
                preset,
                tokens,
                args.paths,
                args.l2,
                args.launch,
                args.dtype,
                args.repeats,
                generator,
                flush,
                bandwidth,
                context,
            )
            rows += new_rows
            table.append((preset, tokens, ALL_CONFIGS[preset], result))
            print(f"done {preset} T={tokens}", file=sys.stderr, flush=True)
    _print_table(table, args, bandwidth, elem)
    if args.csv:
        write_csv(Path(args.csv), rows)
        print(f"wrote {args.csv}")
    return 0


def _print_table(table, args, bandwidth, elem) -> None:
    launch = args.launch[0]
    for mode in args.l2:
        names = [
            n for n in ("fused", "fused_noscores", "two_kernel", "fused_block", "composite_torch") if n in args.paths
        ]
        head = " | ".join(names)
        extra = " | floor scores µs | floor / fused" if mode == "cold" else ""
        print(f"\n{mode} L2, {launch} launch, {args.dtype}, µs per call (median)")
        print(f"| preset | T | {head} | two_kernel / fused | fused_block / fused{extra} |")
        print("|" + "---|" * (len(names) + 4 + (2 if extra else 0)))
        for preset, tokens, config, result in table:
            cells = [f"{result[(n, mode, launch)].p50:.2f}" for n in names]
            fused = result.get(("fused", mode, launch))
            two = result.get(("two_kernel", mode, launch))
            block = result.get(("fused_block", mode, launch))
            ratio = f"{two.p50 / fused.p50:.2f}" if fused and two else "-"
            ratio_b = f"{block.p50 / fused.p50:.2f}" if fused and block else "-"
            line = f"| {preset} | {tokens} | {' | '.join(cells)} | {ratio} | {ratio_b}"
            if extra:
                floor = floor_us(tokens, config.num_experts, config.top_k, elem, True, bandwidth)
                line += f" | {floor:.2f} | {floor / fused.p50:.2f}" if fused else " | - | -"
            print(line + " |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedgate bench", description=__doc__)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=sorted(ALL_CONFIGS))
    parser.add_argument("--tokens", nargs="+", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--paths", nargs="+", default=list(_PATH_NAMES), choices=_PATH_NAMES)
    parser.add_argument("--l2", nargs="+", default=["hot", "cold"], choices=["hot", "cold"])
    parser.add_argument("--launch", nargs="+", default=["graph"], choices=["graph", "eager"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default="")
    return parser


_PATH_NAMES = ("fused", "fused_noscores", "two_kernel", "fused_block", "composite_torch")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [t for t in args.tokens if t < 1]
    if bad:
        build_parser().error(f"--tokens {bad} out of range: allowed >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
