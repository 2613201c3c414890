"""Shared fixtures: recorded seeds, and the skip rules for GPU and Paddle-GPU tests."""

from __future__ import annotations

import os
import random
import zlib
from functools import cache

import pytest

# One base seed per run, fresh unless FUSEDGATE_SEED pins it; every test derives its own from it.
BASE_SEED = int(os.environ.get("FUSEDGATE_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"fusedgate base seed: {BASE_SEED} (rerun with FUSEDGATE_SEED={BASE_SEED})"


@pytest.fixture
def seed(request) -> int:
    """A seed unique to this test and run, printed with any failure of the test."""
    value = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"seed={seeds[0]} FUSEDGATE_SEED={BASE_SEED}"))
    return report


@cache
def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


@cache
def _paddle_gpu_reason() -> str | None:
    try:
        import paddle
    except ImportError:
        return "paddle is not installed"
    if not paddle.device.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        return "needs a Paddle GPU build (paddlepaddle-gpu) and a visible GPU"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, reason in (("gpu", _cuda_reason), ("paddle_gpu", _paddle_gpu_reason)):
            if marker in item.keywords and reason():
                item.add_marker(pytest.mark.skip(reason=reason()))
