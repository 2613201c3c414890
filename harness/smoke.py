"""A small run of every GPU path on every preset and dtype, checked against the reference.

Sized for ``compute-sanitizer`` (memcheck, racecheck, synccheck): ``python -m harness.smoke``. Exits 1 on any
alignment failure; the sanitizer's own exit code reports memory errors.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np


def main() -> int:
    import torch

    from harness.inputs import generate_input
    from op import fused_block_grouped_topk, grouped_topk, two_kernel_grouped_topk
    from op.configs import ALL_CONFIGS
    from op.testing import compare_routing

    paths = {"fused": grouped_topk, "two_kernel": two_kernel_grouped_topk, "fused_block": fused_block_grouped_topk}
    failures = 0
    for name, config in ALL_CONFIGS.items():
        # 67 tokens take the block-per-token kernel of `fused` where it applies, 2000 the others.
        for dtype, tokens in itertools.product(("float32", "bfloat16", "float16"), (67, 2000)):
            x, bias = generate_input(config, tokens, dtype, 7, "nonfinite" if dtype == "float16" else "randn")
            xd = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype)).cuda()
            bd = torch.from_numpy(bias).cuda()
            for path, route in paths.items():
                result = compare_routing(route(xd, bd, *config.args()), x, bias, config)
                torch.cuda.synchronize()
                if not result.ok:
                    failures += 1
                    print(f"FAIL {path} {name} {dtype} T={tokens}: {result.first_failure}")
    print(f"smoke: {len(ALL_CONFIGS) * 6 * len(paths)} runs, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
