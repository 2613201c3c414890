"""``nox -s bench``: every GPU path timed side by side, hot and cold L2, against the bandwidth floor.

Prints one markdown table (µs per call, ratios measured in the same run, fraction of the floor in cold mode)
and writes the long-format CSV of DESIGN.md's Names section.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

from harness.results import write_csv
from harness.timing import copy_bandwidth, l2_bytes, l2_flusher, range_name, time_eager, time_graph
from op.configs import ALL_CONFIGS

DEFAULT_CONFIGS = ["deepseek_v3", "kimi_k2", "glm45_air", "glm45", "fd_qwen3_30b_a3b", "fd_kimi_k2", "x_e72", "x_e1024"]
DEFAULT_TOKENS = [2**i for i in range(17)]


def floor_bytes(tokens: int, experts: int, top_k: int, elem: int, scores: bool, index_bytes: int = 8) -> int:
    """Bytes that must move: logits read once, weights and ids written, plus the float32 scores if written."""
    return tokens * experts * elem + tokens * top_k * (4 + index_bytes) + (tokens * experts * 4 if scores else 0)


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


def run(args: argparse.Namespace) -> int:
    import torch

    card = torch.cuda.get_device_name()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    commit = commit.stdout.strip()
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    l2 = l2_bytes()
    bandwidth = copy_bandwidth()
    print(f"card: {card}; L2 {l2 / 2**20:.0f} MiB; copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)")
    paths = {k: v for k, v in _paths().items() if k in args.paths}
    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    rows, table = [], []
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    flush = l2_flusher()
    for preset in args.configs:
        config = ALL_CONFIGS[preset]
        for tokens in args.tokens:
            per_set = tokens * config.num_experts * elem
            # Cold: one distinct input per call of the graph, up to 2x L2 in total; where 20 sets are smaller
            # than that, the L2 is flushed before each replay as well.
            cold_sets = min(20, max(2, -(-2 * l2 // per_set)))
            sets = {"hot": 1, "cold": cold_sets}
            flush_cold = cold_sets * per_set < 2 * l2
            max_sets = max(sets[m] for m in args.l2)
            inputs = [
                torch.randn((tokens, config.num_experts), generator=generator, device="cuda").to(dtype)
                for _ in range(max_sets)
            ]
            bias = (torch.randn(config.num_experts, generator=generator, device="cuda") * 0.1).float()
            result = {}
            for mode in args.l2:
                for name, (route, scores) in paths.items():

                    def call(i, route=route, scores=scores, inputs=inputs, bias=bias, config=config):
                        return route(inputs[i], bias, *config.args(), return_scores=scores)

                    for launch in args.launch:
                        label = range_name(
                            name.replace("_noscores", ""), preset, args.dtype, tokens, scores, mode, launch
                        )
                        if launch == "graph":
                            before = flush if mode == "cold" and flush_cold else None
                            t = time_graph(call, sets[mode], label, repeats=args.repeats, before_replay=before)
                        else:
                            t = time_eager(call, sets[mode], label, repeats=args.repeats)
                        result[(name, mode, launch)] = t
                        rows.append(
                            {
                                "path": name.replace("_noscores", ""),
                                "preset": preset,
                                "E": config.num_experts,
                                "dtype": args.dtype,
                                "T": tokens,
                                "scores": "scores" if scores else "noscores",
                                "l2": mode,
                                "launch": launch,
                                "distribution": "randn",
                                "metric": "latency",
                                "unit": "us",
                                "p25": f"{t.p25:.3f}",
                                "p50": f"{t.p50:.3f}",
                                "p75": f"{t.p75:.3f}",
                                "n": t.n,
                                "card": card,
                                "timestamp": stamp,
                                "commit": commit,
                            }
                        )
            table.append((preset, tokens, config, result))
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
                floor = floor_bytes(tokens, config.num_experts, config.top_k, elem, True) / bandwidth * 1e6
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
