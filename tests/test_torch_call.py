"""The torch extension behind the front-end's torch calls (op/torch_call.py): built here, taken by every eager
torch call that allocates, equal to the tvm-ffi path it replaces, its outputs torch's own tensors, and every
refusal raised as the library's or the front-end's error."""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time

import numpy as np
import pytest

from harness.inputs import generate_input
from op import api, cast_sigmoid_bias, grouped_topk, noaux_tc, torch_call, two_kernel_grouped_topk
from op.configs import PRESETS
from op.testing import assert_routing_close

torch = pytest.importorskip("torch")

DEEPSEEK = PRESETS["deepseek_v3"]


@pytest.fixture(autouse=True)
def own_plans(monkeypatch):
    """Each test starts with no plans, so the plans it looks up are its own: the shared table is cleared whenever
    it fills, which other tests in the same worker may make happen at any call."""
    monkeypatch.setattr(api, "_plans", {})


@contextlib.contextmanager
def tvm_ffi_path(monkeypatch):
    """Calls inside take the tvm-ffi path with outputs allocated in Python; the plans of either path stay apart."""
    saved = dict(api._plans)
    api._plans.clear()
    monkeypatch.setenv("FUSEDGATE_TORCH_CALL", "0")
    try:
        yield
    finally:
        monkeypatch.delenv("FUSEDGATE_TORCH_CALL")
        api._plans.clear()
        api._plans.update(saved)


def torch_input(config, tokens, dtype, seed, device="cpu"):
    x, bias = generate_input(config, tokens, "float32", seed)
    cast = getattr(torch, dtype)
    return torch.from_numpy(x).to(device, cast), torch.from_numpy(bias).to(device, cast)


def plan_of(call_name: str):
    """The newest plan of the entry point ``call_name`` (plans are kept in insertion order)."""
    return [plan for key, plan in api._plans.items() if key[0] == call_name][-1]


def is_extension_call(plan) -> bool:
    return isinstance(plan, functools.partial) and plan.func is torch_call._module().call


