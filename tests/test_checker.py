"""The alignment checker must catch every kind of wrong answer and excuse only proven near-ties."""

from __future__ import annotations

import numpy as np
import pytest

from harness.inputs import generate_input
from op import reference
from op.configs import PRESETS, RoutingConfig
from op.testing import assert_routing_close, compare_routing

CONFIG = PRESETS["deepseek_v3"]

# The standard's tolerances as DESIGN.md states them, written out rather than imported from the checker, so that
# a change to the checker's own constants fails these tests.
EXPERT_TOLERANCE = 8 * 2.0**-23
GROUP_TOLERANCE = 16 * 2.0**-23


@pytest.fixture
def problem(seed):
    x, bias = generate_input(CONFIG, 64, "float32", seed, "randn")
    return x, bias, reference.grouped_topk(x, bias, *CONFIG.args())


def test_reference_output_passes(problem):
    x, bias, out = problem
    result = assert_routing_close(out, x, bias, CONFIG)
    assert result.tokens == 64 and result.mismatches == 0 and result.excused_near_ties == 0


def test_swapped_expert_is_a_mismatch(problem):
    x, bias, (scores, values, ids) = problem
    ids = ids.copy()
    ids[3, [0, 7]] = ids[3, [7, 0]]
    result = compare_routing((None, values, ids), x, bias, CONFIG)
    assert result.mismatches == 1 and "token 3" in result.first_failure
    with pytest.raises(AssertionError, match="token 3"):
        assert_routing_close((None, values, ids), x, bias, CONFIG)


def test_out_of_range_and_duplicate_ids_are_invalid(problem):
    x, bias, (scores, values, ids) = problem
    ids = ids.copy()
    ids[1, 0] = 256
    ids[2, 1] = ids[2, 0]
    assert compare_routing((None, values, ids), x, bias, CONFIG).invalid_ids == 2


def test_weight_error_beyond_tolerance_fails(problem):
    x, bias, (scores, values, ids) = problem
    values = values.copy()
    values[5, 2] *= 1 + 3e-5
    result = compare_routing((None, values, ids), x, bias, CONFIG)
    assert result.weight_failures == 1 and result.max_rel_weight_error > 1e-5
    values[5, 2] = np.nan
    assert compare_routing((None, values, ids), x, bias, CONFIG).weight_failures == 1


def test_scores_must_be_weights_scattered(problem):
    x, bias, (scores, values, ids) = problem
    scores = scores.copy()
    scores[7, int(ids[7, 0])] = 0.0
    scores[9, 0 if 0 not in ids[9] else 1] = 1e-30
    assert compare_routing((scores, values, ids), x, bias, CONFIG).scores_failures == 2


def test_near_tie_swap_is_excused_but_exact_tie_swap_is_not():
    # The competing experts sit at 2 and 3, so the reference's answer cannot pass for a fallback row.
    config = RoutingConfig(8, 1, 1, 2, True, 1.0)
    x = np.array([[0, 0, 0.5, 0.5, 0.1, 0.2, 0, 0]], np.float32)
    bias = np.zeros(8, np.float32)
    x_near = x.copy()
    x_near[0, 3] = np.float32(0.5) + np.float32(2 * EXPERT_TOLERANCE)
    b = reference.biased_scores(x_near, bias)[0]
    assert 0 < b[3] - b[2] <= EXPERT_TOLERANCE
    s = reference.sigmoid(x_near)[0]
    values = reference.routing_weights(s[[2, 3]][None], True, 1.0)
    result = compare_routing((None, values, np.array([[2, 3]])), x_near, bias, config)
    assert result.ok and result.excused_near_ties == 1
    # Identical inputs give identical b on every path: order must follow the index.
    values = reference.routing_weights(reference.sigmoid(x)[0][[3, 2]][None], True, 1.0)
    result = compare_routing((None, values, np.array([[3, 2]])), x, bias, config)
    assert result.mismatches == 1 and result.excused_near_ties == 0


