"""Argument checks shared by every path, so each entry point rejects bad input with the same message."""

from __future__ import annotations

from collections.abc import Sequence

from op.configs import validate_routing

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
INDEX_DTYPES = ("int64", "int32")


def dtype_name(dtype: object) -> str:
    """Normalise a numpy, ml_dtypes, torch or paddle dtype to a plain name such as ``bfloat16``."""
    name = str(dtype)
    for prefix in ("torch.", "paddle."):
        name = name.removeprefix(prefix)
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def check_routing_inputs(
    logits_shape: Sequence[int],
    logits_dtype: object,
    bias_shape: Sequence[int],
    bias_dtype: object,
    n_group: int,
    topk_group: int,
    top_k: int,
    routed_scaling_factor: float,
    index_dtype: str = "int64",
    *,
    logits_name: str = "gating_output",
    bias_name: str = "e_score_correction_bias",
) -> tuple[int, int]:
    """Check shapes, dtypes and limits; return ``(num_tokens, num_experts)``. Messages name the caller's own
    arguments (``noaux_tc`` passes ``scores`` and ``scores_with_bias``)."""
    if len(logits_shape) != 2:
        raise ValueError(f"{logits_name} must be 2-D [num_tokens, num_experts], got shape {tuple(logits_shape)}")
    num_tokens, num_experts = (int(d) for d in logits_shape)
    logits_dtype_name = dtype_name(logits_dtype)
    if logits_dtype_name not in FLOAT_DTYPES:
        raise ValueError(f"{logits_name} dtype {logits_dtype_name} is not supported: allowed {', '.join(FLOAT_DTYPES)}")
    bias_dtype_name = dtype_name(bias_dtype)
    if bias_dtype_name not in FLOAT_DTYPES:
        raise ValueError(f"{bias_name} dtype {bias_dtype_name} is not supported: allowed {', '.join(FLOAT_DTYPES)}")
    if tuple(int(d) for d in bias_shape) not in ((num_experts,), (1, num_experts)):
        raise ValueError(
            f"{bias_name} shape [{', '.join(str(int(d)) for d in bias_shape)}] does not match "
            f"num_experts={num_experts}: "
            f"allowed [{num_experts}] or [1, {num_experts}]"
        )
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype={index_dtype!r} is not supported: allowed {', '.join(INDEX_DTYPES)}")
    validate_routing(num_experts, n_group, topk_group, top_k, routed_scaling_factor)
    return num_tokens, num_experts
