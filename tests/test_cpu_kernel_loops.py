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