def test_group_near_tie_is_excused_only_within_group_tolerance():
    config = RoutingConfig(8, 2, 1, 1, True, 1.0)
    bias = np.zeros(8, np.float32)
    x = np.array([[0.3, 0.3, -3, -3, 0.3, 0.3, -3, -3]], np.float32)
    x[0, 4] = np.float32(0.3) + np.float32(2e-6)
    ref_ids = reference.grouped_topk(x, bias, *config.args())[2]
    assert ref_ids[0, 0] == 4
    other = np.array([[0]])
    values = np.array([[1.0]], np.float32)
    assert compare_routing((None, values, other), x, bias, config).excused_near_ties == 1
    x[0, 4] = 0.4
    assert compare_routing((None, values, other), x, bias, config).mismatches == 1


def test_fallback_rows_must_match_exactly():
    config = RoutingConfig(8, 1, 1, 2, True, 1.0)
    x = np.full((1, 8), np.nan, np.float32)
    bias = np.zeros(8, np.float32)
    assert compare_routing((None, np.array([[0.5, 0.5]], np.float32), np.array([[0, 1]])), x, bias, config).ok
    bad = compare_routing((None, np.array([[0.5, 0.5]], np.float32), np.array([[1, 0]])), x, bias, config)
    assert bad.mismatches == 1


def test_swap_between_identical_groups_is_never_excused(seed):
    # Four groups with the same logits and bias score identically under any arithmetic: the tie rule keeps
    # groups 0 and 1, and an answer drawn from groups 2 and 3 is wrong, not a near-tie.
    config = RoutingConfig(16, 4, 2, 4, True, 1.0)
    group_x, group_bias = generate_input(RoutingConfig(4, 1, 1, 2, True, 1.0), 1, "float32", seed, "randn")
    x = np.tile(group_x, (1, 4))
    bias = np.tile(group_bias, 4)
    ref_ids = reference.grouped_topk(x, bias, *config.args())[2]
    assert {int(i) // 4 for i in ref_ids[0]} == {0, 1}
    shifted = ref_ids + 8
    values = reference.routing_weights(reference.sigmoid(x)[0][shifted[0]][None], True, 1.0)
    result = compare_routing((None, values, shifted), x, bias, config)
    assert result.mismatches == 1 and result.excused_near_ties == 0


def test_swap_beyond_expert_tolerance_is_a_mismatch():
    # Expert 1 sits two to four tolerances above expert 0 in b: putting 0 first is wrong, not a near-tie.
    config = RoutingConfig(8, 1, 1, 2, True, 1.0)
    x = np.array([[0.5, 0.5, 0.1, 0.2, 0, 0, 0, 0]], np.float32)
    x[0, 1] = np.float32(0.5) + np.float32(12 * EXPERT_TOLERANCE)
    bias = np.zeros(8, np.float32)
    b = reference.biased_scores(x, bias)[0]
    assert 2 * EXPERT_TOLERANCE < b[1] - b[0] <= 4 * EXPERT_TOLERANCE
    values = reference.routing_weights(reference.sigmoid(x)[0][[0, 1]][None], True, 1.0)
    result = compare_routing((None, values, np.array([[0, 1]])), x, bias, config)
    assert result.mismatches == 1 and result.excused_near_ties == 0


def test_group_swap_beyond_group_tolerance_is_a_mismatch():
    config = RoutingConfig(8, 2, 1, 1, True, 1.0)
    bias = np.zeros(8, np.float32)
    x = np.array([[0.3, 0.3, -3, -3, 0.3, 0.3, -3, -3]], np.float32)
    x[0, 4] = np.float32(0.3) + np.float32(2e-5)
    scores = reference.group_scores(reference.biased_scores(x, bias), 2)[0]
    assert 2 * GROUP_TOLERANCE < scores[1] - scores[0] <= 4 * GROUP_TOLERANCE
    values = reference.sigmoid(x)[:, [0]]
    result = compare_routing((None, values, np.array([[0]])), x, bias, config)
    assert result.mismatches == 1 and result.excused_near_ties == 0


def test_higher_of_two_identical_experts_is_a_mismatch():
    # Experts 2 and 3 have the same logit and bias: choosing 3 over 2 breaks the tie rule on every path.
    config = RoutingConfig(8, 1, 1, 1, True, 1.0)
    x = np.array([[-1, -1, 0.5, 0.5, 0.1, 0.2, -2, -2]], np.float32)
    bias = np.zeros(8, np.float32)
    result = compare_routing((None, np.array([[1.0]], np.float32), np.array([[3]])), x, bias, config)
    assert result.mismatches == 1 and result.excused_near_ties == 0
