"""fusedgate's routing op: fused CUDA kernel, two-kernel path, C++ CPU kernel, numpy reference.

Importing this package loads no compiled code, torch or paddle: the kernel library loads on first call.
"""

from op import reference
from op.configs import PRESETS, STRESS, RoutingConfig

_KERNEL_ENTRY_POINTS = (
    "grouped_topk",
    "cast_sigmoid_bias",
    "noaux_tc",
    "two_kernel_grouped_topk",
    "fused_block_grouped_topk",
)

__all__ = [
    "PRESETS",
    "STRESS",
    "RoutingConfig",
    "cast_sigmoid_bias",
    "fused_block_grouped_topk",
    "grouped_topk",
    "noaux_tc",
    "reference",
    "two_kernel_grouped_topk",
]


def __getattr__(name: str):
    if name in _KERNEL_ENTRY_POINTS:
        from op import api

        # Bound here once, so later look-ups are plain module attributes, not a call of this function.
        value = globals()[name] = getattr(api, name)
        return value
    raise AttributeError(f"module 'op' has no attribute {name!r}")
