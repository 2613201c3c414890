"""Both framework composites against the reference, through the alignment checker."""

from __future__ import annotations

import numpy as np
import pytest

from harness.inputs import DISTRIBUTIONS, generate_input
from op.configs import ALL_CONFIGS
from op.testing import assert_routing_close

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
from op.composite import composite_paddle, composite_torch  # noqa: E402


def _torch_tensor(array):
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(array)


def _paddle_tensor(array):
    if array.dtype.name == "bfloat16":
        return paddle.to_tensor(array.astype(np.float32)).astype("bfloat16")
    return paddle.to_tensor(array)


FRAMEWORKS = {"torch": (composite_torch, _torch_tensor), "paddle": (composite_paddle, _paddle_tensor)}


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_composite_matches_reference(framework, name, dtype, distribution, seed):
    route, tensor = FRAMEWORKS[framework]
    config = ALL_CONFIGS[name]
    x, bias = generate_input(config, 97, dtype, seed, distribution)
    out = route(tensor(x), tensor(bias), *config.args())
    assert_routing_close(out, x, bias, config)


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_composite_options(framework, seed):
    route, tensor = FRAMEWORKS[framework]
    config = ALL_CONFIGS["deepseek_v3"]
    x, bias = generate_input(config, 16, "float32", seed)
    scores, values, ids = route(tensor(x), tensor(bias), *config.args(), index_dtype="int32", return_scores=False)
    assert scores is None and "int32" in str(ids.dtype)
    empty = route(tensor(x[:0]), tensor(bias), *config.args())
    assert tuple(empty[0].shape) == (0, 256) and tuple(empty[2].shape) == (0, 8)
    with pytest.raises(ValueError, match="top_k=40"):
        route(tensor(x), tensor(bias), 8, 4, 40, True, 1.0)