def assert_equal_outputs(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            assert a.dtype == e.dtype and a.shape == e.shape and a.device == e.device
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_the_extension_builds_here_and_serves_torch_cpu_calls(seed):
    assert torch_call.unavailable_reason() is None
    x, bias = torch_input(DEEPSEEK, 3, "bfloat16", seed)
    grouped_topk(x, bias, *DEEPSEEK.args())
    assert is_extension_call(plan_of("fused_grouped_topk"))


@pytest.mark.parametrize("preset", ["deepseek_v3", "kimi_k2", "glm45_air"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("return_scores", [True, False])
@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
def test_cpu_calls_equal_the_tvm_ffi_path_and_the_reference(
    monkeypatch, seed, preset, tokens, dtype, return_scores, index_dtype
):
    config = PRESETS[preset]
    x, bias = torch_input(config, tokens, dtype, seed)
    kwargs = {"return_scores": return_scores, "index_dtype": index_dtype}
    got = grouped_topk(x, bias, *config.args(), **kwargs)
    with tvm_ffi_path(monkeypatch):
        expected = grouped_topk(x, bias, *config.args(), **kwargs)
    assert_equal_outputs(got, expected)
    assert_routing_close(got, x.float().numpy(), bias.float().numpy(), config)


def test_outputs_are_fresh_contiguous_tensors_of_torch_s_own_allocator(seed):
    x, bias = torch_input(DEEPSEEK, 5, "bfloat16", seed)
    first = grouped_topk(x, bias, *DEEPSEEK.args())
    second = grouped_topk(x, bias, *DEEPSEEK.args())
    pointers = {t.data_ptr() for t in (*first, *second)}
    assert len(pointers) == 6
    for tensor in first:
        assert tensor.is_contiguous() and not tensor.requires_grad
        # A tensor borrowed from another owner (DLPack) has a storage torch cannot resize.
        assert tensor.untyped_storage().resizable()
    scores, values, ids = first
    assert (scores.dtype, values.dtype, ids.dtype) == (torch.float32, torch.float32, torch.int64)
    assert scores.shape == (5, 256) and values.shape == ids.shape == (5, 8)


def test_a_refusal_of_the_library_is_its_error_and_the_plan_serves_on(seed):
    x, bias = torch_input(DEEPSEEK, 4, "float32", seed)
    expected = grouped_topk(x, bias, *DEEPSEEK.args())
    # The bias's shape, dtype and contiguity are left out of a plan's key: the library refuses them per call.
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        grouped_topk(x, bias[:128], *DEEPSEEK.args())
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        grouped_topk(x, bias.repeat(2)[::2], *DEEPSEEK.args())
    with pytest.raises(ValueError, match="e_score_correction_bias dtype"):
        grouped_topk(x, bias.double(), *DEEPSEEK.args())
    assert_equal_outputs(grouped_topk(x, bias, *DEEPSEEK.args()), expected)


def test_a_plan_call_refuses_what_is_not_a_torch_tensor(seed):
    x, bias = torch_input(DEEPSEEK, 2, "float32", seed)
    grouped_topk(x, bias, *DEEPSEEK.args())
    plan = plan_of("fused_grouped_topk")
    with pytest.raises(ValueError, match="e_score_correction_bias must be a torch tensor, got numpy.ndarray"):
        plan(x, bias.numpy(), None, None)
    with pytest.raises(ValueError, match="gating_output must be a torch tensor, got NoneType"):
        plan(None, bias, None, None)
    with pytest.raises(TypeError, match="takes 4 inputs, got 3"):
        plan(x, bias, None)


def test_large_cpu_calls_let_other_threads_run(seed):
    """A call above the GIL threshold releases it for the kernel: a thread woken just before the call runs Python
    in the call's first half. A switch interval far longer than the call keeps the interpreter from handing the
    GIL over on its own; a call that kept it let that thread run only as the call ended."""
    config = PRESETS["kimi_k2"]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1 << 18, config.num_experts), generator=generator).to(torch.bfloat16)
    bias = torch.randn(config.num_experts, generator=generator).to(torch.bfloat16)

    def route():
        grouped_topk(x, bias, *config.args(), num_threads=1, return_scores=False)

    route()
    go, woke = threading.Event(), []

    def other():
        go.wait()
        woke.append(time.perf_counter())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    thread = threading.Thread(target=other)
    try:
        thread.start()
        go.set()
        started = time.perf_counter()
        route()
        finished = time.perf_counter()
    finally:
        go.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert finished - started < 1.0, "the call must stay well inside the switch interval"
    assert started < woke[0] < started + (finished - started) / 2


def test_the_tvm_ffi_path_serves_when_the_extension_is_off(monkeypatch, seed):
    x, bias = torch_input(DEEPSEEK, 4, "bfloat16", seed)
    with tvm_ffi_path(monkeypatch):
        assert torch_call.unavailable_reason() == "FUSEDGATE_TORCH_CALL=0"
        got = grouped_topk(x, bias, *DEEPSEEK.args())
        assert not is_extension_call(plan_of("fused_grouped_topk"))
    assert_routing_close(got, x.float().numpy(), bias.float().numpy(), DEEPSEEK)


def test_a_failed_build_leaves_the_tvm_ffi_path_with_its_reason(monkeypatch, tmp_path, seed):
    monkeypatch.setenv("FUSEDGATE_CACHE", str(tmp_path))
    monkeypatch.setattr(torch_call, "_compiler", lambda: None)
    torch_call._module.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert torch_call.unavailable_reason() == "no C++ compiler found (set $CXX)"
        assert torch_call.plan("fused_grouped_topk", torch.device("cpu"), [], [], [], []) is None
    finally:
        torch_call._module.cache_clear()


def test_two_kernel_entry_points_take_the_extension_on_cuda_only(seed):
    """The two-kernel path runs on CUDA tensors alone: on the CPU its entry points refuse before any plan."""
    x, bias = torch_input(DEEPSEEK, 2, "float32", seed)
    for call in (
        lambda: two_kernel_grouped_topk(x, bias, *DEEPSEEK.args()),
        lambda: cast_sigmoid_bias(x, bias),
        lambda: noaux_tc(x, x.clone(), *DEEPSEEK.args()),
    ):
        with pytest.raises(ValueError, match="CUDA tensors only"):
            call()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["deepseek_v3", "kimi_k2", "glm45_air"])
