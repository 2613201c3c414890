"""The kernel front-end: validate, allocate outputs with the caller's framework, call the library.

Tensors of PyTorch, Paddle, CuPy or NumPy cross into the library by DLPack (through apache-tvm-ffi); CUDA
launches go on the caller framework's current stream, so they are captured by its CUDA graphs. CPU tensors
take the C++ CPU kernel (path ``cpu_kernel``).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import numpy as np

from op.build import library
from op.checks import check_routing_inputs, dtype_name

# Validation depends only on shapes, dtypes and the routing arguments: repeated calls of one signature (the
# common case in serving) skip it after the first. Errors are raised, never cached.
_check_cached = functools.lru_cache(maxsize=1024)(check_routing_inputs)


@functools.cache
def _entry(name: str) -> Any:
    return getattr(library(), name)


def _framework(tensor: Any) -> str:
    module = type(tensor).__module__.split(".")[0]
    if module in ("torch", "paddle", "numpy", "cupy"):
        return module
    raise ValueError(
        f"gating_output of type {type(tensor).__name__} is not supported: pass a torch, paddle, cupy or numpy tensor"
    )


def _is_cuda(tensor: Any, framework: str) -> bool:
    if framework == "torch":
        return tensor.is_cuda
    if framework == "paddle":
        return tensor.place.is_gpu_place()
    return framework == "cupy"


def _is_contiguous(tensor: Any, framework: str) -> bool:
    if framework == "numpy":
        return tensor.flags.c_contiguous
    if framework == "cupy":
        return tensor.flags.c_contiguous
    return tensor.is_contiguous()


def _empty(like: Any, framework: str, shape: tuple[int, ...], dtype: str) -> Any:
    if framework == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    if framework == "paddle":
        import paddle

        out = paddle.empty(list(shape), dtype=dtype)
        return out if str(out.place) == str(like.place) else out._copy_to(like.place, True)
    if framework == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.empty(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


def _host_friendly(tensor: Any, framework: str) -> Any:
    # numpy's DLPack export knows no bfloat16; the widening to float32 is exact.
    if framework == "numpy" and dtype_name(tensor.dtype) == "bfloat16":
        return np.asarray(tensor, dtype=np.float32)
    # The kernels only read their inputs, but numpy will not export a read-only array (a buffer received from
    # the network, say) through the DLPack version the library speaks: hand over a writable copy.
    if framework == "numpy" and not tensor.flags.writeable:
        return tensor.copy()
    return tensor


def _check_out(out: Any, like: Any, framework: str, shapes: list[tuple[str, tuple[int, ...], str]]) -> None:
    if not isinstance(out, tuple | list) or len(out) != len(shapes):
        raise ValueError(f"out must be a tuple of {len(shapes)} tensors: {', '.join(n for n, _, _ in shapes)}")
    for tensor, (name, shape, dtype) in zip(out, shapes, strict=True):
        if tensor is None:
            if name == "scores":
                continue
            raise ValueError(f"out: {name} is None")
        if tuple(tensor.shape) != shape or dtype_name(tensor.dtype) != dtype:
            raise ValueError(
                f"out: {name} has shape {tuple(tensor.shape)} and dtype {dtype_name(tensor.dtype)}, "
                f"expected {shape} and {dtype}"
            )
        if _framework(tensor) != framework or _is_cuda(tensor, framework) != _is_cuda(like, framework):
            raise ValueError(f"out: {name} must be a {framework} tensor on the device of gating_output")


def _prepare(
    gating_output, bias, n_group, topk_group, top_k, scale, index_dtype, num_tokens, need_cuda, path, bias_shape=None
):
    framework = _framework(gating_output)
    rows, experts = check_routing_inputs(
        gating_output.shape,
        gating_output.dtype,
        bias.shape if bias_shape is None else bias_shape,
        bias.dtype,
        n_group,
        topk_group,
        top_k,
        scale,
        index_dtype,
    )
    if _framework(bias) != framework:
        raise ValueError("e_score_correction_bias must be a tensor of the same framework as gating_output")
    if not _is_contiguous(gating_output, framework):
        raise ValueError("gating_output must be contiguous")
    cuda = _is_cuda(gating_output, framework)
    if need_cuda and not cuda:
        raise ValueError(f"{path} runs on CUDA tensors only; gating_output is on the CPU")
    if num_tokens is not None:
        if not cuda:
            raise ValueError("num_tokens is supported for CUDA tensors only")
        if _framework(num_tokens) != framework or dtype_name(num_tokens.dtype) != "int32":
            raise ValueError(f"num_tokens must be a {framework} int32 device scalar")
    return framework, rows, experts, cuda


def _outputs(gating_output, framework, rows, experts, top_k, index_dtype, with_scores, out):
    shapes = [
        ("scores", (rows, experts), "float32"),
        ("topk_values", (rows, top_k), "float32"),
        ("topk_indices", (rows, top_k), index_dtype),
    ]
    if out is not None:
        _check_out(out, gating_output, framework, shapes)
        scores, values, ids = out
        return (scores if with_scores else None), values, ids
    scores = _empty(gating_output, framework, shapes[0][1], "float32") if with_scores else None
    return (
        scores,
        _empty(gating_output, framework, shapes[1][1], "float32"),
        _empty(gating_output, framework, shapes[2][1], index_dtype),
    )


def _check_num_threads(num_threads: Any, cuda: bool) -> None:
    if cuda:
        raise ValueError("num_threads is supported for CPU tensors only")
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or not 1 <= num_threads <= 1024:
        raise ValueError(
            f"num_threads={num_threads!r} is invalid: allowed an int 1 <= num_threads <= 1024, or None for "
            "$FUSEDGATE_CPU_THREADS or else the CPUs this process may run on"
        )


def _single_launch(entry: str, need_cuda: bool):
    def run(
        gating_output: Any,
        e_score_correction_bias: Any,
        n_group: int,
        topk_group: int,
        top_k: int,
        renormalize: bool,
        routed_scaling_factor: float,
        *,
        index_dtype: str = "int64",
        return_scores: bool = True,
        num_tokens: Any = None,
        out: tuple | None = None,
        num_threads: int | None = None,
    ) -> tuple:
        framework, rows, experts, cuda = _prepare(
            gating_output,
            e_score_correction_bias,
            n_group,
            topk_group,
            top_k,
            routed_scaling_factor,
            index_dtype,
            num_tokens,
            need_cuda,
            entry,
        )
        if num_threads is not None:
            _check_num_threads(num_threads, cuda)
        scores, values, ids = _outputs(gating_output, framework, rows, experts, top_k, index_dtype, return_scores, out)
        if rows == 0:
            return scores, values, ids
        args = (n_group, topk_group, top_k, bool(renormalize), float(routed_scaling_factor))
        if cuda:
            _entry(entry)(gating_output, e_score_correction_bias, scores, values, ids, num_tokens, *args)
        else:
            _entry("cpu_grouped_topk")(
                _host_friendly(gating_output, framework),
                _host_friendly(e_score_correction_bias, framework),
                scores,
                values,
                ids,
                *args,
                0 if num_threads is None else int(num_threads),
            )
        return scores, values, ids

    return run


grouped_topk = _single_launch("fused_grouped_topk", need_cuda=False)
grouped_topk.__name__ = grouped_topk.__qualname__ = "grouped_topk"
grouped_topk.__doc__ = """Path ``fused`` on CUDA tensors (exactly one kernel launch), ``cpu_kernel`` on CPU tensors.

