"""One test per routing rule of DESIGN.md, on hand-built inputs whose answer is known exactly, run over every path.

Each rule test takes the ``route`` fixture, which runs the reference, the C++ CPU kernel through numpy, torch and
paddle tensors, both composites, and on a CUDA host the GPU paths. Ids must be exact on every path; weights are
exact where a rule fixes them (fallback ``1/K``, zeros) and within the alignment standard elsewhere (the CUDA
sigmoid is approximate, the C++ kernel's exponential is not numpy's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest

from op import reference
from op.configs import RoutingConfig
from op.testing import WEIGHT_RTOL, to_numpy

INF = np.inf
NAN = np.nan


def _torch_cpu(a):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(a)


def _torch_cuda(a):
    return _torch_cpu(a).cuda()


def _paddle_cpu(a):
    paddle = pytest.importorskip("paddle")
    return paddle.to_tensor(a)


def _kernel(name: str) -> Callable:
    def call(*args, **kwargs):
        import op

        return getattr(op, name)(*args, **kwargs)

    return call


def _composite(name: str) -> Callable:
    def call(*args, **kwargs):
        from op import composite

        return getattr(composite, name)(*args, **kwargs)

    return call


@dataclass(frozen=True)
class RoutePath:
    """One path with the tensor type it is fed; ``exact_weights`` only for the reference itself."""

    name: str
    function: Callable
    to_tensor: Callable[[np.ndarray], object]
    exact_weights: bool = False

    def __call__(self, x, bias, n_group, topk_group, top_k, renormalize=True, scale=1.0, **kwargs):
        x = np.asarray(x, dtype=np.float32) if np.asarray(x).dtype == np.float64 else np.asarray(x)
        x = x.reshape(1, -1) if x.ndim == 1 else x
        bias = np.asarray(bias, dtype=np.float32)
        out = self.function(
            self.to_tensor(np.ascontiguousarray(x)),
            self.to_tensor(bias),
            n_group,
            topk_group,
            top_k,
            renormalize,
            scale,
            **kwargs,
        )
        return tuple(None if t is None else to_numpy(t) for t in out)


PATHS = [
    pytest.param(RoutePath("reference", reference.grouped_topk, np.asarray, True), id="reference"),
    pytest.param(RoutePath("cpu_kernel", _kernel("grouped_topk"), np.asarray), id="cpu_kernel-numpy"),
    pytest.param(RoutePath("cpu_kernel", _kernel("grouped_topk"), _torch_cpu), id="cpu_kernel-torch"),
    pytest.param(RoutePath("cpu_kernel", _kernel("grouped_topk"), _paddle_cpu), id="cpu_kernel-paddle"),
    pytest.param(RoutePath("composite_torch", _composite("composite_torch"), _torch_cpu), id="composite_torch"),
    pytest.param(RoutePath("composite_paddle", _composite("composite_paddle"), _paddle_cpu), id="composite_paddle"),
    pytest.param(RoutePath("fused", _kernel("grouped_topk"), _torch_cuda), id="fused", marks=pytest.mark.gpu),
    pytest.param(
        RoutePath("two_kernel", _kernel("two_kernel_grouped_topk"), _torch_cuda),
        id="two_kernel",
        marks=pytest.mark.gpu,
    ),
    pytest.param(
        RoutePath("fused_block", _kernel("fused_block_grouped_topk"), _torch_cuda),
        id="fused_block",
        marks=pytest.mark.gpu,
    ),
    pytest.param(
        RoutePath("composite_torch", _composite("composite_torch"), _torch_cuda),
        id="composite_torch-cuda",
        marks=pytest.mark.gpu,
    ),
]


@pytest.fixture(params=PATHS)
def route(request) -> RoutePath:
    return request.param


def assert_weights(path: RoutePath, actual, expected) -> None:
    """Exact on the reference; within the alignment standard's relative tolerance on every other path."""
    expected = np.asarray(expected, dtype=np.float32)
    if path.exact_weights:
        assert np.asarray(actual).tolist() == expected.tolist()
    else:
        np.testing.assert_allclose(actual, expected, rtol=WEIGHT_RTOL, atol=0)


