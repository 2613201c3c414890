"""The kernel front-end: validate, allocate outputs with the caller's framework, call the library.

Tensors of PyTorch, Paddle, CuPy or NumPy cross into the library by DLPack (through apache-tvm-ffi); CUDA
launches go on the caller framework's current stream, so they are captured by its CUDA graphs. CPU tensors
take the C++ CPU kernel (path ``cpu_kernel``).

Each entry point keeps one plan per call signature: the framework, device, shape and dtype of the logits, the
framework of the bias, whether ``out=`` and ``num_tokens`` are given, and the routing arguments with the types
that decide whether they are valid (so ``True`` never finds the plan of ``1``). Building a plan validates every
argument and raises on bad input (errors are never cached); a call that finds its plan allocates the outputs and
calls the library, and nothing more: the look-up is one tuple and one dictionary subscript. For torch tensors the
plan is one call of the torch extension (``op.torch_call``), which allocates in C++ and calls the library there.
A tensor attribute read for the key costs about 0.05-0.08 us (as much as a tenth of the library call), so what the
library checks at its boundary on every call anyway stays out of the key: the bias's shape, dtype, contiguity and
device, the logits' contiguity, and the outputs given through ``out=`` (all but the index dtype, which is compared
here). Inside ``torch.compile`` the entry points call instead the custom operators that ``op.torch_ops`` registers
with torch.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from op.build import library
from op.checks import check_routing_inputs, dtype_name
from op.frameworks import adapter_for, framework_of, is_contiguous, is_cuda

# Plans per signature. Bounded so that a caller cycling through shapes cannot grow it without limit.
MAX_PLANS = 4096
_plans: dict[tuple, Callable[..., tuple]] = {}
# Below this many experts of work (rows x E) a CPU call keeps the GIL: releasing and taking it back costs more
# than the kernel saves other threads, and the kernel runs on one thread there anyway.
GIL_RELEASE_MIN_EXPERTS = 1 << 16


def _compiling_before_torch() -> bool:
    """Whether torch.compile is tracing; rebinds ``_compiling`` to torch's own check once torch is imported, so a
    steady-state call pays one function call for it."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    global _compiling
    _compiling = torch.compiler.is_compiling
    return _compiling()


_compiling = _compiling_before_torch


def _hashable(key: tuple) -> tuple | None:
    """A key holding an unhashable shape (Paddle's lists) with shapes as tuples; None if still unhashable."""
    key = tuple(tuple(part) if isinstance(part, list) or type(part).__name__ == "Size" else part for part in key)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _find(key: tuple | None) -> tuple[tuple | None, Callable[..., tuple] | None]:
    """The slow look-up, for keys that failed the fast one: ``(hashable key or None, plan or None)``."""
    if key is None:
        return None, None
    key = _hashable(key)
    return key, None if key is None else _plans.get(key)


def _keep(key: tuple | None, plan: Callable[..., tuple]) -> Callable[..., tuple]:
    if key is not None:
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
    return plan


def _check_common(
    gating_output,
    bias,
    n_group,
    topk_group,
    top_k,
    scale,
    index_dtype,
    num_tokens,
    need_cuda,
    path,
    bias_shape=None,
    **names,
):
    """Everything a signature fixes; returns the adapter and ``(rows, experts)``."""
    framework = framework_of(gating_output, names.get("logits_name", "gating_output"))
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
        **names,
    )
    bias_name = names.get("bias_name", "e_score_correction_bias")
    logits_name = names.get("logits_name", "gating_output")
    if framework_of(bias, bias_name) != framework:
        raise ValueError(f"{bias_name} must be a tensor of the same framework as {logits_name}")
    if not is_contiguous(gating_output, framework):
        raise ValueError(f"{logits_name} must be contiguous")
    cuda = is_cuda(gating_output, framework)
    if need_cuda and not cuda:
        raise ValueError(f"{path} runs on CUDA tensors only; {logits_name} is on the CPU")
    if num_tokens is not None:
        if not cuda:
            raise ValueError("num_tokens is supported for CUDA tensors only")
        if framework_of(num_tokens, "num_tokens") != framework or dtype_name(num_tokens.dtype) != "int32":
            raise ValueError(f"num_tokens must be a {framework} int32 device scalar")
    return adapter_for(gating_output), rows, experts


