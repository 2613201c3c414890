"""The C++ CPU kernel's two per-token loops: the AVX-512 one gives the portable one's bits, the loop is chosen by
$FUSEDGATE_CPU_ISA, and the AVX-512 loop's filter on approximate keys keeps every expert the exact keys choose."""

from __future__ import annotations

import numpy as np
import pytest

from harness.inputs import DISTRIBUTIONS, generate_input
from op import grouped_topk, reference
from op.build import library
from op.configs import ALL_CONFIGS

ISA_ENV = "FUSEDGATE_CPU_ISA"


@pytest.fixture
def avx512(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)
    if library().cpu_isa() != "avx512":
        pytest.skip("this processor has no AVX-512")
    monkeypatch.setenv(ISA_ENV, "avx512")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_both_loops_give_the_same_bits(name, distribution, dtype, seed, avx512, monkeypatch):
    config = ALL_CONFIGS[name]
    x, bias = generate_input(config, 300, dtype, seed, distribution)
    results = []
    for loop in ("avx512", "portable"):
        monkeypatch.setenv(ISA_ENV, loop)
        assert library().cpu_isa() == loop
        results.append(grouped_topk(x, bias, *config.args(), num_threads=1))
    for got, want in zip(*results, strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("value", ["avx2", "AVX512", " "])
def test_unknown_loops_are_refused(value, monkeypatch):
    monkeypatch.setenv(ISA_ENV, value)
    with pytest.raises(ValueError, match=f"{ISA_ENV}='{value}' is invalid: allowed portable"):
        library().cpu_isa()


def test_an_expert_the_approximate_keys_rank_second_is_still_chosen(avx512):
    """The AVX-512 loop ranks approximate keys first. Its cubic for 2^f puts s 3.5e-5 low at x = 3.0625 and 3.9e-5
    high at x = 3.78125; with these biases the first expert's exact key leads by 1e-5 (ten times the near-tie
    tolerance), while its approximate key trails. Only the filter's margin keeps it among the candidates."""
    x = np.full((1, 16), -10.0, np.float32)
    x[0, 3], x[0, 9] = 3.0625, 3.78125
    s = reference.sigmoid(x)[0]
    bias = np.zeros(16, np.float32)
    bias[9] = s[3] - s[9] - np.float32(1e-5)
    _, _, ids = grouped_topk(x, bias, 1, 1, 1, True, 1.0)
    _, _, expected = reference.grouped_topk(x, bias, 1, 1, 1, True, 1.0)
    assert expected.tolist() == [[3]]
    assert ids.tolist() == [[3]]


@pytest.mark.parametrize("loop", ["avx512", "portable"])
def test_every_lane_maximum_up_to_the_top_k_th_is_needed(loop, monkeypatch):
    """top_k = 32 from 64 experts, each of the 32 chosen the largest of its lane and the others far below, in both
    loops' lane layouts: the selection bound must be exactly the 32nd largest lane maximum, or the last expert is
    left out and the row falls back."""
    monkeypatch.setenv(ISA_ENV, loop)
    if library().cpu_isa() != loop:
        pytest.skip("this processor has no AVX-512")
    x = np.full((1, 64), -4.0, np.float32)
    x[0, 32:] = np.linspace(4.0, 2.0, 32, dtype=np.float32)
    bias = np.zeros(64, np.float32)
    got = grouped_topk(x, bias, 1, 1, 32, True, 1.0, num_threads=1)
    want = reference.grouped_topk(x, bias, 1, 1, 32, True, 1.0)
    assert want[2].tolist() == [list(range(32, 64))]
    assert got[2].tolist() == want[2].tolist()
    assert np.allclose(got[1], want[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("loop", ["avx512", "portable"])
def test_the_bound_is_the_top_k_th_lane_maximum_in_any_lane_order(loop, monkeypatch):
    """top_k = 8 of 128 experts; the 16 lane maxima (experts 0-15 in both loops' layouts) at distinct levels in
    twenty orders, every other expert far below: a bound above the 8th largest maximum leaves an expert out."""
    monkeypatch.setenv(ISA_ENV, loop)
    if library().cpu_isa() != loop:
        pytest.skip("this processor has no AVX-512")
    levels = np.linspace(4.0, 1.0, 16, dtype=np.float32)
    x = np.full((20, 128), -4.0, np.float32)
    for row in range(20):
        x[row, :16] = levels[np.random.default_rng(row).permutation(16)]
    bias = np.zeros(128, np.float32)
    got = grouped_topk(x, bias, 1, 1, 8, True, 1.0, num_threads=1)
    want = reference.grouped_topk(x, bias, 1, 1, 8, True, 1.0)
    assert np.array_equal(got[2], want[2])
    assert np.allclose(got[1], want[1], rtol=1e-5, atol=0)
