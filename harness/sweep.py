"""The crossover sweep: time pairs of paths over a geometric range of token counts, refine where they cross.

On a CUDA host the GPU paths are timed as graph replays of 20 calls on a hot input (``harness.timing``); on
a CPU-only machine the CPU paths are timed on the host. Every timed region sits in an NVTX range named as
DESIGN.md's Names section says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from harness.crossover import Band, refinement_points, speedup_band
from harness.inputs import generate_input
from harness.paths import PATHS
from harness.timing import Timing, range_name, time_graph, time_host
from op.configs import ALL_CONFIGS

DEFAULT_GPU_PAIRS = (("fused", "two_kernel"), ("fused_block", "two_kernel"))
DEFAULT_CPU_PAIRS = (("cpu_kernel", "composite_torch"), ("cpu_kernel", "reference"))


def geometric_tokens(low: int, high: int) -> list[int]:
    if not 1 <= low <= high:
        raise ValueError(f"token range [{low}, {high}] is invalid: allowed 1 <= low <= high")
    out, t = [], low
    while t < high:
        out.append(t)
        t *= 2
    return [*out, high]


def _gpu_timer(path: str, preset: str, dtype: str, repeats: int) -> Callable[[int], Timing]:
    import torch

    import op
    from op.composite import composite_torch

    functions = {
        "fused": op.grouped_topk,
        "two_kernel": op.two_kernel_grouped_topk,
        "fused_block": op.fused_block_grouped_topk,
        "composite_torch_cuda": composite_torch,
    }
    config = ALL_CONFIGS[preset]

    def timer(tokens: int) -> Timing:
        x, bias = generate_input(config, tokens, "float32", 0)
        xd = torch.from_numpy(x).cuda().to(getattr(torch, dtype))
        bd = torch.from_numpy(bias).cuda()
        label = range_name(path, preset, dtype, tokens, True, "hot", "graph")
        return time_graph(lambda i: functions[path](xd, bd, *config.args()), 1, label, repeats=repeats)

    return timer


def _cpu_timer(path: str, preset: str, dtype: str, repeats: int) -> Callable[[int], Timing]:
    config = ALL_CONFIGS[preset]

    def timer(tokens: int) -> Timing:
        x, bias = generate_input(config, tokens, dtype, 0)
        return time_host(lambda: PATHS[path].run(x, bias, config), repeats=repeats)

    return timer


def run_sweep(
    preset: str,
    dtype: str,
    tokens: Sequence[int],
    pairs: Sequence[tuple[str, str]],
    on_gpu: bool,
    repeats: int = 15,
    refine_rounds: int = 2,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, dict[int, Timing]], dict[str, list[Band]]]:
    """Timings per path and token count, and per pair ``candidate vs baseline`` the speedup bands."""
    paths = sorted({p for pair in pairs for p in pair})
    make = _gpu_timer if on_gpu else _cpu_timer
    timers = {p: make(p, preset, dtype, repeats) for p in paths}
    timings: dict[str, dict[int, Timing]] = {p: {} for p in paths}

    def measure(points: Sequence[int]) -> None:
        for t in points:
            for p in paths:
                if t not in timings[p]:
                    if progress:
                        progress(f"time {p} {preset} {dtype} T={t}")
                    timings[p][t] = timers[p](t)

    def bands_for(candidate: str, baseline: str) -> list[Band]:
        return [
            speedup_band(timings[baseline][t].samples, timings[candidate][t].samples, t)
            for t in sorted(timings[candidate])
        ]

    measure(tokens)
    for _ in range(refine_rounds):
        extra = sorted({t for c, b in pairs for t in refinement_points(bands_for(c, b))})
        if not extra:
            break
        measure(extra)
    return timings, {f"{c} vs {b}": bands_for(c, b) for c, b in pairs}