def assert_scores_scatter(scores, values, ids) -> None:
    """Rule 6, exact on every path: the weights at the chosen ids and zero elsewhere."""
    expected = np.zeros_like(scores)
    np.put_along_axis(expected, ids.astype(np.int64), values, axis=1)
    assert scores.tolist() == expected.tolist()


def sig(v: float) -> np.float32:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-v)))


def test_tied_groups_keep_lower_group_index(route):
    # Four groups of two with identical contents: groups 0 and 1 must win the tie.
    x = [1.0, 0.0] * 4
    scores, values, ids = route(x, np.zeros(8), 4, 2, 2)
    assert ids[0].tolist() == [0, 2]
    assert_weights(route, values[0], [np.float32(0.5)] * 2)
    assert_scores_scatter(scores, values, ids)


def test_tied_experts_keep_lower_index_and_order(route):
    x = [0.5, 0.7, 0.5, 0.7, 0.5, 0.1]
    _, values, ids = route(x, np.zeros(6), 1, 1, 4)
    assert ids[0].tolist() == [1, 3, 0, 2]
    assert values[0][0] == values[0][1] and values[0][2] == values[0][3]


def test_tied_experts_across_a_wide_row_keep_index_order(route):
    # 128 equal experts: a GPU lane holding four orders its own before the warp compares lanes, and equal keys
    # must still come out by index.
    _, values, ids = route(np.full(128, 0.25, dtype=np.float32), np.zeros(128), 1, 1, 8)
    assert ids[0].tolist() == list(range(8))
    assert len(set(values[0].tolist())) == 1


def test_tied_experts_in_tied_groups_keep_index_order(route):
    # 256 equal experts in 8 tied groups: the lower groups are kept, and a GPU lane holding eight experts of a
    # group scans its own for the best, where equal keys must still give the lower index first.
    _, _, ids = route(np.full(256, -0.5, dtype=np.float32), np.zeros(256), 8, 4, 8)
    assert ids[0].tolist() == list(range(8))


def test_repeated_maximum_counts_twice_in_group_score(route):
    # Group 0: max 0.9 twice (sum 1.8); group 1: 0.95 and 0.1 (sum 1.05). Group 0 must win.
    x = np.zeros(8, dtype=np.float32)
    bias = np.array([0.9, 0.9, -5, -5, 0.95, 0.1, -5, -5], dtype=np.float32) - sig(0.0)
    _, _, ids = route(x, bias, 2, 1, 2)
    assert ids[0].tolist() == [0, 1]


def test_repeated_maximum_counts_twice_in_a_warp_wide_group(route):
    # As above with 32 experts per group (a whole warp on the GPU): 0.9 twice beats 0.95 and 0.1.
    bias = np.full(64, -5.0, dtype=np.float32)
    bias[[0, 1, 32, 33]] = [0.9, 0.9, 0.95, 0.1]
    _, _, ids = route(np.zeros(64, dtype=np.float32), bias - sig(0.0), 2, 1, 2)
    assert ids[0].tolist() == [0, 1]


def test_tied_experts_side_by_side_keep_lower_index(route):
    # Equal neighbours, which a GPU lane holding several experts compares among themselves.
    x = np.array([0.5, 0.5, 0.9, 0.9, 0.1, 0.1, 0.3, 0.3], dtype=np.float32)
    _, _, ids = route(x, np.zeros(8), 1, 1, 3)
    assert ids[0].tolist() == [2, 3, 0]


def test_all_negative_biased_scores_still_route_by_order(route):
    bias = np.full(8, -3.0, dtype=np.float32)
    x = np.array([0.1, 0.2, 3.0, 2.0, -1.0, -2.0, 0.0, 0.3], dtype=np.float32)
    scores, values, ids = route(x, bias, 4, 2, 2)
    b = reference.biased_scores(x[None], bias)[0]
    assert (b < 0).all()
    # Group 1 (experts 2, 3) and group 3 (experts 6, 7) hold the largest sums.
    assert ids[0].tolist() == [2, 3]
    w = np.array([sig(3.0), sig(2.0)], dtype=np.float32)
    assert_weights(route, values[0], w / (w[0] + w[1] + np.float32(1e-20)))
    assert_scores_scatter(scores, values, ids)