def _routing_args(n_group, topk_group, top_k, renormalize, scale) -> tuple:
    return int(n_group), int(topk_group), int(top_k), bool(renormalize), float(scale)


def _take_out(out: Any) -> tuple:
    """``out`` as a tuple ``(scores or None, topk_values, topk_indices)``; the library checks the tensors."""
    if type(out) is not tuple:
        if not isinstance(out, list):
            raise ValueError("out must be a tuple of 3 tensors: scores, topk_values, topk_indices")
        out = tuple(out)
    if len(out) != 3:
        raise ValueError("out must be a tuple of 3 tensors: scores, topk_values, topk_indices")
    if out[1] is None or out[2] is None:
        raise ValueError(f"out: {'topk_values' if out[1] is None else 'topk_indices'} is None")
    return out


def _specs_topk(rows: int, top_k: int, index_dtype: str) -> list:
    return [((rows, top_k), "float32"), ((rows, top_k), index_dtype)]


def _out_checker(adapter, ids_dtype: Any, specs: list) -> Callable[[Any], tuple]:
    """Checks ``out`` against the plan. The library checks shapes, float dtypes and devices on every call, but it
    writes int32 or int64 ids alike: the index dtype is compared here, and a mismatch gets the full check."""
    names = ("scores", "topk_values", "topk_indices")

    def check_fully(out: tuple) -> None:
        for tensor, name, (shape, dtype) in zip(out, names, specs, strict=True):
            if tensor is None:
                continue
            if tuple(tensor.shape) != shape or dtype_name(tensor.dtype) != dtype:
                raise ValueError(
                    f"out: {name} has shape {tuple(tensor.shape)} and dtype {dtype_name(tensor.dtype)}, "
                    f"expected {shape} and {dtype}"
                )
            if framework_of(tensor, f"out: {name}") != adapter.framework or is_cuda(tensor, adapter.framework) != (
                adapter.cuda
            ):
                raise ValueError(f"out: {name} must be a {adapter.framework} tensor on the device of gating_output")

    def check(out: Any) -> tuple:
        # A tuple of three with its values and ids given and ids of the plan's dtype passes in one test.
        if type(out) is not tuple or len(out) != 3 or out[1] is None or out[2] is None:
            out = _take_out(out)
        if out[2].dtype != ids_dtype:
            check_fully(out)
        return out

    return check


def _to_host(tensor: Any) -> Any:
    """What a numpy input goes through before the library sees it (per call: the bias's dtype is not in the key)."""
    # numpy's DLPack export knows no bfloat16; the widening to float32 is exact.
    if tensor.dtype.name == "bfloat16":
        return np.asarray(tensor, dtype=np.float32)
    # The kernels only read their inputs, but numpy will not export a read-only array (a buffer received from the
    # network, say) through the DLPack version the library speaks: hand over a writable copy.
    return tensor if tensor.flags.writeable else tensor.copy()


def _check_num_threads(num_threads: Any, cuda: bool) -> None:
    if cuda:
        raise ValueError("num_threads is supported for CPU tensors only")
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or not 1 <= num_threads <= 1024:
        raise ValueError(
            f"num_threads={num_threads!r} is invalid: allowed an int 1 <= num_threads <= 1024, or None for "
            "$FUSEDGATE_CPU_THREADS or else the CPUs this process may run on"
        )


# The inputs of a plan's call, with whether each may be None: ``out`` is None in every plan that allocates.
_ROUTING_INPUTS = (("gating_output", False), ("e_score_correction_bias", False), ("num_tokens", True), ("out", True))


def _torch_call(adapter, x, entry, outputs, arguments, returns, release_gil=False, inputs=_ROUTING_INPUTS):
    """For torch tensors, the plan's call as one call of the torch extension (``op.torch_call``): allocation, the
    library call and the outputs in one crossing. None for other frameworks, or where the extension is off."""
    if adapter.framework != "torch":
        return None
    from op import torch_call

    return torch_call.plan(entry, x.device, inputs, outputs, arguments, returns, release_gil)


