"""Every routing path under its one name, callable on numpy inputs, with the reason it is unavailable if it is.

The harness uses this registry for alignment and CPU timing; GPU timing keeps tensors on the device and calls
the op entry points directly (``harness.bench``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from op.configs import RoutingConfig

CPU_PATHS = ("reference", "cpu_kernel", "composite_torch", "composite_paddle")
GPU_PATHS = ("fused", "two_kernel", "fused_block", "composite_torch_cuda")


@cache
def cuda_reason() -> str | None:
    """None where a CUDA GPU is usable through torch, else why not."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"


def _torch(array: np.ndarray, device: str):
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _paddle(array: np.ndarray):
    import paddle

    if array.dtype.name == "bfloat16":
        return paddle.to_tensor(array.astype(np.float32)).astype("bfloat16")
    return paddle.to_tensor(array)


@dataclass(frozen=True)
class Path:
    name: str
    device: str
    run: Callable[[np.ndarray, np.ndarray, RoutingConfig], tuple]
    needs: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        for module in self.needs:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        return cuda_reason() if self.device == "cuda" else None


def _reference(x, bias, config):
    from op import reference

    return reference.grouped_topk(x, bias, *config.args())


def _cpu_kernel(x, bias, config):
    from op import grouped_topk

    return grouped_topk(x, bias, *config.args())


def _composite_torch(device):
    def run(x, bias, config):
        from op.composite import composite_torch

        return composite_torch(_torch(x, device), _torch(bias, device), *config.args())

    return run


def _composite_paddle(x, bias, config):
    from op.composite import composite_paddle

    return composite_paddle(_paddle(x), _paddle(bias), *config.args())


def _gpu_entry(attribute):
    def run(x, bias, config):
        import op

        return getattr(op, attribute)(_torch(x, "cuda"), _torch(bias, "cuda"), *config.args())

    return run


PATHS: dict[str, Path] = {
    "reference": Path("reference", "cpu", _reference),
    "cpu_kernel": Path("cpu_kernel", "cpu", _cpu_kernel),
    "composite_torch": Path("composite_torch", "cpu", _composite_torch("cpu"), ("torch",)),
    "composite_paddle": Path("composite_paddle", "cpu", _composite_paddle, ("paddle",)),
    "fused": Path("fused", "cuda", _gpu_entry("grouped_topk"), ("torch",)),
    "two_kernel": Path("two_kernel", "cuda", _gpu_entry("two_kernel_grouped_topk"), ("torch",)),
    "fused_block": Path("fused_block", "cuda", _gpu_entry("fused_block_grouped_topk"), ("torch",)),
    "composite_torch_cuda": Path("composite_torch_cuda", "cuda", _composite_torch("cuda"), ("torch",)),
}