@pytest.mark.parametrize("tokens", [1, 33, 4096])
@pytest.mark.parametrize("return_scores", [True, False])
@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
def test_cuda_calls_of_every_entry_point_equal_the_tvm_ffi_path(
    monkeypatch, seed, preset, tokens, return_scores, index_dtype
):
    config = PRESETS[preset]
    x, bias = torch_input(config, tokens, "bfloat16", seed, "cuda")
    count = torch.tensor([max(tokens - 1, 1)], dtype=torch.int32, device="cuda")
    kwargs = {"index_dtype": index_dtype}

    def every_call():
        scores, biased = cast_sigmoid_bias(x, bias)
        return [
            grouped_topk(x, bias, *config.args(), return_scores=return_scores, **kwargs),
            grouped_topk(x, bias, *config.args(), return_scores=return_scores, num_tokens=count, **kwargs),
            api.fused_block_grouped_topk(x, bias, *config.args(), return_scores=return_scores, **kwargs),
            two_kernel_grouped_topk(x, bias, *config.args(), return_scores=return_scores, **kwargs),
            (scores, biased),
            noaux_tc(scores.clone(), biased, *config.args(), **kwargs),
        ]

    got = every_call()
    for name in ("fused_grouped_topk", "fused_block_grouped_topk", "two_kernel", "cast_sigmoid_bias", "noaux_tc"):
        assert is_extension_call(plan_of(name)), name
    with tvm_ffi_path(monkeypatch):
        expected = every_call()
    # Rows at or past num_tokens are left untouched (fresh memory either way): compare the rows both wrote.
    written = int(count.item())
    got[1] = [None if t is None else t[:written] for t in got[1]]
    expected[1] = [None if t is None else t[:written] for t in expected[1]]
    for a, e in zip(got, expected, strict=True):
        assert_equal_outputs(a, e)
    assert_routing_close(got[0], x.float().cpu().numpy(), bias.float().cpu().numpy(), config)


@pytest.mark.gpu
def test_cuda_calls_launch_on_torch_s_current_stream_and_are_captured(seed):
    x, bias = torch_input(DEEPSEEK, 16, "bfloat16", seed, "cuda")
    expected = [t.cpu() for t in grouped_topk(x, bias, *DEEPSEEK.args())]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The side stream waits on a long kernel first: were the call queued on another stream, it would read
        # the logits before they are written.
        torch.cuda._sleep(20_000_000)
        fresh = torch.empty_like(x)
        fresh.copy_(x)
        got = grouped_topk(fresh, bias, *DEEPSEEK.args())
    torch.cuda.synchronize()
    assert_equal_outputs([t.cpu() for t in got], expected)

    graph = torch.cuda.CUDAGraph()
    static = x.clone()
    grouped_topk(static, bias, *DEEPSEEK.args())
    with torch.cuda.graph(graph):
        captured = grouped_topk(static, bias, *DEEPSEEK.args())
    nxt, _ = torch_input(DEEPSEEK, 16, "bfloat16", seed + 1, "cuda")
    static.copy_(nxt)
    graph.replay()
    torch.cuda.synchronize()
    assert_equal_outputs(captured, grouped_topk(nxt, bias, *DEEPSEEK.args()))


@pytest.mark.gpu
def test_cuda_outputs_take_record_stream_and_refusals_name_the_argument(seed):
    x, bias = torch_input(DEEPSEEK, 4, "bfloat16", seed, "cuda")
    scores, values, ids = grouped_topk(x, bias, *DEEPSEEK.args())
    assert scores.untyped_storage().resizable()
    side = torch.cuda.Stream()
    values.record_stream(side)
    # The outputs come from torch's caching allocator, which counts them.
    big, big_bias = torch_input(DEEPSEEK, 4096, "bfloat16", seed, "cuda")
    grouped_topk(big, big_bias, *DEEPSEEK.args())
    before = torch.cuda.memory_allocated()
    kept = grouped_topk(big, big_bias, *DEEPSEEK.args())
    assert torch.cuda.memory_allocated() - before >= sum(t.numel() * t.element_size() for t in kept)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        grouped_topk(x, bias.cpu(), *DEEPSEEK.args())
    grouped_topk(x, bias, *DEEPSEEK.args(), num_tokens=torch.tensor([2], dtype=torch.int32, device="cuda"))
    plan = plan_of("fused_grouped_topk")
    with pytest.raises(ValueError, match="num_tokens must be a torch tensor, got int"):
        plan(x, bias, 2, None)
    with pytest.raises(ValueError, match="num_tokens"):
        grouped_topk(x, bias, *DEEPSEEK.args(), num_tokens=torch.tensor([2], dtype=torch.int64, device="cuda"))
    np.testing.assert_array_equal(ids.cpu().numpy(), grouped_topk(x, bias, *DEEPSEEK.args())[2].cpu().numpy())


@pytest.mark.gpu
def test_under_deterministic_algorithms_untouched_rows_hold_torch_s_fill(seed):
    """With torch asked to fill fresh memory, rows at or past num_tokens hold that fill (NaN), as from torch.empty."""
    x, bias = torch_input(DEEPSEEK, 6, "bfloat16", seed, "cuda")
    count = torch.tensor([4], dtype=torch.int32, device="cuda")
    expected = grouped_topk(x[:4].contiguous(), bias, *DEEPSEEK.args())
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        scores, values, ids = grouped_topk(x, bias, *DEEPSEEK.args(), num_tokens=count)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.isnan(scores[4:]).all() and torch.isnan(values[4:]).all()
    assert_equal_outputs((scores[:4], values[:4], ids[:4]), expected)