def _routing_scalars(n_group, topk_group, top_k, renormalize, scale) -> list:
    return [("int", n_group), ("int", topk_group), ("int", top_k), ("bool", renormalize), ("float", scale)]


def _cpu_entry(rows: int, experts: int):
    """The CPU entry point, keeping the GIL for small batches (a separate function object: the flag is its own)."""
    entry = library().get_function("cpu_grouped_topk")
    entry.release_gil = rows * experts >= GIL_RELEASE_MIN_EXPERTS
    return entry


def _fused_plan(
    entry, need_cuda, x, bias, n_group, topk_group, top_k, renormalize, scale, index_dtype, scores, nt, num_threads,
    given_out,
):  # fmt: skip
    """The call of one signature. A plan is built for calls with ``out=`` or without it, never both, so each
    closure below holds only the steps its calls take."""
    adapter, rows, experts = _check_common(
        x, bias, n_group, topk_group, top_k, scale, index_dtype, nt, need_cuda, entry
    )
    if num_threads is not None:
        _check_num_threads(num_threads, adapter.cuda)
    n_group, topk_group, top_k, renormalize, scale = _routing_args(n_group, topk_group, top_k, renormalize, scale)
    dense = ((rows, experts), "float32")
    topk = _specs_topk(rows, top_k, index_dtype)
    if given_out:
        allocate, check_out = None, _out_checker(adapter, adapter.allocator(topk)()[-1].dtype, [dense, *topk])
    else:
        allocate, check_out = adapter.allocator([dense if scores else None, *topk]), None

    if rows == 0:
        if check_out is None:
            return lambda x, bias, num_tokens, out: allocate()

        def given_empty(x, bias, num_tokens, out):
            s, v, i = check_out(out)
            return (s if scores else None), v, i

        return given_empty

    # The C++ kernel's thread count: 0 leaves it to $FUSEDGATE_CPU_THREADS or the process's CPU affinity.
    threads = 0 if num_threads is None else int(num_threads)
    if check_out is None:
        # Scores, when wanted, are output 0; values and ids follow.
        wanted = [dense, *topk] if scores else topk
        first = 1 if scores else 0
        scores_arg = ("output", 0) if scores else ("none", None)
        values_ids = [("output", first), ("output", first + 1)]
        head = [("input", 0), ("input", 1), scores_arg, *values_ids]
        tail = _routing_scalars(n_group, topk_group, top_k, renormalize, scale)
        direct = _torch_call(
            adapter, x, entry if adapter.cuda else "cpu_grouped_topk", wanted,
            [*head, ("input", 2), *tail] if adapter.cuda else [*head, *tail, ("int", threads)],
            [scores_arg, *values_ids],
            release_gil=not adapter.cuda and rows * experts >= GIL_RELEASE_MIN_EXPERTS,
        )  # fmt: skip
        if direct is not None:
            return direct

    if adapter.cuda:
        launch = adapter.on_stream(getattr(library(), entry))
        if check_out is None:

            def run(x, bias, num_tokens, out):
                s, v, i = allocate()
                launch(x, bias, s, v, i, num_tokens, n_group, topk_group, top_k, renormalize, scale)
                return s, v, i

            return run

        def run_into(x, bias, num_tokens, out):
            s, v, i = check_out(out)
            if not scores:
                s = None
            launch(x, bias, s, v, i, num_tokens, n_group, topk_group, top_k, renormalize, scale)
            return s, v, i

        return run_into

    launch = _cpu_entry(rows, experts)
    if adapter.framework == "numpy":

        def run_numpy(x, bias, num_tokens, out):
            if check_out is None:
                s, v, i = allocate()
            else:
                s, v, i = check_out(out)
                if not scores:
                    s = None
            launch(_to_host(x), _to_host(bias), s, v, i, n_group, topk_group, top_k, renormalize, scale, threads)
            return s, v, i

        return run_numpy

    if check_out is None:

        def run_cpu(x, bias, num_tokens, out):
            s, v, i = allocate()
            launch(x, bias, s, v, i, n_group, topk_group, top_k, renormalize, scale, threads)
            return s, v, i

        return run_cpu

    def run_cpu_into(x, bias, num_tokens, out):
        s, v, i = check_out(out)
        if not scores:
            s = None
        launch(x, bias, s, v, i, n_group, topk_group, top_k, renormalize, scale, threads)
        return s, v, i

    return run_cpu_into


