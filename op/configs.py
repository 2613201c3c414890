"""Routing configurations: the model presets, the stress configs, and the limits every path enforces."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

MAX_EXPERTS = 1024
MAX_GROUPS = 32
MAX_TOP_K = 32


def _require_int(name: str, value: object) -> int:
    # numpy integer scalars are Integral; bool (and numpy's bool, which is not) are refused.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def validate_routing(
    num_experts: int,
    n_group: int,
    topk_group: int,
    top_k: int,
    routed_scaling_factor: float = 1.0,
) -> None:
    """Raise ``ValueError`` naming the argument, its value and the allowed range for any limit broken."""
    num_experts = _require_int("num_experts", num_experts)
    n_group = _require_int("n_group", n_group)
    topk_group = _require_int("topk_group", topk_group)
    top_k = _require_int("top_k", top_k)
    if not 2 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts={num_experts} is out of range: allowed 2 <= num_experts <= {MAX_EXPERTS}")
    if not 1 <= n_group <= MAX_GROUPS:
        raise ValueError(f"n_group={n_group} is out of range: allowed 1 <= n_group <= {MAX_GROUPS}")
    if num_experts % n_group != 0:
        raise ValueError(
            f"n_group={n_group} does not divide num_experts={num_experts}: "
            f"allowed n_group in [1, {MAX_GROUPS}] with num_experts % n_group == 0"
        )
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} is out of range: allowed 1 <= topk_group <= n_group={n_group}")
    experts_per_group = num_experts // n_group
    top_k_max = min(MAX_TOP_K, topk_group * experts_per_group)
    if not 1 <= top_k <= top_k_max:
        raise ValueError(
            f"top_k={top_k} is out of range: allowed 1 <= top_k <= min({MAX_TOP_K}, topk_group * "
            f"num_experts / n_group) = {top_k_max}"
        )
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, numbers.Real):
        raise ValueError(f"routed_scaling_factor must be a real number, got {routed_scaling_factor!r}")
    if not math.isfinite(routed_scaling_factor):
        raise ValueError(f"routed_scaling_factor={routed_scaling_factor} is out of range: allowed finite values")


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int
    n_group: int
    topk_group: int
    top_k: int
    renormalize: bool
    routed_scaling_factor: float

    def __post_init__(self) -> None:
        validate_routing(self.num_experts, self.n_group, self.topk_group, self.top_k, self.routed_scaling_factor)
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be a bool, got {self.renormalize!r}")

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    @property
    def scores_groups(self) -> bool:
        """Whether group scoring runs at all: with every group kept it cannot change the choice."""
        return self.topk_group < self.n_group

    def args(self) -> tuple[int, int, int, bool, float]:
        """The positional routing arguments after the two tensors, as every path takes them."""
        return self.n_group, self.topk_group, self.top_k, self.renormalize, self.routed_scaling_factor


PRESETS: dict[str, RoutingConfig] = {
    "deepseek_v3": RoutingConfig(256, 8, 4, 8, True, 2.5),
    "kimi_k2": RoutingConfig(384, 1, 1, 8, True, 2.827),
    "glm45_air": RoutingConfig(128, 1, 1, 8, True, 1.0),
    "glm45": RoutingConfig(160, 1, 1, 8, True, 2.5),
    "fd_qwen3_30b_a3b": RoutingConfig(128, 4, 2, 8, False, 1.0),
    "fd_kimi_k2": RoutingConfig(384, 8, 2, 8, False, 1.0),
}

STRESS: dict[str, RoutingConfig] = {
    "x_e72": RoutingConfig(72, 1, 1, 8, True, 1.0),
    "x_e160_g8": RoutingConfig(160, 8, 3, 6, True, 1.5),
    "x_g32": RoutingConfig(256, 32, 8, 8, True, 1.0),
    "x_e512_k32": RoutingConfig(512, 8, 4, 32, True, 2.0),
    "x_e1024": RoutingConfig(1024, 1, 1, 8, True, 1.0),
}

ALL_CONFIGS: dict[str, RoutingConfig] = {**PRESETS, **STRESS}


def get_config(name: str) -> RoutingConfig:
    try:
        return ALL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}: allowed {sorted(ALL_CONFIGS)}") from None
