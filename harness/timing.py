"""Timing of routing paths on a CUDA device: CUDA-graph replays of back-to-back calls, hot or cold L2.

``hot``: the same input every call. ``cold``: calls rotate over input sets whose total is at least twice the
L2 size. Each measurement is the per-call time of one replay of a graph of ``calls`` back-to-back calls,
repeated; the median and quartiles are reported. Each timed region is wrapped in an NVTX range named
``path:preset:dtype:T<T>:<scores>:<l2>:<launch>`` in the ``fusedgate`` domain.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import nvtx

NVTX_DOMAIN = "fusedgate"


@dataclass
class Timing:
    p25: float
    p50: float
    p75: float
    n: int
    samples: tuple[float, ...] = ()


def range_name(path: str, preset: str, dtype: str, tokens: int, scores: bool, l2: str, launch: str) -> str:
    return f"{path}:{preset}:{dtype}:T{tokens}:{'scores' if scores else 'noscores'}:{l2}:{launch}"


def l2_bytes() -> int:
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)


def cold_input_sets(bytes_per_set: int, most: int = 20) -> int:
    """Input sets a cold graph rotates over: enough to total twice the L2, at most one per call of the graph.

    Where ``most`` sets still total less than that, the caller flushes the L2 before each replay as well.
    """
    return min(most, max(2, -(-2 * l2_bytes() // bytes_per_set)))


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        samples.append(2 * nbytes / (start.elapsed_time(stop) * 1e-3))
    return statistics.median(samples)


def quartiles(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return Timing(q[0], statistics.median(samples), q[2], len(samples), tuple(samples))


def time_host(call: Callable[[], object], repeats: int = 15, min_seconds: float = 2e-3) -> Timing:
    """Per-call µs of a CPU function: each sample averages enough calls to last ``min_seconds``."""
    call()
    start = time.perf_counter()
    call()
    per_call = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(min_seconds / per_call))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            call()
        samples.append((time.perf_counter() - start) * 1e6 / inner)
    return quartiles(samples)


def l2_flusher() -> Callable[[], None]:
    """Overwrite twice the L2 size, so that the next kernel finds none of its inputs cached."""
    import torch

    scratch = torch.empty(2 * l2_bytes(), dtype=torch.uint8, device="cuda")
    return lambda: scratch.fill_(1)


def time_graph(
    call: Callable[[int], object],
    input_sets: int,
    name: str,
    calls: int = 20,
    repeats: int = 30,
    warmup: int = 3,
    before_replay: Callable[[], None] | None = None,
) -> Timing:
    """Per-call µs of ``call(i)`` (``i`` picks the input set) captured ``calls`` times into one CUDA graph.

    ``before_replay`` runs ahead of each timed replay, outside the timed events (an L2 flush, for instance).
    """
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(input_sets):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % input_sets)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if before_replay is not None:
            before_replay()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # The range holds the timed replay only, so an L2 flush never lands in a profile of this configuration.
        with nvtx.annotate(name, domain=NVTX_DOMAIN):
            start.record()
            graph.replay()
            stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e3 / calls)
    return quartiles(samples)


def time_eager(call: Callable[[int], object], input_sets: int, name: str, calls: int = 20, repeats: int = 30) -> Timing:
    """Per-call µs of ``calls`` back-to-back eager calls (host launch cost included)."""
    return time_eager_with_host(call, input_sets, name, calls, repeats)[0]


def time_eager_with_host(
    call: Callable[[int], object], input_sets: int, name: str, calls: int = 20, repeats: int = 30
) -> tuple[Timing, Timing]:
    """Per-call µs of ``calls`` back-to-back eager calls, and the host's µs per call to issue them.

    The host figure is the wall time of the issuing loop alone (launches are asynchronous, so it ends before
    the GPU does): what one eager call costs the host however short its kernels. Back-to-back eager calls take
    about the larger of it and the GPU time per call.
    """
    import torch

    for i in range(input_sets):
        call(i)
    torch.cuda.synchronize()
    samples, host = [], []
    with nvtx.annotate(name, domain=NVTX_DOMAIN):
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            issue = time.perf_counter()
            for i in range(calls):
                call(i % input_sets)
            host.append((time.perf_counter() - issue) * 1e6 / calls)
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) * 1e3 / calls)
    return quartiles(samples), quartiles(host)


def harness_overhead(repeats: int = 30) -> dict[str, Timing]:
    """What the measurement itself costs: an empty kernel timed the way paths are, and one NVTX range on the host.

    The empty kernel (``torch.cuda._sleep(0)``) bounds from below any per-call latency the harness can report.
    """
    import torch

    def empty(_):
        torch.cuda._sleep(0)

    def nvtx_range():
        with nvtx.annotate("overhead:nvtx", domain=NVTX_DOMAIN):
            pass

    return {
        "empty kernel, graph of 20 (µs per call)": time_graph(empty, 1, "overhead:empty:graph", repeats=repeats),
        "empty kernel, eager (µs per call)": time_eager(empty, 1, "overhead:empty:eager", repeats=repeats),
        "NVTX range push + pop on the host (µs)": time_host(nvtx_range, repeats=repeats),
    }
