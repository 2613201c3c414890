"""The routing entry points as ``torch.library`` custom ops, so ``torch.compile`` traces them without a graph break.

``op.api`` calls into this module only while torch.compile traces a call (importing ``op`` loads no torch);
eager calls keep the front-end's own fast path. Each op's real implementation is that eager front-end, and its
fake implementation gives the output shapes and dtypes (and raises the front-end's errors at trace time).
A custom op cannot return None, so "no scores" travels as an empty ``[0, 0]`` tensor and becomes None again here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from op import api
from op.checks import check_routing_inputs

_DTYPES = {"int64": torch.int64, "int32": torch.int32}


def _outputs_like(x: Tensor, top_k: int, index_dtype: str, return_scores: bool) -> tuple[Tensor, Tensor, Tensor]:
    rows, experts = x.shape
    scores = x.new_empty((rows, experts) if return_scores else (0, 0), dtype=torch.float32)
    return (
        scores,
        x.new_empty((rows, top_k), dtype=torch.float32),
        x.new_empty((rows, top_k), dtype=_DTYPES[index_dtype]),
    )


def _routing_op(name: str, eager: Any):
    def real(
        gating_output: Tensor,
        e_score_correction_bias: Tensor,
        n_group: int,
        topk_group: int,
        top_k: int,
        renormalize: bool,
        routed_scaling_factor: float,
        index_dtype: str,
        return_scores: bool,
        num_tokens: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        scores, values, ids = eager(
            gating_output, e_score_correction_bias, n_group, topk_group, top_k, renormalize, routed_scaling_factor,
            index_dtype=index_dtype, return_scores=return_scores, num_tokens=num_tokens,
        )  # fmt: skip
        return (gating_output.new_empty((0, 0), dtype=torch.float32) if scores is None else scores), values, ids

    custom = torch.library.custom_op(f"fusedgate::{name}", real, mutates_args=())

    @custom.register_fake
    def _(gating_output, e_score_correction_bias, n_group, topk_group, top_k, renormalize, routed_scaling_factor,
          index_dtype, return_scores, num_tokens):  # fmt: skip
        check_routing_inputs(
            gating_output.shape, gating_output.dtype, e_score_correction_bias.shape, e_score_correction_bias.dtype,
            n_group, topk_group, top_k, routed_scaling_factor, index_dtype,
        )  # fmt: skip
        return _outputs_like(gating_output, top_k, index_dtype, return_scores)

    return custom


_ROUTING_OPS = {
    "grouped_topk": _routing_op("grouped_topk", api.grouped_topk),
    "fused_block_grouped_topk": _routing_op("fused_block_grouped_topk", api.fused_block_grouped_topk),
    "two_kernel_grouped_topk": _routing_op("two_kernel_grouped_topk", api.two_kernel_grouped_topk),
}


@torch.library.custom_op("fusedgate::cast_sigmoid_bias", mutates_args=())
def _cast_sigmoid_bias(
    gating_output: Tensor, e_score_correction_bias: Tensor, num_tokens: Tensor | None
) -> tuple[Tensor, Tensor]:
    return api.cast_sigmoid_bias(gating_output, e_score_correction_bias, num_tokens=num_tokens)


@_cast_sigmoid_bias.register_fake
def _(gating_output, e_score_correction_bias, num_tokens):
    check_routing_inputs(
        gating_output.shape, gating_output.dtype, e_score_correction_bias.shape, e_score_correction_bias.dtype,
        1, 1, 1, 1.0,
    )  # fmt: skip
    return torch.empty_like(gating_output, dtype=torch.float32), torch.empty_like(gating_output, dtype=torch.float32)


@torch.library.custom_op("fusedgate::noaux_tc", mutates_args=("scores",))
def _noaux_tc(
    scores: Tensor,
    scores_with_bias: Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    renormalize: bool,
    routed_scaling_factor: float,
    index_dtype: str,
    num_tokens: Tensor | None,
) -> tuple[Tensor, Tensor]:
    _, values, ids = api.noaux_tc(
        scores, scores_with_bias, n_group, topk_group, top_k, renormalize, routed_scaling_factor,
        index_dtype=index_dtype, num_tokens=num_tokens,
    )  # fmt: skip
    return values, ids


@_noaux_tc.register_fake
def _(
    scores, scores_with_bias, n_group, topk_group, top_k, renormalize, routed_scaling_factor, index_dtype, num_tokens
):
    check_routing_inputs(
        scores.shape, scores.dtype, scores.shape[-1:], scores_with_bias.dtype, n_group, topk_group, top_k,
        routed_scaling_factor, index_dtype, logits_name="scores", bias_name="scores_with_bias",
    )  # fmt: skip
    _, values, ids = _outputs_like(scores, top_k, index_dtype, False)
    return values, ids


def compiled_call(
    name,
    gating_output,
    bias,
    n_group,
    topk_group,
    top_k,
    renormalize,
    scale,
    index_dtype,
    return_scores,
    num_tokens,
    out,
) -> tuple:
    if out is not None:
        raise ValueError("out= is not supported inside torch.compile: use the returned tensors")
    scores, values, ids = _ROUTING_OPS[name](
        gating_output, bias, int(n_group), int(topk_group), int(top_k), bool(renormalize), float(scale),
        index_dtype, bool(return_scores), num_tokens,
    )  # fmt: skip
    return (scores if return_scores else None), values, ids


def compiled_cast_sigmoid_bias(gating_output, bias, num_tokens) -> tuple:
    return _cast_sigmoid_bias(gating_output, bias, num_tokens)


def compiled_noaux_tc(scores, biased, n_group, topk_group, top_k, renormalize, scale, index_dtype, num_tokens) -> tuple:
    values, ids = _noaux_tc(
        scores, biased, int(n_group), int(topk_group), int(top_k), bool(renormalize), float(scale), index_dtype,
        num_tokens,
    )  # fmt: skip
    return scores, values, ids
