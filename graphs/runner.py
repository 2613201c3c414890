"""Capture a routing path once per batch bucket; serve any token count by copy-in, padding and one replay.

One static input set and one static output set sized for the largest bucket are allocated at start (bucket b
uses their first b rows), and every bucket's graph is captured into one shared memory pool. With
``skip_padding`` the token count is written into a device scalar that the captured kernels read as
``num_tokens``, so padded rows cost nothing; without it the padded rows are computed on whatever earlier calls
left there, which rule 7 keeps harmless (every computed row gets valid, distinct ids).

The framework-specific part is a small backend (allocation, copy, graph capture and replay); everything else
is shared between PyTorch and Paddle.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import nvtx

from graphs.buckets import BucketTable
from op import torch_call
from op.build import library
from op.configs import RoutingConfig

NVTX_DOMAIN = "fusedgate"
PATHS_WITH_NUM_TOKENS = ("fused", "two_kernel", "fused_block")
GRAPH_PATHS = (*PATHS_WITH_NUM_TOKENS, "composite_torch")
VIEW_CACHE_ENTRIES = 4096


def _path_function(path: str) -> Callable[..., tuple]:
    import op

    if path == "composite_torch":
        from op.composite import composite_torch

        return composite_torch
    functions = {
        "fused": op.grouped_topk,
        "two_kernel": op.two_kernel_grouped_topk,
        "fused_block": op.fused_block_grouped_topk,
    }
    if path not in functions:
        raise ValueError(f"path={path!r} cannot be captured: allowed {', '.join(GRAPH_PATHS)}")
    return functions[path]


class _TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("GraphRunner(framework='torch') needs a CUDA GPU visible to torch")
        self.torch = torch
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self._replay_rows = library().replay_rows

    def empty(self, shape: Sequence[int], dtype: str) -> Any:
        return self.torch.empty(tuple(shape), dtype=getattr(self.torch, dtype), device="cuda")

    def full(self, shape: Sequence[int], value: float, dtype: str) -> Any:
        return self.torch.full(tuple(shape), value, dtype=getattr(self.torch, dtype), device="cuda")

    def warm_up(self, fn: Callable[[], Any]) -> None:
        self.stream.wait_stream(self.torch.cuda.current_stream())
        with self.torch.cuda.stream(self.stream):
            fn()
        self.torch.cuda.current_stream().wait_stream(self.stream)

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, pool=self.pool):
            result = fn()
        return graph, result

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def memory_in_use(self) -> int:
        return int(self.torch.cuda.memory_reserved())

    def rows(self, tensor: Any, count: int) -> Any:
        return tensor[:count]

    def copy(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def replayer(self, dst: Any, graph: Any) -> Callable[[Any], None]:
        """Copy-in into ``dst`` and ``graph``'s replay, bound once: one library call that queues the device copy
        (none when the caller passes ``dst`` itself) and the graph's launch, for contiguous CUDA logits of the
        buffer's dtype (torch's ``copy_`` spends more of the host's time in operator dispatch and element-wise
        set-up than in the copy, and its ``replay`` is one more call); torch's converting copy and replay for
        anything else, which the library refuses before it queues anything. The graph holds no random number
        generator state for ``replay`` to advance, so launching its executable graph directly is the whole
        replay."""
        convert, replay = dst.copy_, graph.replay
        graph_exec = graph.raw_cuda_graph_exec()
        # Through the torch extension where it is built: the same library call without tvm-ffi's per-call
        # conversion of two torch tensors. Its refusals are the library's ValueErrors, as through tvm-ffi.
        direct = torch_call.plan(
            "replay_rows", dst.device, [("dst", False), ("src", False)], [],
            [("input", 0), ("input", 1), ("int", graph_exec)], [],
        )  # fmt: skip
        if direct is None:
            through_ffi = self._replay_rows

            def replay_rows(src: Any) -> None:
                through_ffi(dst, src, graph_exec)

        else:
            replay_rows = functools.partial(direct, dst)

        def copy_in_and_replay(src: Any) -> None:
            try:
                replay_rows(src)
            except ValueError:
                convert(src)
                replay()

        return copy_in_and_replay

    def host_replayer(self, dst: Any, graph: Any, host_in: Any, outputs: Sequence[tuple[Any, Any]], event: Any):
        """Copy-in from host memory, ``graph``'s replay, the copies of ``outputs`` (``(host, device)`` pairs, the
        host side None for an output not wanted) back to the host and ``event``'s record, bound once to the stream
        current now: one library call. Its tensors are converted once here, so a call converts none."""
        import tvm_ffi

        torch, convert = self.torch, tvm_ffi.from_dlpack
        if not event.cuda_event:
            raise ValueError("the event has no CUDA event yet (torch creates it at its first record): record it once")
        handles = [convert(host_in), convert(dst), graph.raw_cuda_graph_exec()]
        for host, device in outputs:
            handles += [None, None] if host is None else [convert(host), convert(device)]
        handles += [event.cuda_event, torch.cuda.current_stream().cuda_stream]
        return functools.partial(library().replay_host_rows, *handles)


class _PaddleBackend(_TorchBackend):
    """Paddle GPU graphs (``paddle.device.cuda.graphs.CUDAGraph`` with one shared pool id)."""

    name = "paddle"

    def __init__(self) -> None:
        import paddle

        if not paddle.device.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
            raise RuntimeError("GraphRunner(framework='paddle') needs a Paddle GPU build and a visible GPU")
        self.paddle = paddle
        self.pool = paddle.base.core.CUDAGraph.gen_new_memory_pool_id()

    def empty(self, shape: Sequence[int], dtype: str) -> Any:
        return self.paddle.empty(list(shape), dtype=dtype)

    def full(self, shape: Sequence[int], value: float, dtype: str) -> Any:
        return self.paddle.full(list(shape), value, dtype=dtype)

    def warm_up(self, fn: Callable[[], Any]) -> None:
        fn()

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        from paddle.device.cuda.graphs import CUDAGraph

        graph = CUDAGraph(pool_id=self.pool)
        graph.capture_begin()
        try:
            result = fn()
        finally:
            graph.capture_end()
        return graph, result

    def synchronize(self) -> None:
        self.paddle.device.cuda.synchronize()

    def memory_in_use(self) -> int:
        return int(self.paddle.device.cuda.memory_reserved())

    def copy(self, dst: Any, src: Any) -> None:
        self.paddle.assign(src.astype(dst.dtype), output=dst)

    def replayer(self, dst: Any, graph: Any) -> Callable[[Any], None]:
        def copy_in_and_replay(src: Any) -> None:
            self.copy(dst, src)
            graph.replay()

        return copy_in_and_replay

    def host_replayer(self, dst: Any, graph: Any, host_in: Any, outputs: Sequence[tuple[Any, Any]], event: Any):
        raise NotImplementedError("GraphRunner.from_host is available with framework='torch'")


_BACKENDS = {"torch": _TorchBackend, "paddle": _PaddleBackend}


class GraphRunner:
    """Graph replays of one routing path at fixed batch buckets.

    ``runner(logits, bias)`` returns ``(scores, topk_values, topk_indices)``. For ``T`` up to the largest bucket
    they are views of the runner's static outputs, valid until the next call on the same runner: a caller that
    keeps them copies them. Above the largest bucket the call replays in chunks into newly allocated outputs,
    which the caller owns.
    """

    def __init__(
        self,
        path: str,
        config: RoutingConfig,
        buckets: Sequence[int],
        dtype: str,
        framework: str = "torch",
        *,
        index_dtype: str = "int64",
        return_scores: bool = True,
        skip_padding: bool = True,
        name: str = "",
    ):
        if framework not in _BACKENDS:
            raise ValueError(f"framework={framework!r} is not supported: allowed {', '.join(_BACKENDS)}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r} is not supported: allowed float32, bfloat16, float16")
        self.path, self.config, self.dtype = path, config, dtype
        self.name = name or f"E{config.num_experts}"
        self.table = BucketTable(buckets)
        self.index_dtype, self.return_scores = index_dtype, return_scores
        self.skip_padding = skip_padding and path in PATHS_WITH_NUM_TOKENS
        self._route = _path_function(path)
        self._backend = _BACKENDS[framework]()
        b = self._backend
        largest, experts, k = self.table.largest, config.num_experts, config.top_k
        memory_before = b.memory_in_use()
        # Inputs start as zeros: defined data in every padding row, whatever the first call brings.
        self.static_logits = b.full((largest, experts), 0.0, dtype)
        self.static_bias = b.full((experts,), 0.0, "float32")
        self.static_num_tokens = b.full((1,), largest, "int32")
        self._static_out = (
            b.empty((largest, experts), "float32") if return_scores else None,
            b.empty((largest, k), "float32"),
            b.empty((largest, k), index_dtype),
        )
        self._graphs: dict[int, Any] = {}
        self._outputs: dict[int, tuple] = {}
        # The last bias copied in and its version (torch counts in-place writes in _version); holding it keeps
        # its identity from being reused by another tensor.
        self._bias: Any = None
        self._bias_version: int | None = None
        self._count_written = largest
        # Per input shape up to the largest bucket: its copy-in, replay, NVTX attributes, output views and count,
        # bound once, so that a call does no more than run them.
        self._domain = nvtx.get_domain(NVTX_DOMAIN)
        self._steps: dict[Any, tuple] = {}
        start = time.perf_counter()
        for bucket in self.table.buckets:
            b.warm_up(lambda bucket=bucket: self._launch(bucket))
            self._graphs[bucket], self._outputs[bucket] = b.capture(lambda bucket=bucket: self._launch(bucket))
        b.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.memory_bytes = b.memory_in_use() - memory_before

    def _launch(self, bucket: int) -> tuple:
        b = self._backend
        kwargs: dict[str, Any] = {"index_dtype": self.index_dtype, "return_scores": self.return_scores}
        if self.path in PATHS_WITH_NUM_TOKENS:
            kwargs["out"] = tuple(None if t is None else b.rows(t, bucket) for t in self._static_out)
            if self.skip_padding:
                kwargs["num_tokens"] = self.static_num_tokens
        return self._route(b.rows(self.static_logits, bucket), self.static_bias, *self.config.args(), **kwargs)

    def _step(self, count: int) -> tuple:
        """What a call of ``count`` rows runs: bound copy-in and replay, NVTX attributes, output views."""
        b = self._backend
        bucket = self.table.bucket_for(count)
        views = tuple(None if t is None else b.rows(t, count) for t in self._outputs[bucket])
        attributes = self._domain.get_event_attributes(message=f"{self.path}:{self.name}:bucket{bucket}")
        return b.replayer(b.rows(self.static_logits, count), self._graphs[bucket]), attributes, views, count

    def _prepare(self, bias: Any, count: int) -> None:
        # The bias rarely changes between calls: it is copied only when another tensor, or a modified one, arrives.
        version = getattr(bias, "_version", None)
        if bias is not self._bias or version is None or version != self._bias_version:
            self._backend.copy(self.static_bias, bias.reshape(self.static_bias.shape))
            self._bias, self._bias_version = bias, version
        # The device scalar keeps its value between calls: it is written only when the count changes.
        if self.skip_padding and count != self._count_written:
            self.static_num_tokens.fill_(count)
            self._count_written = count

    def _run(self, step: tuple, logits: Any, bias: Any) -> tuple:
        replay, attributes, views, count = step
        self._prepare(bias, count)
        domain = self._domain
        domain.push_range(attributes)
        replay(logits)
        domain.pop_range()
        return views

    def from_host(self, host_logits: Any, host_outputs: Sequence[Any], event: Any) -> Callable[[Any], None]:
        """A call bound to host buffers (torch only): ``step(bias)`` routes the ``count`` rows of ``host_logits``
        ([count, E], the runner's dtype, pinned for the copies to be asynchronous) into ``host_outputs``
        (``(scores or None, topk_values, topk_indices)``, each of ``count`` rows; scores None when not wanted) and
        records ``event`` behind the copies, all in one library call on the stream current now; call the step on that
        stream, which also takes the bias's copy when it changes. The caller waits for the event before reading the
        outputs or writing ``host_logits`` again, and binds one step per buffer set and count."""
        count = int(host_logits.shape[0])
        if not 0 < count <= self.table.largest:
            raise ValueError(f"host_logits has {count} rows: allowed 1..{self.table.largest} (the largest bucket)")
        bucket = self.table.bucket_for(count)
        b = self._backend
        devices = tuple(None if t is None else b.rows(t, count) for t in self._outputs[bucket])
        if host_outputs[0] is not None and devices[0] is None:
            raise ValueError("host_outputs asks for scores from a runner built with return_scores=False")
        replay = b.host_replayer(
            b.rows(self.static_logits, count),
            self._graphs[bucket],
            host_logits,
            list(zip(host_outputs, devices, strict=True)),
            event,
        )
        attributes = self._domain.get_event_attributes(message=f"{self.path}:{self.name}:bucket{bucket}:host")
        domain, prepare = self._domain, self._prepare

        def step(bias: Any) -> None:
            prepare(bias, count)
            domain.push_range(attributes)
            replay()
            domain.pop_range()

        return step

    def __call__(self, logits: Any, bias: Any) -> tuple:
        try:
            step = self._steps[logits.shape]
        except (KeyError, TypeError):
            return self._call_new_shape(logits, bias)
        return self._run(step, logits, bias)

    def _call_new_shape(self, logits: Any, bias: Any) -> tuple:
        shape = logits.shape
        # Paddle's shapes are lists, kept as tuples.
        step = self._steps.get(tuple(shape))
        if step is not None:
            return self._run(step, logits, bias)
        if len(shape) != 2 or shape[1] != self.config.num_experts:
            raise ValueError(f"gating_output must have shape [T, {self.config.num_experts}], got {tuple(shape)}")
        count = int(shape[0])
        if 0 < count <= self.table.largest:
            step = self._step(count)
            # Bounded, so a server seeing every token count up to 65536 does not hoard view objects.
            if len(self._steps) < VIEW_CACHE_ENTRIES:
                self._steps[tuple(shape)] = step
            return self._run(step, logits, bias)
        b, k = self._backend, self.config.top_k
        if count == 0:
            return (
                b.empty((0, self.config.num_experts), "float32") if self.return_scores else None,
                b.empty((0, k), "float32"),
                b.empty((0, k), self.index_dtype),
            )
        owned = (
            b.empty((count, self.config.num_experts), "float32") if self.return_scores else None,
            b.empty((count, k), "float32"),
            b.empty((count, k), self.index_dtype),
        )
        for chunk in self.table.chunks(count):
            part = self(logits[chunk.start : chunk.start + chunk.size], bias)
            for dst, src in zip(owned, part, strict=True):
                if dst is not None:
                    b.copy(dst[chunk.start : chunk.start + chunk.size], src)
        return owned

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "buckets": len(self.table.buckets),
            "largest": self.table.largest,
            "capture_seconds": self.capture_seconds,
            "memory_bytes": self.memory_bytes,
        }