Returns ``(scores [T, E] float32 or None, topk_values [T, K] float32, topk_indices [T, K] int64|int32)``.
``num_tokens`` (CUDA only): an int32 device scalar; rows at or past it are left untouched.
``out``: preallocated ``(scores, topk_values, topk_indices)``, checked for shape, dtype and device.
``num_threads`` (CPU only): threads for the C++ kernel; default ``$FUSEDGATE_CPU_THREADS``, else the CPUs this
process may run on. Small batches run on one thread whatever the count.
"""

fused_block_grouped_topk = _single_launch("fused_block_grouped_topk", need_cuda=True)
fused_block_grouped_topk.__name__ = fused_block_grouped_topk.__qualname__ = "fused_block_grouped_topk"
fused_block_grouped_topk.__doc__ = "Path ``fused_block``: the published one-block-per-token design (CUDA only)."


def cast_sigmoid_bias(gating_output: Any, e_score_correction_bias: Any, *, num_tokens: Any = None) -> tuple:
    """Kernel 1 of the two-kernel path: ``(scores, scores_with_bias)``, both float32 ``[T, E]``."""
    framework, rows, experts, _ = _prepare(
        gating_output, e_score_correction_bias, 1, 1, 1, 1.0, "int64", num_tokens, True, "cast_sigmoid_bias"
    )
    scores = _empty(gating_output, framework, (rows, experts), "float32")
    biased = _empty(gating_output, framework, (rows, experts), "float32")
    if rows:
        _entry("cast_sigmoid_bias")(gating_output, e_score_correction_bias, scores, biased, num_tokens)
    return scores, biased


def noaux_tc(
    scores: Any,
    scores_with_bias: Any,
    n_group: int,
    topk_group: int,
    top_k: int,
    renormalize: bool,
    routed_scaling_factor: float,
    *,
    index_dtype: str = "int64",
    num_tokens: Any = None,
) -> tuple:
    """Kernel 2 of the two-kernel path: routes from float32 ``scores``/``scores_with_bias`` and rewrites
    ``scores`` in place as the sparse weights. Returns ``(scores, topk_values, topk_indices)``."""
    if tuple(scores_with_bias.shape) != tuple(scores.shape):
        raise ValueError(
            f"scores_with_bias shape {tuple(scores_with_bias.shape)} must equal scores shape {tuple(scores.shape)}"
        )
    framework, rows, experts, _ = _prepare(
        scores,
        scores_with_bias,
        n_group,
        topk_group,
        top_k,
        routed_scaling_factor,
        index_dtype,
        num_tokens,
        True,
        "noaux_tc",
        bias_shape=tuple(scores.shape[-1:]),
    )
    for name, tensor in (("scores", scores), ("scores_with_bias", scores_with_bias)):
        if dtype_name(tensor.dtype) != "float32":
            raise ValueError(f"{name} must be float32, got {dtype_name(tensor.dtype)}")
    values = _empty(scores, framework, (rows, top_k), "float32")
    ids = _empty(scores, framework, (rows, top_k), index_dtype)
    if rows:
        _entry("noaux_tc")(
            scores,
            scores_with_bias,
            values,
            ids,
            num_tokens,
            n_group,
            topk_group,
            top_k,
            bool(renormalize),
            float(routed_scaling_factor),
        )
    return scores, values, ids


def two_kernel_grouped_topk(
    gating_output: Any,
    e_score_correction_bias: Any,
    n_group: int,
    topk_group: int,
    top_k: int,
    renormalize: bool,
    routed_scaling_factor: float,
    *,
    index_dtype: str = "int64",
    return_scores: bool = True,
    num_tokens: Any = None,
    out: tuple | None = None,
) -> tuple:
    """Path ``two_kernel``: ``cast_sigmoid_bias`` then ``noaux_tc``, as production engines run it."""
    framework, rows, experts, _ = _prepare(
        gating_output,
        e_score_correction_bias,
        n_group,
        topk_group,
        top_k,
        routed_scaling_factor,
        index_dtype,
        num_tokens,
        True,
        "two_kernel",
    )
    scores, values, ids = _outputs(gating_output, framework, rows, experts, top_k, index_dtype, True, out)
    if out is not None and out[0] is None:
        scores = _empty(gating_output, framework, (rows, experts), "float32")
    biased = _empty(gating_output, framework, (rows, experts), "float32")
    if rows:
        _entry("cast_sigmoid_bias")(gating_output, e_score_correction_bias, scores, biased, num_tokens)
        _entry("noaux_tc")(
            scores,
            biased,
            values,
            ids,
            num_tokens,
            n_group,
            topk_group,
            top_k,
            bool(renormalize),
            float(routed_scaling_factor),
        )
    return (scores if return_scores else None), values, ids
