"""The host side on a GPU: torch.compile (fullgraph, and reduce-overhead's CUDA graphs) of every entry point,
outputs cut from one allocation, launches under the tensor's device."""

from __future__ import annotations

import numpy as np
import pytest

from harness.inputs import generate_input
from op.configs import PRESETS, STRESS
from op.testing import assert_routing_close

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

import op  # noqa: E402

CONFIG = PRESETS["deepseek_v3"]
ROUTING = {
    "fused": op.grouped_topk,
    "two_kernel": op.two_kernel_grouped_topk,
    "fused_block": op.fused_block_grouped_topk,
}


def to_device(array, device="cuda"):
    t = torch.from_numpy(array.astype(np.float32) if array.dtype.name == "bfloat16" else array)
    return (t.to(torch.bfloat16) if array.dtype.name == "bfloat16" else t).to(device)


def fresh_compile():
    """Forget compiled graphs and the front end's plans, so that plans are built while the compiled function
    warms up and records its CUDA graphs, whatever ran before in this process: a plan that kept device memory
    alive there is refused by torch's CUDA-graph trees."""
    torch._dynamo.reset()
    op.api._plans.clear()


def assert_equal(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert (a is None and e is None) or torch.equal(a, e)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("return_scores", [True, False])
@pytest.mark.parametrize("path", sorted(ROUTING))
def test_compiled_routing_equals_eager(path, return_scores, mode, seed):
    fresh_compile()
    route = ROUTING[path]

    def step(x, bias):
        scores, values, ids = route(x, bias, *CONFIG.args(), return_scores=return_scores)
        return scores, values * 2, ids

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for i in range(4):  # reduce-overhead records its CUDA graph after warm-up calls, then replays it
        x, bias = generate_input(CONFIG, 64, "bfloat16", seed + i)
        xd, bd = to_device(x), to_device(bias)
        actual = [None if t is None else t.clone() for t in compiled(xd, bd)]
        assert_equal(actual, step(xd, bd))


def test_compiled_two_kernel_entry_points_equal_eager(seed):
    fresh_compile()

    def step(x, bias):
        scores, biased = op.cast_sigmoid_bias(x, bias)
        return op.noaux_tc(scores, biased, *CONFIG.args())

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for i in range(4):
        x, bias = generate_input(CONFIG, 64, "bfloat16", seed + i)
        xd, bd = to_device(x), to_device(bias)
        actual = [t.clone() for t in compiled(xd, bd)]
        assert_equal(actual, step(xd, bd))


@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
@pytest.mark.parametrize("path", sorted(ROUTING))
def test_outputs_from_one_allocation_are_aligned_and_separate(path, index_dtype, seed):
    config = STRESS["x_e72"]  # 72 experts: rows of 288 bytes, K = 8
    x, bias = generate_input(config, 5, "float32", seed)
    scores, values, ids = ROUTING[path](to_device(x), to_device(bias), *config.args(), index_dtype=index_dtype)
    for t in (scores, values, ids):
        assert t.is_contiguous() and t.data_ptr() % 16 == 0
    assert_routing_close((scores.cpu(), values.cpu(), ids.cpu()), x, bias, config)


def test_a_tensor_on_the_current_device_routes(seed):
    x, bias = generate_input(CONFIG, 33, "bfloat16", seed)
    device = torch.device("cuda", torch.cuda.current_device())
    result = op.grouped_topk(to_device(x, device), to_device(bias, device), *CONFIG.args())
    assert_routing_close(tuple(t.cpu() for t in result), x, bias, CONFIG)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs (one or none visible)"
)
@pytest.mark.parametrize("path", sorted(ROUTING))
def test_a_tensor_on_another_device_launches_there(path, seed):
    x, bias = generate_input(CONFIG, 4096, "bfloat16", seed)
    other = torch.device("cuda", 1)
    xd, bd = to_device(x, other), to_device(bias, other)
    torch.cuda.set_device(0)
    # Device 0 is current while the tensors (and the stream torch hands over) belong to device 1: a launch not
    # guarded onto device 1 fails or races.
    result = ROUTING[path](xd, bd, *CONFIG.args())
    torch.cuda.synchronize(other)
    assert torch.cuda.current_device() == 0
    assert all(t.device == other for t in result)
    assert_routing_close(tuple(t.cpu() for t in result), x, bias, CONFIG)