def _single_launch(entry: str, need_cuda: bool, name: str):
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
        if _compiling():
            from op.torch_ops import compiled_call

            if num_threads is not None:
                raise ValueError("num_threads cannot be given inside torch.compile: set $FUSEDGATE_CPU_THREADS")

            return compiled_call(
                name, gating_output, e_score_correction_bias, n_group, topk_group, top_k, renormalize,
                routed_scaling_factor, index_dtype, return_scores, num_tokens, out,
            )  # fmt: skip
        # renormalize and return_scores are taken by truth value, so their types need no place in the key; a bool
        # or a float in place of an int (or a bool for the scale) is refused, so those types do.
        key = None
        try:
            key = (
                entry, type(gating_output), gating_output.shape, gating_output.dtype, gating_output.device,
                type(e_score_correction_bias),
                n_group, topk_group, top_k, renormalize, routed_scaling_factor, index_dtype, return_scores,
                num_tokens is None, out is None, num_threads,
                type(n_group), type(topk_group), type(top_k), type(routed_scaling_factor), type(num_threads),
            )  # fmt: skip
            plan = _plans[key]
        except KeyError:
            plan = None
        except (AttributeError, TypeError):
            # Not a tensor (building the plan names the argument), or an unhashable shape.
            key, plan = _find(key)
        if plan is None:
            plan = _keep(
                key,
                _fused_plan(
                    entry, need_cuda, gating_output, e_score_correction_bias, n_group, topk_group, top_k, renormalize,
                    routed_scaling_factor, index_dtype, bool(return_scores), num_tokens, num_threads, out is not None,
                ),
            )  # fmt: skip
        return plan(gating_output, e_score_correction_bias, num_tokens, out)

    run.__name__ = run.__qualname__ = name
    return run


grouped_topk = _single_launch("fused_grouped_topk", False, "grouped_topk")
grouped_topk.__doc__ = """Path ``fused`` on CUDA tensors (exactly one kernel launch), ``cpu_kernel`` on CPU tensors.

Returns ``(scores [T, E] float32 or None, topk_values [T, K] float32, topk_indices [T, K] int64|int32)``.
``num_tokens`` (CUDA only): an int32 device scalar; rows at or past it are left untouched.
``out``: preallocated ``(scores, topk_values, topk_indices)``, checked for shape, dtype and device.
``num_threads`` (CPU only): threads for the C++ kernel; default ``$FUSEDGATE_CPU_THREADS``, else the CPUs this
process may run on. Small batches run on one thread whatever the count.
"""

fused_block_grouped_topk = _single_launch("fused_block_grouped_topk", True, "fused_block_grouped_topk")
fused_block_grouped_topk.__doc__ = "Path ``fused_block``: the published one-block-per-token design (CUDA only)."


def _cast_plan(x, bias, num_tokens):
    adapter, rows, experts = _check_common(x, bias, 1, 1, 1, 1.0, "int64", num_tokens, True, "cast_sigmoid_bias")
    dense = ((rows, experts), "float32")
    allocate = adapter.allocator([dense, dense])
    if rows == 0:
        return lambda x, bias, num_tokens: allocate()
    direct = _torch_call(
        adapter, x, "cast_sigmoid_bias", [dense, dense],
        [("input", 0), ("input", 1), ("output", 0), ("output", 1), ("input", 2)], [("output", 0), ("output", 1)],
        inputs=_ROUTING_INPUTS[:3],
    )  # fmt: skip
    if direct is not None:
        return direct
    launch = adapter.on_stream(library().cast_sigmoid_bias)

    def run(x, bias, num_tokens):
        scores, biased = allocate()
        launch(x, bias, scores, biased, num_tokens)
        return scores, biased

    return run


