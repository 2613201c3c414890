"""Reproducible routing inputs: the same seed gives the same tensors on every machine (numpy's PCG64)."""

from __future__ import annotations

import numpy as np

from op.configs import RoutingConfig
from op.reference import numpy_dtype

DISTRIBUTIONS = ("randn", "ties", "saturated", "nonfinite", "negative_bias", "router_like")


def _randn(rng: np.random.Generator, num_tokens: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        rng.standard_normal((num_tokens, num_experts), dtype=np.float32),
        (rng.standard_normal(num_experts) * 0.1).astype(np.float32),
    )


def _ties(rng: np.random.Generator, num_tokens: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    # A handful of coarse values, exact in every float dtype, so equal biased scores are common.
    x = rng.choice(np.array([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=np.float32), size=(num_tokens, num_experts))
    bias = rng.choice(np.array([0.0, 0.25], dtype=np.float32), size=num_experts)
    return x, bias


def _saturated(rng: np.random.Generator, num_tokens: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-50.0, 50.0, size=(num_tokens, num_experts)).astype(np.float32)
    return x, (rng.standard_normal(num_experts) * 0.1).astype(np.float32)


def _nonfinite(rng: np.random.Generator, num_tokens: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    x, bias = _randn(rng, num_tokens, num_experts)
    special = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=np.float32), size=(num_tokens, num_experts))
    mask = rng.random((num_tokens, num_experts)) < 0.05
    x[mask] = special[mask]
    if num_tokens:
        x[rng.integers(num_tokens)] = np.nan
    return x, bias


def _negative_bias(rng: np.random.Generator, num_tokens: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    x, _ = _randn(rng, num_tokens, num_experts)
    # sigmoid < 1, so a bias below -1 puts every biased score below zero.
    bias = (-1.5 - np.abs(rng.standard_normal(num_experts)) * 0.5).astype(np.float32)
    return x, bias


def _router_like(rng: np.random.Generator, num_tokens: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    # Trained routers favour a few experts; the correction bias pushes the popular ones down.
    popularity = rng.lognormal(mean=0.0, sigma=1.0, size=num_experts).astype(np.float32)
    centre = np.log(popularity / popularity.mean()).astype(np.float32)
    x = centre[None, :] - 2.0 + rng.standard_normal((num_tokens, num_experts), dtype=np.float32) * 1.5
    bias = (-0.05 * centre + rng.standard_normal(num_experts) * 0.01).astype(np.float32)
    return x.astype(np.float32), bias


_GENERATORS = {
    "randn": _randn,
    "ties": _ties,
    "saturated": _saturated,
    "nonfinite": _nonfinite,
    "negative_bias": _negative_bias,
    "router_like": _router_like,
}


def generate_input(
    config: RoutingConfig,
    num_tokens: int,
    dtype: str = "bfloat16",
    seed: int = 0,
    distribution: str = "randn",
    bias_dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """``(gating_output [T, E] in dtype, e_score_correction_bias [E] in bias_dtype)`` as numpy arrays."""
    if distribution not in _GENERATORS:
        raise ValueError(f"distribution={distribution!r} is unknown: allowed {', '.join(DISTRIBUTIONS)}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} is out of range: allowed num_tokens >= 0")
    rng = np.random.default_rng([seed, num_tokens, config.num_experts, DISTRIBUTIONS.index(distribution)])
    x, bias = _GENERATORS[distribution](rng, num_tokens, config.num_experts)
    return x.astype(numpy_dtype(dtype)), bias.astype(numpy_dtype(bias_dtype))
