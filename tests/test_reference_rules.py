"""One test per routing rule of DESIGN.md, on hand-built inputs whose answer is known exactly."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from op import reference
from op.configs import RoutingConfig

INF = np.inf
NAN = np.nan


def route(x, bias, n_group, topk_group, top_k, renormalize=True, scale=1.0):
    x = np.asarray(x, dtype=np.float32).reshape(1, -1) if np.ndim(x) == 1 else np.asarray(x, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    return reference.grouped_topk(x, bias, n_group, topk_group, top_k, renormalize, scale)


def sig(v: float) -> np.float32:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-v)))


def test_tied_groups_keep_lower_group_index():
    # Four groups of two with identical contents: groups 0 and 1 must win the tie.
    x = [1.0, 0.0] * 4
    _, _, ids = route(x, np.zeros(8), 4, 2, 2)
    assert sorted(ids[0].tolist()) == [0, 2]


def test_tied_experts_keep_lower_index_and_order():
    x = [0.5, 0.7, 0.5, 0.7, 0.5, 0.1]
    _, values, ids = route(x, np.zeros(6), 1, 1, 4)
    assert ids[0].tolist() == [1, 3, 0, 2]
    assert values[0][0] == values[0][1]


def test_repeated_maximum_counts_twice_in_group_score():
    # Group 0: max 0.9 twice (sum 1.8); group 1: 0.95 and 0.1 (sum 1.05). Group 0 must win.
    x = np.zeros(8, dtype=np.float32)
    bias = np.array([0.9, 0.9, -5, -5, 0.95, 0.1, -5, -5], dtype=np.float32) - sig(0.0)
    _, _, ids = route(x, bias, 2, 1, 2)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_all_negative_biased_scores_still_route_by_order():
    bias = np.full(8, -3.0, dtype=np.float32)
    x = np.array([0.1, 0.2, 3.0, 2.0, -1.0, -2.0, 0.0, 0.3], dtype=np.float32)
    scores, values, ids = route(x, bias, 4, 2, 2)
    b = reference.biased_scores(x[None], bias)[0]
    assert (b < 0).all()
    # Group 1 (experts 2, 3) and group 3 (experts 6, 7) hold the largest sums.
    assert ids[0].tolist() == [2, 3]
    assert (values[0] > 0).all()


def test_nan_experts_are_never_chosen():
    x = np.array([NAN, 5.0, NAN, 1.0, 0.5, NAN, 0.2, 0.1], dtype=np.float32)
    _, _, ids = route(x, np.zeros(8), 1, 1, 3)
    assert ids[0].tolist() == [1, 3, 4]


def test_nan_row_falls_back():
    scores, values, ids = route(np.full(8, NAN), np.zeros(8), 2, 1, 3, renormalize=True, scale=2.0)
    assert ids[0].tolist() == [0, 1, 2]
    assert (values[0] == np.float32(1) / np.float32(3)).all()
    assert (scores[0, :3] == values[0]).all() and (scores[0, 3:] == 0).all()


def test_too_few_valid_experts_in_kept_groups_falls_back():
    # The kept group (group 0 by score) has one valid expert, top_k=2 needs two.
    x = np.array([9.0, NAN, NAN, NAN, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
    bias = np.array([0, 0, 0, 0, -2, -2, -2, -2], dtype=np.float32)
    _, values, ids = route(x, bias, 2, 1, 2)
    # Group 0 holds one valid expert, so it scores -inf with two needed: group 1 is kept and routes.
    assert sorted(ids[0].tolist()) == [4, 5]
    x = np.array([9.0, 8.0, NAN, NAN, NAN, NAN, NAN, NAN], dtype=np.float32)
    _, values, ids = route(x, np.zeros(8), 4, 2, 3)
    assert ids[0].tolist() == [0, 1, 2]
    assert (values[0] == np.float32(1) / np.float32(3)).all()


def test_kept_group_scoring_minus_inf_falls_back():
    # Only one group has two valid experts; two groups must be kept, the second scores -inf.
    x = np.array([1.0, 2.0, 3.0, NAN, NAN, NAN, NAN, NAN], dtype=np.float32)
    _, values, ids = route(x, np.zeros(8), 4, 2, 1)
    assert ids[0].tolist() == [0]
    assert values[0, 0] == np.float32(1.0)


def test_infinite_logits_are_valid():
    x = np.array([INF, -INF, 0.0, INF, 1.0, -INF], dtype=np.float32)
    _, values, ids = route(x, np.zeros(6), 1, 1, 3, renormalize=False)
    assert ids[0].tolist() == [0, 3, 4]
    assert values[0, 0] == 1.0 and values[0, 1] == 1.0
    _, values, ids = route(np.full(4, -INF), np.zeros(4), 1, 1, 2, renormalize=False)
    assert ids[0].tolist() == [0, 1] and (values[0] == 0.0).all()


def test_one_expert_per_group():
    x = np.array([0.1, 0.9, 0.5, 0.7], dtype=np.float32)
    _, _, ids = route(x, np.zeros(4), 4, 2, 2)
    assert ids[0].tolist() == [1, 3]
    x = np.array([0.1, NAN, 0.5, 0.7], dtype=np.float32)
    _, _, ids = route(x, np.zeros(4), 4, 3, 2)
    assert ids[0].tolist() == [3, 2]
    # Three groups kept but only two valid: the third kept group scores -inf and the row falls back.
    x = np.array([NAN, NAN, 0.5, 0.7], dtype=np.float32)
    _, _, ids = route(x, np.zeros(4), 4, 3, 2)
    assert ids[0].tolist() == [0, 1]


def test_group_scoring_skipped_when_every_group_is_kept():
    # Group 0 has a single valid expert (it would score -inf), but with every group kept it still routes.
    x = np.array([5.0, NAN, 1.0, 2.0], dtype=np.float32)
    _, values, ids = route(x, np.zeros(4), 2, 2, 2)
    assert ids[0].tolist() == [0, 3]


def test_thirty_two_groups():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256).astype(np.float32)
    _, _, ids = route(x, np.zeros(256), 32, 8, 8)
    b = reference.biased_scores(x[None], np.zeros(256, np.float32))[0].reshape(32, 8)
    top2 = np.sort(b, axis=1)[:, -2:].sum(axis=1)
    kept = set(np.argsort(-top2, kind="stable")[:8].tolist())
    assert {int(i) // 8 for i in ids[0]} <= kept
    allowed = np.concatenate([np.arange(g * 8, g * 8 + 8) for g in sorted(kept)])
    expected = allowed[np.argsort(-b.reshape(-1)[allowed], kind="stable")[:8]]
    assert ids[0].tolist() == expected.tolist()


@pytest.mark.parametrize("num_experts,n_group,topk_group", [(72, 1, 1), (160, 8, 3), (160, 1, 1)])
def test_non_power_of_two_expert_counts(num_experts, n_group, topk_group):
    x = np.linspace(-2, 2, num_experts, dtype=np.float32)[::-1].copy()
    _, _, ids = route(x, np.zeros(num_experts), n_group, topk_group, 6)
    assert ids[0].tolist() == list(range(6))


def test_top_k_thirty_two():
    rng = np.random.default_rng(5)
    x = rng.permutation(np.linspace(-3, 3, 512, dtype=np.float32))
    _, values, ids = route(x, np.zeros(512), 1, 1, 32)
    assert ids[0].tolist() == np.argsort(-x, kind="stable")[:32].tolist()
    assert abs(float(values.sum()) - 1.0) < 1e-5


def test_renormalize_off_still_applies_scale():
    x = np.array([1.0, 0.0, -1.0, 2.0], dtype=np.float32)
    _, values, ids = route(x, np.zeros(4), 1, 1, 2, renormalize=False, scale=2.5)
    assert ids[0].tolist() == [3, 0]
    assert values[0].tolist() == [sig(2.0) * np.float32(2.5), sig(1.0) * np.float32(2.5)]


def test_renormalize_divides_by_float32_sum_plus_epsilon():
    x = np.array([1.0, 0.0, -1.0, 2.0], dtype=np.float32)
    _, values, _ = route(x, np.zeros(4), 1, 1, 2, renormalize=True, scale=3.0)
    w = np.array([sig(2.0), sig(1.0)], dtype=np.float32)
    expected = w / (w[0] + w[1] + np.float32(1e-20)) * np.float32(3.0)
    assert values[0].tolist() == expected.tolist()


def test_fallback_weights_are_neither_renormalised_nor_scaled():
    _, values, ids = route(np.full(8, NAN), np.zeros(8), 1, 1, 4, renormalize=False, scale=7.0)
    assert values[0].tolist() == [0.25] * 4 and ids[0].tolist() == [0, 1, 2, 3]


def test_empty_batch_gives_empty_outputs():
    scores, values, ids = reference.grouped_topk(
        np.zeros((0, 16), np.float32), np.zeros(16, np.float32), 2, 1, 2, True, 1.0
    )
    assert scores.shape == (0, 16) and values.shape == (0, 2) and ids.shape == (0, 2)


def test_bias_row_vector_and_low_precision_inputs():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32) * 0.1
    flat = reference.grouped_topk(x, bias, 4, 2, 4, True, 1.0)
    row = reference.grouped_topk(x, bias.reshape(1, -1), 4, 2, 4, True, 1.0)
    assert all(np.array_equal(a, b) for a, b in zip(flat, row, strict=True))
    for dtype in (np.float16, ml_dtypes.bfloat16):
        low = reference.grouped_topk(x.astype(dtype), bias.astype(dtype), 4, 2, 4, True, 1.0)
        exact = reference.grouped_topk(
            x.astype(dtype).astype(np.float32), bias.astype(dtype).astype(np.float32), 4, 2, 4, True, 1.0
        )
        assert all(np.array_equal(a, b) for a, b in zip(low, exact, strict=True))


def test_int32_indices_and_no_scores():
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    scores, _, ids = reference.grouped_topk(
        x, np.zeros(8, np.float32), 2, 1, 2, True, 1.0, index_dtype="int32", return_scores=False
    )
    assert scores is None and ids.dtype == np.int32


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"n_group": 3}, "n_group=3"),
        ({"n_group": 0}, "n_group=0"),
        ({"n_group": 64}, "n_group=64"),
        ({"topk_group": 5}, "topk_group=5"),
        ({"topk_group": 0}, "topk_group=0"),
        ({"top_k": 0}, "top_k=0"),
        ({"top_k": 33}, "top_k=33"),
        ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor"),
    ],
)
def test_invalid_routing_arguments_name_the_argument(kwargs, needle):
    args = {"n_group": 4, "topk_group": 2, "top_k": 4, "renormalize": True, "routed_scaling_factor": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        reference.grouped_topk(np.zeros((1, 64), np.float32), np.zeros(64, np.float32), **args)


@pytest.mark.parametrize(
    "x,bias,needle",
    [
        (np.zeros((2, 64), np.float64), np.zeros(64, np.float32), "gating_output dtype float64"),
        (np.zeros((2, 64), np.int32), np.zeros(64, np.float32), "gating_output dtype int32"),
        (np.zeros((2, 64), np.float32), np.zeros(64, np.float64), "e_score_correction_bias dtype float64"),
        (np.zeros((2, 64), np.float32), np.zeros(32, np.float32), "e_score_correction_bias shape"),
        (np.zeros(64, np.float32), np.zeros(64, np.float32), "gating_output must be 2-D"),
        (np.zeros((2, 2048), np.float32), np.zeros(2048, np.float32), "num_experts=2048"),
        (np.zeros((2, 1), np.float32), np.zeros(1, np.float32), "num_experts=1"),
    ],
)
def test_invalid_tensors_name_the_argument(x, bias, needle):
    with pytest.raises(ValueError, match=needle):
        reference.grouped_topk(x, bias, 1, 1, 1, True, 1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="top_k=9"):
        RoutingConfig(16, 4, 2, 9, True, 1.0)
    with pytest.raises(ValueError, match="index_dtype"):
        reference.grouped_topk(
            np.zeros((1, 8), np.float32), np.zeros(8, np.float32), 1, 1, 1, True, 1.0, index_dtype="int16"
        )


def test_renormalising_all_zero_weights_gives_zeros_not_nan():
    # sigmoid(-inf) = 0 for every chosen expert: the 1e-20 in the denominator keeps 0 / 0 out.
    _, values, ids = route(np.full(6, -INF), np.zeros(6), 1, 1, 3, renormalize=True, scale=2.0)
    assert ids[0].tolist() == [0, 1, 2]
    assert values[0].tolist() == [0.0, 0.0, 0.0]
