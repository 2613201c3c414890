"""The crossover sweep: time pairs of paths over a geometric range of token counts in each launch kind, and
refine where they cross.

On a CUDA host the GPU paths are timed on a hot input in both launch kinds: ``graph`` (a CUDA graph of 20
back-to-back calls: the GPU time alone) and ``eager`` (20 back-to-back eager calls: host launch cost included,
with the host's own time to issue each call measured beside it). On a CPU-only machine the CPU paths are timed
on the host, their only launch kind, ``eager``. Every timed region sits in an NVTX range named as DESIGN.md's
Names section says.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from harness.crossover import Band, refinement_points, speedup_band
from harness.inputs import generate_input
from harness.paths import PATHS
from harness.timing import Timing, range_name, time_eager_with_host, time_graph, time_host
from op.configs import ALL_CONFIGS

DEFAULT_GPU_PAIRS = (("fused", "two_kernel"), ("fused_block", "two_kernel"))
DEFAULT_CPU_PAIRS = (("cpu_kernel", "composite_torch"), ("cpu_kernel", "reference"))
GPU_LAUNCHES = ("graph", "eager")
CPU_LAUNCHES = ("eager",)


def default_tokens(on_gpu: bool) -> list[int]:
    """Powers of 2 up to 65536 on a GPU; the CPU paths are slow enough at large T that on the CPU the sweep
    stops at 4096, in steps of 4."""
    return [2**i for i in range(17)] if on_gpu else [4**i for i in range(7)]


@dataclass
class SweepResult:
    """``timings[launch][path][T]``; ``bands[launch]["candidate vs baseline"]``: speedup bands at every measured
    T; ``host[path][T]``: the host's µs to issue one eager call (GPU paths only)."""

    timings: dict[str, dict[str, dict[int, Timing]]]
    bands: dict[str, dict[str, list[Band]]]
    host: dict[str, dict[int, Timing]] = field(default_factory=dict)


def geometric_tokens(low: int, high: int) -> list[int]:
    if not 1 <= low <= high:
        raise ValueError(f"token range [{low}, {high}] is invalid: allowed 1 <= low <= high")
    out, t = [], low
    while t < high:
        out.append(t)
        t *= 2
    return [*out, high]


@functools.lru_cache(maxsize=1)
def _device_input(preset: str, dtype: str, tokens: int):
    """One input per token count, shared by every path and launch kind the sweep times at it in turn."""
    import torch

    x, bias = generate_input(ALL_CONFIGS[preset], tokens, "float32", 0)
    return torch.from_numpy(x).cuda().to(getattr(torch, dtype)), torch.from_numpy(bias).cuda()


def _gpu_timer(path: str, preset: str, dtype: str, repeats: int, launch: str, host: dict[int, Timing]):

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
        xd, bd = _device_input(preset, dtype, tokens)
        label = range_name(path, preset, dtype, tokens, True, "hot", launch)

        def call(_):
            return functions[path](xd, bd, *config.args())

        if launch == "graph":
            return time_graph(call, 1, label, repeats=repeats)
        timing, host[tokens] = time_eager_with_host(call, 1, label, repeats=repeats)
        return timing

    return timer


def _cpu_timer(path: str, preset: str, dtype: str, repeats: int, launch: str, host: dict[int, Timing]):
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
    launches: Sequence[str] | None = None,
) -> SweepResult:
    """Each launch kind (default: graph and eager on a GPU, eager on the CPU) swept and refined on its own."""
    launches = launches or (GPU_LAUNCHES if on_gpu else CPU_LAUNCHES)
    paths = sorted({p for pair in pairs for p in pair})
    make = _gpu_timer if on_gpu else _cpu_timer
    result = SweepResult({launch: {p: {} for p in paths} for launch in launches}, {})
    if on_gpu:
        result.host = {p: {} for p in paths}
    timers = {
        (launch, p): make(p, preset, dtype, repeats, launch, result.host.get(p, {}))
        for launch in launches
        for p in paths
    }

    def measure(launch: str, points: Sequence[int]) -> None:
        timings = result.timings[launch]
        for t in points:
            for p in paths:
                if t not in timings[p]:
                    if progress:
                        progress(f"time {p} {preset} {dtype} T={t} {launch}")
                    timings[p][t] = timers[(launch, p)](t)

    def bands_for(launch: str, candidate: str, baseline: str) -> list[Band]:
        timings = result.timings[launch]
        return [
            speedup_band(timings[baseline][t].samples, timings[candidate][t].samples, t)
            for t in sorted(timings[candidate])
        ]

    # A point refined for one launch kind is measured in every kind, so each crossover is bracketed by token
    # counts that have the GPU, host and eager times which explain it.
    for launch in launches:
        measure(launch, tokens)
    for _ in range(refine_rounds):
        extra = sorted({t for launch in launches for c, b in pairs for t in refinement_points(bands_for(launch, c, b))})
        if not extra:
            break
        for launch in launches:
            measure(launch, extra)
    result.bands = {launch: {f"{c} vs {b}": bands_for(launch, c, b) for c, b in pairs} for launch in launches}
    return result
