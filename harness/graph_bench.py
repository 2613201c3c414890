"""Graph-runner figures: capture cost per bucket policy, eager vs replay per call, and what padding costs.

``python -m harness.graph_bench`` on a CUDA host prints three tables (card named in the header).
"""

from __future__ import annotations

import sys

from graphs.buckets import bucket_list
from graphs.runner import GraphRunner
from harness.timing import time_eager
from op.configs import PRESETS

FRESH_INPUTS = 8


def main() -> int:
    import torch

    import op

    config = PRESETS["deepseek_v3"]
    generator = torch.Generator(device="cuda").manual_seed(0)
    print(f"card: {torch.cuda.get_device_name()}; deepseek_v3, bfloat16")

    print("\n| policy | path | buckets | largest | capture s | memory MiB |")
    print("|---|---|---|---|---|---|")
    runners = {}
    for path in ("fused", "two_kernel"):
        runner = GraphRunner(path, config, bucket_list("fastdeploy"), "bfloat16", name="deepseek_v3")
        runners[path] = runner
        stats = runner.stats()
        print(
            f"| fastdeploy | {path} | {stats['buckets']} | {stats['largest']} | {stats['capture_seconds']:.2f} "
            f"| {stats['memory_bytes'] / 2**20:.1f} |"
        )

    print("\n| T | eager fused µs | runner fused µs (copy-in + replay) | bare replay µs | eager / runner |")
    print("|---|---|---|---|---|")
    big = GraphRunner("fused", config, bucket_list("pow2", 8192), "bfloat16", name="deepseek_v3")
    for tokens in (1, 64, 1024, 8192):
        x = torch.randn((tokens, 256), generator=generator, device="cuda").to(torch.bfloat16)
        bias = torch.randn(256, generator=generator, device="cuda") * 0.1
        runner = runners["fused"] if tokens <= 512 else big
        eager = time_eager(lambda i, x=x, bias=bias: op.grouped_topk(x, bias, *config.args()), 1, f"eager:T{tokens}")
        # A server hands the runner a new tensor every call: rotate over distinct ones, so no cache keyed on the
        # input's identity can help.
        fresh = [torch.randn_like(x, dtype=torch.float32).to(torch.bfloat16) for _ in range(FRESH_INPUTS)]
        replay = time_eager(lambda i, f=fresh, bias=bias, r=runner: r(f[i], bias), FRESH_INPUTS, f"runner:T{tokens}")
        graph = runner._graphs[runner.table.bucket_for(tokens)]
        bare = time_eager(lambda i, g=graph: g.replay(), 1, f"replay:T{tokens}")
        print(f"| {tokens} | {eager.p50:.2f} | {replay.p50:.2f} | {bare.p50:.2f} | {eager.p50 / replay.p50:.2f} |")

    print("\n| 40000 tokens in the 65536 bucket | runner µs per call |")
    print("|---|---|")
    x = torch.randn((40000, 256), generator=generator, device="cuda").to(torch.bfloat16)
    bias = torch.randn(256, generator=generator, device="cuda") * 0.1
    for skip in (True, False):
        runner = GraphRunner("fused", config, [65536], "bfloat16", skip_padding=skip, name="deepseek_v3")
        t = time_eager(lambda i, r=runner: r(x, bias), 1, f"runner:T40000:skip{skip}")
        print(f"| skip_padding={skip} | {t.p50:.2f} |")
        del runner
    return 0


if __name__ == "__main__":
    sys.exit(main())