def cast_sigmoid_bias(gating_output: Any, e_score_correction_bias: Any, *, num_tokens: Any = None) -> tuple:
    """Kernel 1 of the two-kernel path: ``(scores, scores_with_bias)``, both float32 ``[T, E]``."""
    if _compiling():
        from op.torch_ops import compiled_cast_sigmoid_bias

        return compiled_cast_sigmoid_bias(gating_output, e_score_correction_bias, num_tokens)
    key = None
    try:
        key = (
            "cast_sigmoid_bias", type(gating_output), gating_output.shape, gating_output.dtype, gating_output.device,
            type(e_score_correction_bias),
            num_tokens is None,
        )  # fmt: skip
        plan = _plans[key]
    except KeyError:
        plan = None
    except (AttributeError, TypeError):
        key, plan = _find(key)
    if plan is None:
        plan = _keep(key, _cast_plan(gating_output, e_score_correction_bias, num_tokens))
    return plan(gating_output, e_score_correction_bias, num_tokens)


def _noaux_plan(scores, biased, n_group, topk_group, top_k, renormalize, scale, index_dtype, num_tokens):
    if tuple(biased.shape) != tuple(scores.shape):
        raise ValueError(f"scores_with_bias shape {tuple(biased.shape)} must equal scores shape {tuple(scores.shape)}")
    for name, tensor in (("scores", scores), ("scores_with_bias", biased)):
        if dtype_name(tensor.dtype) != "float32":
            raise ValueError(f"{name} must be float32, got {dtype_name(tensor.dtype)}")
    adapter, rows, _ = _check_common(
        scores, biased, n_group, topk_group, top_k, scale, index_dtype, num_tokens, True, "noaux_tc",
        bias_shape=tuple(scores.shape[-1:]), logits_name="scores", bias_name="scores_with_bias",
    )  # fmt: skip
    allocate = adapter.allocator(_specs_topk(rows, top_k, index_dtype))
    n_group, topk_group, top_k, renormalize, scale = _routing_args(n_group, topk_group, top_k, renormalize, scale)
    if rows == 0:
        return lambda scores, biased, num_tokens: (scores, *allocate())
    direct = _torch_call(
        adapter, scores, "noaux_tc", _specs_topk(rows, top_k, index_dtype),
        [("input", 0), ("input", 1), ("output", 0), ("output", 1), ("input", 2),
         *_routing_scalars(n_group, topk_group, top_k, renormalize, scale)],
        [("input", 0), ("output", 0), ("output", 1)],
        inputs=(("scores", False), ("scores_with_bias", False), ("num_tokens", True)),
    )  # fmt: skip
    if direct is not None:
        return direct
    launch = adapter.on_stream(library().noaux_tc)

    def run(scores, biased, num_tokens):
        values, ids = allocate()
        launch(scores, biased, values, ids, num_tokens, n_group, topk_group, top_k, renormalize, scale)
        return scores, values, ids

    return run


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
    if _compiling():
        from op.torch_ops import compiled_noaux_tc

        return compiled_noaux_tc(
            scores, scores_with_bias, n_group, topk_group, top_k, renormalize, routed_scaling_factor, index_dtype,
            num_tokens,
        )  # fmt: skip
    key = None
    try:
        key = (
            "noaux_tc", type(scores), scores.shape, scores.dtype, scores.device,
            type(scores_with_bias), scores_with_bias.shape, scores_with_bias.dtype,
            n_group, topk_group, top_k, renormalize, routed_scaling_factor, index_dtype, num_tokens is None,
            type(n_group), type(topk_group), type(top_k), type(routed_scaling_factor),
        )  # fmt: skip
        plan = _plans[key]
    except KeyError:
        plan = None
    except (AttributeError, TypeError):
        key, plan = _find(key)
    if plan is None:
        plan = _keep(
            key,
            _noaux_plan(
                scores, scores_with_bias, n_group, topk_group, top_k, renormalize, routed_scaling_factor, index_dtype,
                num_tokens,
            ),
        )  # fmt: skip
    return plan(scores, scores_with_bias, num_tokens)


