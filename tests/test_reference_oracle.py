"""The reference against a brute-force oracle that shares no code with ``op/``.

The oracle routes one token at a time in plain Python: it sorts ``(-b, index)`` pairs, which is the whole tie
rule. Only the float32 arithmetic (sigmoid, bias add, group sums, renormalisation) goes through numpy scalars
so that both sides round the same way.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.inputs import DISTRIBUTIONS, generate_input
from op import reference
from op.configs import ALL_CONFIGS

F32 = np.float32


def oracle_row(x_row, bias, n_group, topk_group, top_k, renormalize, scale):
    num_experts = len(x_row)
    epg = num_experts // n_group
    s = [F32(1.0) / (F32(1.0) + np.exp(-F32(v))) for v in x_row]
    b = [s[i] + F32(bias[i]) for i in range(num_experts)]
    valid = [bool(np.isfinite(v)) for v in b]
    allowed = set(range(num_experts))
    fallback = False
    if topk_group < n_group:
        group_scores = []
        for g in range(n_group):
            members = sorted((-float(b[i]), i) for i in range(g * epg, (g + 1) * epg) if valid[i])
            need = min(2, epg)
            if len(members) < need:
                group_scores.append(-np.inf)
            elif need == 1:
                group_scores.append(float(b[members[0][1]]))
            else:
                group_scores.append(float(b[members[0][1]] + b[members[1][1]]))
        kept = [g for _, g in sorted((-gs, g) for g, gs in enumerate(group_scores))[:topk_group]]
        fallback = any(group_scores[g] == -np.inf for g in kept)
        allowed = {i for g in kept for i in range(g * epg, (g + 1) * epg)}
    candidates = sorted((-float(b[i]), i) for i in allowed if valid[i])
    if fallback or len(candidates) < top_k:
        return list(range(top_k)), [F32(1.0) / F32(top_k)] * top_k
    ids = [i for _, i in candidates[:top_k]]
    weights = [s[i] for i in ids]
    if renormalize:
        total = F32(0.0)
        for w in weights:
            total = F32(total + w)
        weights = [F32(w / (total + F32(1e-20))) for w in weights]
    return ids, [F32(w * F32(scale)) for w in weights]


def check_against_oracle(x, bias, config, rows):
    scores, values, ids = reference.grouped_topk(x, bias, *config.args())
    x32 = x.astype(np.float32)
    bias32 = bias.astype(np.float32).reshape(-1)
    for t in rows:
        expected_ids, expected_w = oracle_row(x32[t], bias32, *config.args())
        assert ids[t].tolist() == expected_ids, f"token {t}"
        assert values[t].tolist() == [float(w) for w in expected_w], f"token {t}"
        row = np.zeros(config.num_experts, np.float32)
        row[expected_ids] = expected_w
        assert np.array_equal(scores[t], row), f"token {t}"


@pytest.mark.parametrize("num_tokens", [0, 1, 2, 7, 128, 1000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_reference_matches_oracle(name, dtype, num_tokens, seed):
    config = ALL_CONFIGS[name]
    distribution = DISTRIBUTIONS[seed % len(DISTRIBUTIONS)]
    x, bias = generate_input(config, num_tokens, dtype, seed, distribution)
    rng = np.random.default_rng(seed)
    rows = rng.choice(num_tokens, size=min(num_tokens, 24), replace=False) if num_tokens else []
    check_against_oracle(x, bias, config, rows)
    scores, values, ids = reference.grouped_topk(x, bias, *config.args())
    assert ids.shape == (num_tokens, config.top_k) and scores.shape == (num_tokens, config.num_experts)
    assert ((ids >= 0) & (ids < config.num_experts)).all()
    assert all(len(set(row)) == config.top_k for row in ids.tolist())


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_every_distribution_against_oracle(distribution, seed):
    for name in ("deepseek_v3", "fd_kimi_k2", "x_e160_g8"):
        config = ALL_CONFIGS[name]
        x, bias = generate_input(config, 48, "bfloat16", seed, distribution)
        check_against_oracle(x, bias, config, range(48))


_CONFIG_SHAPES = st.sampled_from([(e, g) for e in (2, 6, 8, 12, 16, 24, 40, 64) for g in (1, 2, 3, 4, 8) if e % g == 0])


@st.composite
def routing_problems(draw):
    num_experts, n_group = draw(_CONFIG_SHAPES)
    epg = num_experts // n_group
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(32, topk_group * epg)))
    # Coarse values make ties common; NaN and infinities exercise validity and fallback.
    element = st.one_of(
        st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0, float("nan"), float("inf"), -float("inf")]),
        st.floats(-8, 8, width=32),
    )
    rows = draw(st.integers(1, 4))
    x = np.array(draw(st.lists(element, min_size=rows * num_experts, max_size=rows * num_experts)), np.float32)
    bias = np.array(
        draw(st.lists(st.sampled_from([0.0, 0.25, -0.25, -2.0]), min_size=num_experts, max_size=num_experts)),
        np.float32,
    )
    renormalize = draw(st.booleans())
    scale = draw(st.sampled_from([1.0, 2.5, 0.5]))
    dtype = draw(st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]))
    return x.reshape(rows, num_experts).astype(dtype), bias, (n_group, topk_group, top_k, renormalize, scale)


@settings(max_examples=300, deadline=None)
@given(routing_problems())
def test_reference_property_against_oracle(problem):
    x, bias, args = problem
    scores, values, ids = reference.grouped_topk(x, bias, *args)
    for t in range(x.shape[0]):
        expected_ids, expected_w = oracle_row(x[t].astype(np.float32), bias, *args)
        assert ids[t].tolist() == expected_ids
        assert values[t].tolist() == [float(w) for w in expected_w]