def test_nan_experts_are_never_chosen(route):
    x = np.array([NAN, 5.0, NAN, 1.0, 0.5, NAN, 0.2, 0.1], dtype=np.float32)
    _, _, ids = route(x, np.zeros(8), 1, 1, 3)
    assert ids[0].tolist() == [1, 3, 4]


def test_nan_row_falls_back(route):
    scores, values, ids = route(np.full(8, NAN), np.zeros(8), 2, 1, 3, renormalize=True, scale=2.0)
    assert ids[0].tolist() == [0, 1, 2]
    assert (values[0] == np.float32(1) / np.float32(3)).all()
    assert (scores[0, :3] == values[0]).all() and (scores[0, 3:] == 0).all()


def test_too_few_valid_experts_in_kept_groups_falls_back(route):
    # The kept group (group 0 by score) has one valid expert, top_k=2 needs two.
    x = np.array([9.0, NAN, NAN, NAN, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
    bias = np.array([0, 0, 0, 0, -2, -2, -2, -2], dtype=np.float32)
    _, values, ids = route(x, bias, 2, 1, 2)
    # Group 0 holds one valid expert, so it scores -inf with two needed: group 1 is kept and routes.
    assert ids[0].tolist() == [4, 5]
    x = np.array([9.0, 8.0, NAN, NAN, NAN, NAN, NAN, NAN], dtype=np.float32)
    scores, values, ids = route(x, np.zeros(8), 4, 2, 3)
    assert ids[0].tolist() == [0, 1, 2]
    assert (values[0] == np.float32(1) / np.float32(3)).all()
    assert_scores_scatter(scores, values, ids)


def test_too_few_valid_experts_without_groups_falls_back(route):
    scores, values, ids = route(np.array([1.0, NAN, NAN, NAN], dtype=np.float32), np.zeros(4), 1, 1, 2)
    assert ids[0].tolist() == [0, 1]
    assert (values[0] == np.float32(0.5)).all()
    assert_scores_scatter(scores, values, ids)


def test_kept_group_scoring_minus_inf_falls_back(route):
    # Only one group has two valid experts; two groups must be kept, the second scores -inf.
    x = np.array([1.0, 2.0, 3.0, NAN, NAN, NAN, NAN, NAN], dtype=np.float32)
    _, values, ids = route(x, np.zeros(8), 4, 2, 1, scale=3.0)
    assert ids[0].tolist() == [0]
    assert values[0, 0] == np.float32(1.0)


def test_infinite_logits_are_valid(route):
    x = np.array([INF, -INF, 0.0, INF, 1.0, -INF], dtype=np.float32)
    _, values, ids = route(x, np.zeros(6), 1, 1, 3, renormalize=False)
    assert ids[0].tolist() == [0, 3, 4]
    assert_weights(route, values[0], [1.0, 1.0, sig(1.0)])
    _, values, ids = route(np.full(4, -INF), np.zeros(4), 1, 1, 2, renormalize=False)
    assert ids[0].tolist() == [0, 1] and (values[0] == 0.0).all()


def test_one_expert_per_group(route):
    x = np.array([0.1, 0.9, 0.5, 0.7], dtype=np.float32)
    _, _, ids = route(x, np.zeros(4), 4, 2, 2)
    assert ids[0].tolist() == [1, 3]
    x = np.array([0.1, NAN, 0.5, 0.7], dtype=np.float32)
    _, _, ids = route(x, np.zeros(4), 4, 3, 2)
    assert ids[0].tolist() == [3, 2]
    # Three groups kept but only two valid: the third kept group scores -inf and the row falls back.
    x = np.array([NAN, NAN, 0.5, 0.7], dtype=np.float32)
    _, values, ids = route(x, np.zeros(4), 4, 3, 2)
    assert ids[0].tolist() == [0, 1] and (values[0] == np.float32(0.5)).all()


def test_group_scoring_skipped_when_every_group_is_kept(route):
    # Group 0 has a single valid expert (it would score -inf), but with every group kept it still routes.
    x = np.array([5.0, NAN, 1.0, 2.0], dtype=np.float32)
    _, values, ids = route(x, np.zeros(4), 2, 2, 2)
    assert ids[0].tolist() == [0, 3]


def test_thirty_two_groups(route):
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
def test_non_power_of_two_expert_counts(route, num_experts, n_group, topk_group):
    x = np.linspace(-2, 2, num_experts, dtype=np.float32)[::-1].copy()
    _, _, ids = route(x, np.zeros(num_experts), n_group, topk_group, 6)
    assert ids[0].tolist() == list(range(6))


def test_top_k_thirty_two(route):
    rng = np.random.default_rng(5)
    x = rng.permutation(np.linspace(-3, 3, 512, dtype=np.float32))
    _, values, ids = route(x, np.zeros(512), 1, 1, 32)
    assert ids[0].tolist() == np.argsort(-x, kind="stable")[:32].tolist()
    assert abs(float(values.sum()) - 1.0) < 1e-5


def test_renormalize_off_still_applies_scale(route):
    x = np.array([1.0, 0.0, -1.0, 2.0], dtype=np.float32)
    _, values, ids = route(x, np.zeros(4), 1, 1, 2, renormalize=False, scale=2.5)
    assert ids[0].tolist() == [3, 0]
    assert_weights(route, values[0], [sig(2.0) * np.float32(2.5), sig(1.0) * np.float32(2.5)])


def test_renormalize_divides_by_float32_sum_plus_epsilon(route):
    x = np.array([1.0, 0.0, -1.0, 2.0], dtype=np.float32)
    _, values, _ = route(x, np.zeros(4), 1, 1, 2, renormalize=True, scale=3.0)
    w = np.array([sig(2.0), sig(1.0)], dtype=np.float32)
    assert_weights(route, values[0], w / (w[0] + w[1] + np.float32(1e-20)) * np.float32(3.0))


def test_fallback_weights_are_neither_renormalised_nor_scaled(route):
    scores, values, ids = route(np.full(8, NAN), np.zeros(8), 1, 1, 4, renormalize=False, scale=7.0)
    assert values[0].tolist() == [0.25] * 4 and ids[0].tolist() == [0, 1, 2, 3]
    assert_scores_scatter(scores, values, ids)


def test_float16_subnormal_logits_are_read_at_full_value(route):
    # sigmoid(x) ~ 1/2 + x/4: the largest float16 subnormal (1023 * 2^-24) lifts expert 0 above expert 1, whose
    # float32 bias of 1e-5 sits between a quarter of it and a quarter of half of it.
    x = np.zeros((1, 4), np.float16)
    x[0, 0] = np.float16(1023 * 2.0**-24)
    x[0, 2] = np.float16(-1.0)
    x[0, 3] = np.float16(-2.0)
    bias = np.array([0.0, 1e-5, 0.0, 0.0], np.float32)
    _, values, ids = route(x, bias, 1, 1, 1, renormalize=False)
    assert ids[0].tolist() == [0]
    assert_weights(route, values[0], [reference.sigmoid(x)[0, 0]])


def test_empty_batch_gives_empty_outputs(route):
    scores, values, ids = route(np.zeros((0, 16), np.float32), np.zeros(16, np.float32), 2, 1, 2, True, 1.0)
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


def test_renormalising_all_zero_weights_gives_zeros_not_nan(route):
    # sigmoid(-inf) = 0 for every chosen expert: the 1e-20 in the denominator keeps 0 / 0 out.
    scores, values, ids = route(np.full(6, -INF), np.zeros(6), 1, 1, 3, renormalize=True, scale=2.0)
    assert ids[0].tolist() == [0, 1, 2]
    assert values[0].tolist() == [0.0, 0.0, 0.0]
    assert_scores_scatter(scores, values, ids)