def _two_kernel_plan(
    x, bias, n_group, topk_group, top_k, renormalize, scale, index_dtype, return_scores, num_tokens, given_out
):  # fmt: skip
    """The call of one signature: one library call launches both kernels, after the library has checked every
    argument of both (a refused call queues neither). As in ``_fused_plan``, a plan is built for calls with ``out=``
    or for calls without it, never both."""
    adapter, rows, experts = _check_common(
        x, bias, n_group, topk_group, top_k, scale, index_dtype, num_tokens, True, "two_kernel"
    )
    n_group, topk_group, top_k, renormalize, scale = _routing_args(n_group, topk_group, top_k, renormalize, scale)
    dense = ((rows, experts), "float32")
    topk = _specs_topk(rows, top_k, index_dtype)
    # The biased scores are scratch the caller never sees, allocated with the outputs; kernel 2 reads the scores
    # kernel 1 wrote, so they are made even where the caller does not want them.
    allocate_all = adapter.allocator([dense, dense, *topk])
    take = _two_kernel_given(adapter, allocate_all()[-1].dtype, dense, topk) if given_out else None
    if rows == 0:

        def run_empty(x, bias, num_tokens, out):
            scores, _, values, ids = allocate_all() if out is None else take(out)
            return (scores if return_scores else None), values, ids

        return run_empty

    if take is None:
        direct = _torch_call(
            adapter, x, "two_kernel_grouped_topk", [dense, dense, *topk],
            [("input", 0), ("input", 1), *(("output", n) for n in range(4)), ("input", 2),
             *_routing_scalars(n_group, topk_group, top_k, renormalize, scale)],
            [("output", 0) if return_scores else ("none", None), ("output", 2), ("output", 3)],
        )  # fmt: skip
        if direct is not None:
            return direct
    launch = adapter.on_stream(library().two_kernel_grouped_topk)
    if take is None:

        def run(x, bias, num_tokens, out):
            scores, biased, values, ids = allocate_all()
            launch(x, bias, scores, biased, values, ids, num_tokens, n_group, topk_group, top_k, renormalize, scale)
            return (scores if return_scores else None), values, ids

        return run

    def run_into(x, bias, num_tokens, out):
        scores, biased, values, ids = take(out)
        launch(x, bias, scores, biased, values, ids, num_tokens, n_group, topk_group, top_k, renormalize, scale)
        return (scores if return_scores else None), values, ids

    return run_into


def _two_kernel_given(adapter, ids_dtype, dense, topk) -> Callable[[Any], tuple]:
    """``out`` checked and completed with what the caller left out: ``(scores, biased, values, ids)``. Scores the
    caller does not give are made fresh, and kernel 1 writes them all the same."""
    check_out = _out_checker(adapter, ids_dtype, [dense, *topk])
    allocate_pair = adapter.allocator([dense, dense])
    allocate_biased = adapter.allocator([dense])

    def take(out):
        scores, values, ids = check_out(out)
        if scores is None:
            scores, biased = allocate_pair()
        else:
            (biased,) = allocate_biased()
        return scores, biased, values, ids

    return take


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
    """Path ``two_kernel``: ``cast_sigmoid_bias`` then ``noaux_tc``, as production engines run it, both launched by
    one call into the library."""
    if _compiling():
        from op.torch_ops import compiled_call

        return compiled_call(
            "two_kernel_grouped_topk", gating_output, e_score_correction_bias, n_group, topk_group, top_k,
            renormalize, routed_scaling_factor, index_dtype, return_scores, num_tokens, out,
        )  # fmt: skip
    key = None
    try:
        key = (
            "two_kernel", type(gating_output), gating_output.shape, gating_output.dtype, gating_output.device,
            type(e_score_correction_bias),
            n_group, topk_group, top_k, renormalize, routed_scaling_factor, index_dtype, return_scores,
            num_tokens is None, out is None,
            type(n_group), type(topk_group), type(top_k), type(routed_scaling_factor),
        )  # fmt: skip
        plan = _plans[key]
    except KeyError:
        plan = None
    except (AttributeError, TypeError):
        key, plan = _find(key)
    if plan is None:
        plan = _keep(
            key,
            _two_kernel_plan(
                gating_output, e_score_correction_bias, n_group, topk_group, top_k, renormalize,
                routed_scaling_factor, index_dtype, bool(return_scores), num_tokens, out is not None,
            ),
        )  # fmt: skip
    return plan(gating_output, e_score_correction_bias, num_tokens, out)
