"""Routing written with framework ops only, as an engineer would without a custom kernel.

``composite_torch`` and ``composite_paddle`` share one algorithm over a small table of framework ops. They run
on the input's device, never synchronise with the host and have no data-dependent shapes, so
``composite_torch`` can be captured in a CUDA graph. Neither framework's ``topk`` promises the lower-index
tie order, so selection uses a stable descending sort, which does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from op.checks import check_routing_inputs

RENORM_EPSILON = 1e-20


@dataclass(frozen=True)
class _Ops:
    float32: Callable[[Any], Any]
    argsort_desc: Callable[[Any], Any]
    sort_desc: Callable[[Any], Any]
    take: Callable[[Any, Any], Any]
    scatter_into_zeros: Callable[[Any, Any, Any], Any]
    arange_like: Callable[[int, Any], Any]
    cast_index: Callable[[Any, str], Any]
    where: Callable[[Any, Any, Any], Any]
    full_like: Callable[[Any, float], Any]
    empty_outputs: Callable[[Any, int, int, str, bool], tuple]


def _torch_ops() -> _Ops:
    import torch

    def scatter_into_zeros(like: Any, index: Any, values: Any) -> Any:
        return torch.zeros_like(like).scatter_(1, index, values)

    def empty_outputs(x: Any, num_experts: int, top_k: int, index_dtype: str, with_scores: bool) -> tuple:
        scores = torch.empty((0, num_experts), dtype=torch.float32, device=x.device) if with_scores else None
        values = torch.empty((0, top_k), dtype=torch.float32, device=x.device)
        return scores, values, torch.empty((0, top_k), dtype=getattr(torch, index_dtype), device=x.device)

    return _Ops(
        float32=lambda t: t.to(torch.float32),
        argsort_desc=lambda t: torch.argsort(t, dim=-1, descending=True, stable=True),
        sort_desc=lambda t: torch.sort(t, dim=-1, descending=True).values,
        take=lambda t, i: torch.take_along_dim(t, i, dim=-1),
        scatter_into_zeros=scatter_into_zeros,
        arange_like=lambda n, t: torch.arange(n, device=t.device),
        cast_index=lambda t, name: t.to(getattr(torch, name)),
        where=torch.where,
        full_like=torch.full_like,
        empty_outputs=empty_outputs,
    )


def _paddle_ops() -> _Ops:
    import paddle

    def scatter_into_zeros(like: Any, index: Any, values: Any) -> Any:
        return paddle.put_along_axis(paddle.zeros_like(like), index, values, axis=1)

    def empty_outputs(x: Any, num_experts: int, top_k: int, index_dtype: str, with_scores: bool) -> tuple:
        scores = paddle.empty([0, num_experts], dtype="float32") if with_scores else None
        return scores, paddle.empty([0, top_k], dtype="float32"), paddle.empty([0, top_k], dtype=index_dtype)

    return _Ops(
        float32=lambda t: t.astype("float32"),
        argsort_desc=lambda t: paddle.argsort(t, axis=-1, descending=True, stable=True),
        sort_desc=lambda t: paddle.sort(t, axis=-1, descending=True),
        take=lambda t, i: paddle.take_along_axis(t, i, axis=-1),
        scatter_into_zeros=scatter_into_zeros,
        arange_like=lambda n, t: paddle.arange(n, dtype="int64"),
        cast_index=lambda t, name: t.astype(name),
        where=paddle.where,
        full_like=paddle.full_like,
        empty_outputs=empty_outputs,
    )


def _route(
    ops: _Ops,
    gating_output: Any,
    e_score_correction_bias: Any,
    n_group: int,
    topk_group: int,
    top_k: int,
    renormalize: bool,
    routed_scaling_factor: float,
    index_dtype: str,
    return_scores: bool,
) -> tuple:
    num_tokens, num_experts = check_routing_inputs(
        gating_output.shape,
        gating_output.dtype,
        e_score_correction_bias.shape,
        e_score_correction_bias.dtype,
        n_group,
        topk_group,
        top_k,
        routed_scaling_factor,
        index_dtype,
    )
    if num_tokens == 0:
        return ops.empty_outputs(gating_output, num_experts, top_k, index_dtype, return_scores)
    x = ops.float32(gating_output)
    s = 1.0 / (1.0 + (-x).exp())
    b = s + ops.float32(e_score_correction_bias).reshape([1, num_experts])
    valid = b.isfinite()
    minus_inf = ops.full_like(b, -float("inf"))
    key = ops.where(valid, b, minus_inf)

    dead_group = None
    if topk_group < n_group:
        epg = num_experts // n_group
        grouped = key.reshape([num_tokens, n_group, epg])
        needed = min(2, epg)
        top = ops.sort_desc(grouped)
        total = top[..., 0] + top[..., 1] if needed == 2 else top[..., 0]
        count = ops.float32(valid.reshape([num_tokens, n_group, epg])).sum(-1)
        group_score = ops.where(count >= needed, total, ops.full_like(total, -float("inf")))
        order = ops.argsort_desc(group_score)[:, :topk_group]
        kept_score = ops.take(group_score, order)
        dead_group = (kept_score == -float("inf")).any(-1)
        kept = ops.scatter_into_zeros(group_score, order, ops.full_like(kept_score, 1.0)) > 0.5
        kept_experts = kept.unsqueeze(-1).expand([num_tokens, n_group, epg]).reshape([num_tokens, num_experts])
        key = ops.where(kept_experts, key, minus_inf)

    ids = ops.argsort_desc(key)[:, :top_k]
    fallback = (ops.take(key, ids) == -float("inf")).any(-1)
    if dead_group is not None:
        fallback = fallback | dead_group
    weights = ops.take(s, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + RENORM_EPSILON)
    weights = weights * float(routed_scaling_factor)

    fallback_rows = fallback.unsqueeze(-1)
    first_ids = ops.arange_like(top_k, ids).reshape([1, top_k]).expand(ids.shape)
    ids = ops.where(fallback_rows, first_ids, ids)
    weights = ops.where(fallback_rows, ops.full_like(weights, 1.0 / top_k), weights)
    scores = ops.scatter_into_zeros(x, ids, weights) if return_scores else None
    return scores, weights, ops.cast_index(ids, index_dtype)


def composite_torch(
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
) -> tuple:
    """Routing with PyTorch ops on the input's device; graph-capturable. Returns ``(scores, values, ids)``."""
    return _route(
        _torch_ops(),
        gating_output,
        e_score_correction_bias,
        n_group,
        topk_group,
        top_k,
        renormalize,
        routed_scaling_factor,
        index_dtype,
        return_scores,
    )


def composite_paddle(
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
) -> tuple:
    """Routing with Paddle ops on the input's place. Returns ``(scores, values, ids)``."""
    return _route(
        _paddle_ops(),
        gating_output,
        e_score_correction_bias,
        n_group,
        topk_group,
        top_k,
        renormalize,
        routed_scaling_factor,
        index_dtype,
        return_scores,
    )
