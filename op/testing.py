"""The alignment standard of DESIGN.md as code: compare any path's routing with the numpy reference.

Ids must equal the reference's, except where a swap is proven harmless from ``reference.biased_scores``:
the competing biased scores differ by at most ``EXPERT_TOLERANCE`` (or, where another group was kept, the
competing group scores by at most ``GROUP_TOLERANCE``). Identical inputs give identical ``b`` on every path,
so a swap between experts with identical logit and bias is never excused: that is the tie rule, not rounding. The
same holds for groups: two groups holding the same (logit, bias) pairs score identically under any arithmetic, so
the lower one must be kept first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import ml_dtypes
import numpy as np

from op import reference
from op.configs import RoutingConfig

EXPERT_TOLERANCE = 8 * 2.0**-23
GROUP_TOLERANCE = 16 * 2.0**-23
WEIGHT_RTOL = 1e-5


def to_numpy(tensor: object) -> np.ndarray:
    """A host numpy copy of a numpy, torch, paddle or cupy tensor; bfloat16 becomes ml_dtypes.bfloat16."""
    if isinstance(tensor, np.ndarray):
        return tensor
    module = type(tensor).__module__.split(".")[0]
    if module == "torch":
        t = tensor.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    if module == "paddle":
        if "bfloat16" in str(tensor.dtype):
            return tensor.astype("float32").numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy()
    if module == "cupy":
        return tensor.get()
    return np.asarray(tensor)


@dataclass
class RoutingComparison:
    tokens: int = 0
    mismatches: int = 0
    excused_near_ties: int = 0
    invalid_ids: int = 0
    weight_failures: int = 0
    scores_failures: int = 0
    max_abs_weight_error: float = 0.0
    max_rel_weight_error: float = 0.0
    first_failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.mismatches == self.invalid_ids == self.weight_failures == self.scores_failures == 0

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _note(result: RoutingComparison, message: str) -> None:
    if result.first_failure is None:
        result.first_failure = message


def _identical_group_passed_over(x: np.ndarray, bias: np.ndarray, config: RoutingConfig, kept: set[int]) -> bool:
    """Whether a dropped group holds the same (logit, bias) pairs as a kept group of higher index."""
    epg = config.experts_per_group
    # Bit patterns, so that NaN logits compare equal to themselves; sorting makes the key a multiset.
    pairs = np.stack([x.astype(np.float32).view(np.uint32), bias.astype(np.float32).view(np.uint32)], axis=-1)
    keys = [sorted(map(tuple, pairs[g * epg : (g + 1) * epg].tolist())) for g in range(config.n_group)]
    return any(keys[dropped] == keys[k] for k in kept for dropped in range(k) if dropped not in kept)


def _swap_is_excused(ids: np.ndarray, b: np.ndarray, x: np.ndarray, bias: np.ndarray, config: RoutingConfig) -> bool:
    """Whether ``ids`` is a correct routing of one token up to near-ties in ``b`` (or in group scores)."""
    b64 = b.astype(np.float64)
    valid = np.isfinite(b64)
    if not valid[ids].all():
        return False
    same_input = (x[:, None] == x[None, :]) & (bias[:, None] == bias[None, :])
    epg = config.experts_per_group
    if config.scores_groups:
        scores = reference.group_scores(b[None, :], config.n_group)[0].astype(np.float64)
        kth = np.sort(scores)[::-1][config.topk_group - 1]
        chosen_groups = set((ids // epg).tolist())
        definite = set(np.flatnonzero(scores > kth + GROUP_TOLERANCE).tolist())
        ambiguous = set(np.flatnonzero(np.abs(scores - kth) <= GROUP_TOLERANCE).tolist())
        if not chosen_groups <= definite | ambiguous:
            return False
        kept = definite | chosen_groups
        slots = config.topk_group - len(kept)
        if slots < 0:
            return False
        if _identical_group_passed_over(x, bias, config, kept):
            return False
    else:
        kept, ambiguous, slots = set(range(config.n_group)), set(), 0
    floor = b64[ids].min()
    chosen = np.zeros(b.shape[0], dtype=bool)
    chosen[ids] = True

    def group_blocks(group: int) -> bool:
        members = np.arange(group * epg, (group + 1) * epg)
        rivals = members[valid[members] & ~chosen[members]]
        if (b64[rivals] > floor + EXPERT_TOLERANCE).any():
            return True
        # An unchosen expert with the same input as a chosen one must have the higher index.
        return bool((same_input[np.ix_(rivals, ids)] & (rivals[:, None] < ids[None, :])).any())

    if any(group_blocks(g) for g in kept):
        return False
    harmless = [g for g in ambiguous - kept if not group_blocks(g)]
    if len(harmless) < slots:
        return False
    ordered = b64[ids]
    if (ordered[1:] > ordered[:-1] + EXPERT_TOLERANCE).any():
        return False
    return not any(same_input[ids[i], ids[i + 1]] and ids[i] > ids[i + 1] for i in range(len(ids) - 1))


def compare_routing(
    actual: tuple,
    gating_output: object,
    e_score_correction_bias: object,
    config: RoutingConfig,
) -> RoutingComparison:
    """Counts and maxima of how far ``actual = (scores, topk_values, topk_indices)`` is from the reference."""
    x = to_numpy(gating_output)
    bias = to_numpy(e_score_correction_bias).reshape(-1)
    scores, values, ids = (None if a is None else to_numpy(a) for a in actual)
    num_tokens, num_experts = x.shape
    k = config.top_k
    result = RoutingComparison(tokens=num_tokens)
    if values.shape != (num_tokens, k) or ids.shape != (num_tokens, k):
        raise ValueError(
            f"actual outputs have shapes {values.shape} and {ids.shape}; expected ({num_tokens}, {k}) for both"
        )
    if scores is not None and scores.shape != (num_tokens, num_experts):
        raise ValueError(f"actual scores have shape {scores.shape}; expected ({num_tokens}, {num_experts})")
    if num_tokens == 0:
        return result

    _, ref_values, ref_ids = reference.grouped_topk(x, bias, *config.args(), return_scores=False)
    s = reference.sigmoid(x)
    b = reference.biased_scores(x, bias)
    ids = ids.astype(np.int64)
    values = values.astype(np.float32)
    x32 = x.astype(np.float32)
    bias32 = bias.astype(np.float32)

    in_range = ((ids >= 0) & (ids < num_experts)).all(axis=1)
    sorted_ids = np.sort(ids, axis=1)
    distinct = (np.diff(sorted_ids, axis=1) != 0).all(axis=1)
    bad_ids = ~(in_range & distinct)
    result.invalid_ids = int(bad_ids.sum())
    if result.invalid_ids:
        t = int(np.flatnonzero(bad_ids)[0])
        _note(result, f"token {t}: ids {ids[t].tolist()} are not {k} distinct ids in [0, {num_experts})")

    expected_values = ref_values.copy()
    fallback_ids = np.arange(k)
    ref_fallback = (ref_ids == fallback_ids).all(axis=1) & (ref_values == reference.fallback_weight(k)).all(axis=1)
    differ = ~bad_ids & ~(ids == ref_ids).all(axis=1)
    for t in np.flatnonzero(differ):
        if not ref_fallback[t] and _swap_is_excused(ids[t], b[t], x32[t], bias32, config):
            result.excused_near_ties += 1
            expected_values[t] = reference.routing_weights(
                s[t, ids[t]][None, :], config.renormalize, config.routed_scaling_factor
            )[0]
            continue
        result.mismatches += 1
        _note(
            result,
            f"token {t}: expected ids {ref_ids[t].tolist()} with b {b[t, ref_ids[t]].tolist()}, "
            f"got ids {ids[t].tolist()} with b {b[t, np.clip(ids[t], 0, num_experts - 1)].tolist()}",
        )

    checked = ~bad_ids
    abs_err = np.abs(values.astype(np.float64) - expected_values.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_err = np.where(abs_err == 0, 0.0, abs_err / np.abs(expected_values.astype(np.float64)))
    rel_err[np.isnan(values)] = np.inf
    if checked.any():
        result.max_abs_weight_error = float(np.nan_to_num(abs_err[checked], nan=np.inf).max())
        result.max_rel_weight_error = float(rel_err[checked].max())
    weight_bad = checked & (rel_err > WEIGHT_RTOL).any(axis=1)
    result.weight_failures = int(weight_bad.sum())
    if result.weight_failures:
        t = int(np.flatnonzero(weight_bad)[0])
        _note(result, f"token {t}: weights {values[t].tolist()} expected {expected_values[t].tolist()}")

    if scores is not None:
        expected_scores = np.zeros((num_tokens, num_experts), dtype=np.float32)
        rows = np.flatnonzero(checked)
        expected_scores[rows[:, None], ids[rows]] = values[rows]
        scores_bad = checked & ~(scores.astype(np.float32) == expected_scores).all(axis=1)
        result.scores_failures = int(scores_bad.sum())
        if result.scores_failures:
            t = int(np.flatnonzero(scores_bad)[0])
            nonzero = np.flatnonzero(scores[t])
            _note(
                result,
                f"token {t}: scores row is nonzero at {nonzero.tolist()} with {scores[t, nonzero].tolist()}, "
                f"expected the weights {values[t].tolist()} at {ids[t].tolist()} and zero elsewhere",
            )
    return result


def assert_routing_close(
    actual: tuple, gating_output: object, e_score_correction_bias: object, config: RoutingConfig
) -> RoutingComparison:
    """Raise ``AssertionError`` on any failure of the alignment standard; return the comparison otherwise."""
    result = compare_routing(actual, gating_output, e_score_correction_bias, config)
    if not result.ok:
        raise AssertionError(
            f"routing differs from the reference: {result.as_dict()}\nfirst failure: {result.first_failure}"
        )
    return result
