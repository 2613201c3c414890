"""The ``fusedgate`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from harness.inputs import DISTRIBUTIONS, generate_input
from op import reference
from op.configs import ALL_CONFIGS, PRESETS


def _reference_table(args: argparse.Namespace) -> int:
    names = args.preset or sorted(PRESETS)
    print(f"numpy reference, {args.dtype} logits, distribution {args.distribution}, seed {args.seed}")
    print("| preset | E | n_group | topk_group | top_k | T | fallback rows | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        config = ALL_CONFIGS[name]
        x, bias = generate_input(config, args.tokens, args.dtype, args.seed, args.distribution)
        start = time.perf_counter()
        _, values, ids = reference.grouped_topk(x, bias, *config.args())
        elapsed = time.perf_counter() - start
        fallback = int(
            ((ids == np.arange(config.top_k)) & (values == reference.fallback_weight(config.top_k))).all(axis=1).sum()
        )
        print(
            f"| {name} | {config.num_experts} | {config.n_group} | {config.topk_group} | {config.top_k} "
            f"| {args.tokens} | {fallback} | {elapsed:.3f} |"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ref = commands.add_parser("reference", help="route a generated batch with the numpy reference and time it")
    ref.add_argument("--preset", action="append", choices=sorted(ALL_CONFIGS), help="repeatable; default: all presets")
    ref.add_argument("--tokens", type=int, default=65536)
    ref.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ref.add_argument("--distribution", choices=DISTRIBUTIONS, default="randn")
    ref.add_argument("--seed", type=int, default=0)
    ref.set_defaults(run=_reference_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "tokens", 0) < 0:
        build_parser().error(f"--tokens={args.tokens} is out of range: allowed >= 0")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
