"""The routing semantics of fusedgate, in numpy: the single source of truth every other path is checked against.

Rules (DESIGN.md, "Routing semantics"):
1. ``s = 1 / (1 + exp(-x))`` in float32; ``b = s + float32(bias)``.
2. A non-finite ``b`` is invalid and never chosen.
3. With ``topk_group < n_group``, a group scores the float32 sum of its top ``min(2, epg)`` valid ``b`` (a
   repeated maximum counts twice), ``-inf`` with fewer valid experts; the ``topk_group`` best groups are kept,
   ties to the lower group index. With every group kept, group scoring is skipped.
4. The ``top_k`` valid experts of highest ``b`` in the kept groups, ties to the lower index, in the order
   ``b`` descending then index ascending.
5. Weights are the unbiased ``s``; renormalised as ``w / (sum + 1e-20)`` (sum in output order, float32), then
   always multiplied by ``float32(routed_scaling_factor)``.
6. ``scores`` is zero but for the weights at the chosen ids.
7. Fallback when a kept group scores ``-inf`` or fewer than ``top_k`` valid experts are in the kept groups:
   ids ``0..K-1``, weights exactly ``1/K`` (neither renormalised nor scaled).
8. ``T = 0`` gives empty outputs.

Every step is vectorised over tokens; Python loops run over at most ``top_k`` columns.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from op.checks import check_routing_inputs, dtype_name

RENORM_EPSILON = np.float32(1e-20)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype (ml_dtypes for bfloat16) of a float dtype name."""
    if name not in _NUMPY_DTYPES:
        raise ValueError(f"dtype {name!r} is not supported: allowed {', '.join(_NUMPY_DTYPES)}")
    return np.dtype(_NUMPY_DTYPES[name])


def _as_float32(array: np.ndarray, name: str) -> np.ndarray:
    if dtype_name(array.dtype) not in _NUMPY_DTYPES:
        raise ValueError(f"{name} dtype {array.dtype} is not supported: allowed float32, bfloat16, float16")
    return np.asarray(array).astype(np.float32, copy=False)


def sigmoid(gating_output: np.ndarray) -> np.ndarray:
    """Rule 1's ``s`` in float32; ``x = +-inf`` gives exactly 1 or 0, NaN stays NaN."""
    x = _as_float32(np.asarray(gating_output), "gating_output")
    with np.errstate(over="ignore"):
        return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def biased_scores(gating_output: np.ndarray, e_score_correction_bias: np.ndarray) -> np.ndarray:
    """The float32 ``b = s + bias`` that routing ranks by (rule 1)."""
    bias = _as_float32(np.asarray(e_score_correction_bias), "e_score_correction_bias").reshape(1, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        return sigmoid(gating_output) + bias


def group_scores(b: np.ndarray, n_group: int) -> np.ndarray:
    """Rule 3's group score: sum of the top ``min(2, epg)`` valid ``b``, ``-inf`` with fewer valid."""
    num_tokens, num_experts = b.shape
    epg = num_experts // n_group
    grouped = b.reshape(num_tokens, n_group, epg)
    valid = np.isfinite(grouped)
    masked = np.where(valid, grouped, np.float32(-np.inf))
    top1 = masked.max(axis=2)
    if epg == 1:
        total = top1
        needed = 1
    else:
        # Remove one occurrence of the maximum only, so a repeated maximum still counts twice.
        first = masked.argmax(axis=2)[..., None]
        rest = masked.copy()
        np.put_along_axis(rest, first, np.float32(-np.inf), axis=2)
        with np.errstate(invalid="ignore", over="ignore"):
            total = top1 + rest.max(axis=2)
        needed = 2
    return np.where(valid.sum(axis=2) >= needed, total, np.float32(-np.inf)).astype(np.float32)


def kept_groups(b: np.ndarray, n_group: int, topk_group: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``[T, n_group]`` of kept groups, and whether any kept group scored ``-inf``."""
    num_tokens = b.shape[0]
    if topk_group == n_group:
        return np.ones((num_tokens, n_group), dtype=bool), np.zeros(num_tokens, dtype=bool)
    scores = group_scores(b, n_group)
    # A stable sort of the negated scores keeps the lower group index first among equal scores.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :topk_group]
    kept = np.zeros((num_tokens, n_group), dtype=bool)
    np.put_along_axis(kept, order, True, axis=1)
    dead = np.isneginf(np.take_along_axis(scores, order, axis=1)).any(axis=1)
    return kept, dead


def top_experts(b: np.ndarray, allowed: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` allowed valid experts by ``b`` desc, index asc; and per row whether all ``top_k`` exist.

    ``argmax`` returns the first of equal maxima, which is exactly the lower-index tie rule, so ``top_k``
    passes of it select and order in one go.
    """
    keys = np.where(allowed & np.isfinite(b), b, np.float32(-np.inf))
    ids = np.empty((b.shape[0], top_k), dtype=np.int64)
    complete = np.ones(b.shape[0], dtype=bool)
    for rank in range(top_k):
        best = keys.argmax(axis=1)[:, None]
        complete &= np.isfinite(np.take_along_axis(keys, best, axis=1)[:, 0])
        np.put_along_axis(keys, best, np.float32(-np.inf), axis=1)
        ids[:, rank] = best[:, 0]
    return ids, complete


def routing_weights(chosen_s: np.ndarray, renormalize: bool, routed_scaling_factor: float) -> np.ndarray:
    """Rule 5 on the unbiased scores of the chosen experts, given in output order."""
    w = np.asarray(chosen_s, dtype=np.float32)
    if renormalize:
        total = np.zeros(w.shape[0], dtype=np.float32)
        for column in range(w.shape[1]):
            total = total + w[:, column]
        w = w / (total + RENORM_EPSILON)[:, None]
    return (w * np.float32(routed_scaling_factor)).astype(np.float32)


def fallback_weight(top_k: int) -> np.float32:
    return np.float32(1.0) / np.float32(top_k)


def grouped_topk(
    gating_output: np.ndarray,
    e_score_correction_bias: np.ndarray,
    n_group: int,
    topk_group: int,
    top_k: int,
    renormalize: bool,
    routed_scaling_factor: float,
    *,
    index_dtype: str = "int64",
    return_scores: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Route every token; numpy arrays in and out. Returns ``(scores, topk_values, topk_indices)``."""
    gating_output = np.asarray(gating_output)
    e_score_correction_bias = np.asarray(e_score_correction_bias)
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
    s = sigmoid(gating_output)
    with np.errstate(invalid="ignore", over="ignore"):
        b = s + _as_float32(e_score_correction_bias, "e_score_correction_bias").reshape(1, -1)
    kept, dead_group = kept_groups(b, n_group, topk_group)
    allowed = np.repeat(kept, num_experts // n_group, axis=1)
    ids, complete = top_experts(b, allowed, top_k)
    weights = routing_weights(np.take_along_axis(s, ids, axis=1), renormalize, routed_scaling_factor)

    fallback = dead_group | ~complete
    ids[fallback] = np.arange(top_k)
    weights[fallback] = fallback_weight(top_k)

    scores = None
    if return_scores:
        scores = np.zeros((num_tokens, num_experts), dtype=np.float32)
        np.put_along_axis(scores, ids, weights, axis=1)
    return scores, weights, ids.astype(index_dtype)
