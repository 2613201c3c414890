"""GPU paths (``fused``, ``two_kernel``, ``fused_block``) on the H100 through torch tensors."""

from __future__ import annotations

import numpy as np
import pytest

from harness.inputs import DISTRIBUTIONS, generate_input
from op.configs import PRESETS, STRESS
from op.testing import assert_routing_close, compare_routing

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

from op import (  # noqa: E402
    api,
    cast_sigmoid_bias,
    fused_block_grouped_topk,
    grouped_topk,
    noaux_tc,
    two_kernel_grouped_topk,
)
from op.build import library  # noqa: E402

PATHS = {"fused": grouped_topk, "two_kernel": two_kernel_grouped_topk, "fused_block": fused_block_grouped_topk}


def to_device(array):
    t = torch.from_numpy(array.astype(np.float32) if array.dtype.name == "bfloat16" else array)
    return (t.to(torch.bfloat16) if array.dtype.name == "bfloat16" else t).cuda()


def poisoned_outputs(rows, config, generator, index_dtype=torch.int64):
    """Random garbage in every output, so an element a kernel forgets to write fails the comparison."""
    scores = torch.randn((rows, config.num_experts), generator=generator, device="cuda")
    values = torch.randn((rows, config.top_k), generator=generator, device="cuda")
    ids = torch.randint(-(2**20), 2**20, (rows, config.top_k), generator=generator, device="cuda").to(index_dtype)
    return scores, values, ids


def run_all_paths(config, x, bias, seed, **kwargs):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    results = {}
    for name, path in PATHS.items():
        out = poisoned_outputs(x.shape[0], config, generator)
        results[name] = path(x, bias, *config.args(), out=out, **kwargs)
    return results


def assert_bit_identical(results):
    (first, base), *rest = results.items()
    for name, other in rest:
        for a, b, what in zip(base, other, ("scores", "topk_values", "topk_indices"), strict=True):
            if a is None:
                continue
            same = (
                torch.equal(a.view(torch.int32), b.view(torch.int32)) if a.dtype == torch.float32 else torch.equal(a, b)
            )
            assert same, f"{what} of {name} differs bitwise from {first}"


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 1000, 4096, 65536])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_against_reference(name, dtype, num_tokens, distribution, seed):
    config = PRESETS[name]
    x, bias = generate_input(config, num_tokens, dtype, seed, distribution)
    results = run_all_paths(config, to_device(x), to_device(bias), seed)
    assert_bit_identical(results)
    assert_routing_close(results["fused"], x, bias, config)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("num_tokens", [1, 77, 3000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(STRESS))
def test_stress_configs_against_reference(name, dtype, num_tokens, distribution, seed):
    config = STRESS[name]
    x, bias = generate_input(config, num_tokens, dtype, seed, distribution)
    results = run_all_paths(config, to_device(x), to_device(bias), seed)
    assert_bit_identical(results)
    assert_routing_close(results["fused"], x, bias, config)


@pytest.mark.parametrize(
    "num_experts,n_group,topk_group,top_k", [(999, 3, 2, 5), (200, 5, 2, 7), (34, 2, 1, 3), (2, 1, 1, 1)]
)
def test_unaligned_layouts(num_experts, n_group, topk_group, top_k, seed):
    from op.configs import RoutingConfig

    config = RoutingConfig(num_experts, n_group, topk_group, top_k, True, 1.25)
    for dtype in ("float32", "bfloat16"):
        x, bias = generate_input(config, 257, dtype, seed, "randn")
        results = run_all_paths(config, to_device(x), to_device(bias), seed)
        assert_bit_identical(results)
        assert_routing_close(results["fused"], x, bias, config)


@pytest.mark.parametrize("bias_dtype", ["float32", "bfloat16", "float16"])
def test_bias_in_each_float_dtype(bias_dtype, seed):
    config = PRESETS["deepseek_v3"]
    x, bias = generate_input(config, 500, "bfloat16", seed, "router_like", bias_dtype=bias_dtype)
    results = run_all_paths(config, to_device(x), to_device(bias).reshape(1, -1), seed)
    assert_bit_identical(results)
    assert_routing_close(results["fused"], x, bias, config)


def test_subnormal_scores_keep_their_weights(seed):
    # Logits in [-88.5, -87.5]: every s is subnormal (below 2^-126) while 1 + exp(-x) stays finite, so the
    # weights s / (sum + 1e-20) are about 1e-19 and a reciprocal that flushes subnormal results zeroes them.
    config = PRESETS["deepseek_v3"]
    rng = np.random.default_rng(seed)
    x = rng.uniform(-88.5, -87.5, size=(300, config.num_experts)).astype(np.float32)
    bias = (rng.standard_normal(config.num_experts) * 0.1).astype(np.float32)
    results = run_all_paths(config, to_device(x), to_device(bias), seed)
    assert_bit_identical(results)
    assert (results["fused"][1] > 0).all()
    assert_routing_close(results["fused"], x, bias, config)


def test_offset_view_uses_the_narrow_load_path(seed):
    config = PRESETS["glm45_air"]
    x, bias = generate_input(config, 65, "bfloat16", seed)
    flat = torch.cat([torch.zeros(1, dtype=torch.bfloat16), to_device(x).reshape(-1).cpu()]).cuda()
    shifted = flat[1:].view(65, 128)  # 2-byte offset: not 16-byte aligned
    assert shifted.data_ptr() % 16 != 0
    results = run_all_paths(config, shifted, to_device(bias), seed)
    assert_bit_identical(results)
    assert_routing_close(results["fused"], x, bias, config)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_num_tokens_leaves_later_rows_untouched(path, seed):
    config = PRESETS["deepseek_v3"]
    x, bias = generate_input(config, 300, "bfloat16", seed)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    out = poisoned_outputs(300, config, generator)
    before = [t.clone() for t in out]
    n = torch.tensor([123], dtype=torch.int32, device="cuda")
    PATHS[path](to_device(x), to_device(bias), *config.args(), num_tokens=n, out=out)
    for after, old in zip(out, before, strict=True):
        assert torch.equal(after[123:], old[123:])
    assert_routing_close(tuple(t[:123] for t in out), x[:123], bias, config)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_int32_ids_and_no_scores(path, seed):
    config = PRESETS["kimi_k2"]
    x, bias = generate_input(config, 200, "bfloat16", seed)
    scores, values, ids = PATHS[path](
        to_device(x), to_device(bias), *config.args(), index_dtype="int32", return_scores=False
    )
    assert scores is None and ids.dtype == torch.int32
    assert_routing_close((None, values, ids), x, bias, config)


def test_side_stream_without_synchronisation(seed):
    """A launch on the caller's side stream must queue behind that stream's work and be read there.

    The side stream first sleeps, then overwrites the input with the real logits, then routes. A library that
    launched on another stream would route the stale input (poison) before the copy lands; reading the results
    on the side stream, with nothing synchronising the default stream, leaves no other ordering to hide it.
    """
    config = PRESETS["deepseek_v3"]
    x, bias = generate_input(config, 8192, "bfloat16", seed)
    stale, _ = generate_input(config, 8192, "bfloat16", seed + 1)
    xd, bd = to_device(stale), to_device(bias)
    fresh = to_device(x)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        xd.copy_(fresh, non_blocking=True)
        outputs = {
            "fused": grouped_topk(xd, bd, *config.args()),
            "two_kernel": two_kernel_grouped_topk(xd, bd, *config.args()),
            "fused_block": fused_block_grouped_topk(xd, bd, *config.args()),
        }
        host = {name: tuple(t.to("cpu", non_blocking=False) for t in out) for name, out in outputs.items()}
    stream.synchronize()
    for name, out in host.items():
        result = compare_routing(out, x, bias, config)
        assert result.ok, f"{name}: {result.first_failure}"
    assert_bit_identical(host)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_cuda_graph_replay_equals_eager(path, seed):
    config = PRESETS["deepseek_v3"]
    x, bias = generate_input(config, 1000, "bfloat16", seed)
    static_x, static_b = to_device(x), to_device(bias)
    eager = PATHS[path](static_x, static_b, *config.args())
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        PATHS[path](static_x, static_b, *config.args())
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = PATHS[path](static_x, static_b, *config.args())
    x2, _ = generate_input(config, 1000, "bfloat16", seed + 1)
    static_x.copy_(to_device(x2))
    graph.replay()
    torch.cuda.synchronize()
    assert_routing_close(captured, x2, bias, config)
    static_x.copy_(to_device(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_bit_identical({"eager": eager, "graph": captured})


def test_fused_is_exactly_one_kernel_launch(seed):
    config = PRESETS["deepseek_v3"]
    x, bias = generate_input(config, 4096, "bfloat16", seed)
    xd, bd = to_device(x), to_device(bias)
    grouped_topk(xd, bd, *config.args())
    torch.cuda.synchronize()
    for path, expected in (("fused", 1), ("two_kernel", 2), ("fused_block", 1)):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        out = poisoned_outputs(4096, config, generator)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                PATHS[path](xd, bd, *config.args(), out=out)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 3 * expected, f"{path}: {[e.name for e in kernels]}"


@pytest.mark.parametrize("num_tokens", [1, 333, 5000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2", "x_e160_g8", "x_e512_k32"])
def test_two_kernel_in_one_call_equals_its_public_kernels_called_apart(name, dtype, num_tokens, seed):
    """``two_kernel_grouped_topk`` launches both kernels from one library call; its bits are those of
    ``cast_sigmoid_bias`` then ``noaux_tc``, each its own call, and those of ``fused``."""
    config = {**PRESETS, **STRESS}[name]
    x, bias = generate_input(config, num_tokens, dtype, seed, "router_like")
    xd, bd = to_device(x), to_device(bias)
    scores, biased = cast_sigmoid_bias(xd, bd)
    apart = noaux_tc(scores, biased, *config.args())
    assert apart[0] is scores
    generator = torch.Generator(device="cuda").manual_seed(seed)
    into = poisoned_outputs(num_tokens, config, generator)
    results = {
        "cast_sigmoid_bias then noaux_tc": apart,
        "two_kernel": two_kernel_grouped_topk(xd, bd, *config.args()),
        "two_kernel into poisoned outputs": two_kernel_grouped_topk(xd, bd, *config.args(), out=into),
        "fused": grouped_topk(xd, bd, *config.args()),
    }
    assert_bit_identical(results)
    assert_routing_close(apart, x, bias, config)


def test_two_kernel_crosses_into_the_library_once_per_call(monkeypatch, seed):
    crossings = []

    class Recording:
        def __getattr__(self, name):
            entry = getattr(library(), name)

            def call(*args):
                crossings.append(name)
                return entry(*args)

            return call

    monkeypatch.setattr(api, "_plans", {})
    monkeypatch.setattr(api, "library", Recording)
    # Counted on the tvm-ffi path; the torch extension's call is one library call by construction.
    monkeypatch.setenv("FUSEDGATE_TORCH_CALL", "0")
    config = PRESETS["deepseek_v3"]
    x, bias = generate_input(config, 64, "bfloat16", seed)
    xd, bd = to_device(x), to_device(bias)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for _ in range(3):
        two_kernel_grouped_topk(xd, bd, *config.args())
        two_kernel_grouped_topk(xd, bd, *config.args(), out=poisoned_outputs(64, config, generator))
        two_kernel_grouped_topk(xd, bd, *config.args(), return_scores=False)
    assert crossings == ["two_kernel_grouped_topk"] * 9


def _two_kernel_arguments(config, rows, seed) -> dict:
    """Every argument of the library's ``two_kernel_grouped_topk``, valid, its outputs holding random garbage."""
    x, bias = generate_input(config, rows, "bfloat16", seed)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scores, values, ids = poisoned_outputs(rows, config, generator)
    return {
        "logits": to_device(x),
        "bias": to_device(bias),
        "scores": scores,
        "biased": torch.randn((rows, config.num_experts), generator=generator, device="cuda"),
        "values": values,
        "indices": ids,
        "num_tokens": torch.tensor([rows], dtype=torch.int32, device="cuda"),
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "top_k": config.top_k,
        "renormalize": config.renormalize,
        "scale": config.routed_scaling_factor,
    }


def _assert_unwritten(tensors, before):
    torch.cuda.synchronize()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, before[name]), f"{name} was written by a refused call"


# Tensors given in place of a valid one are never smaller than it: were a check lost, the kernels would write
# within their memory and the missing ValueError alone would fail the test.
@pytest.mark.parametrize(
    ("argument", "make", "needle"),
    [
        ("top_k", lambda a: 33, r"top_k=33 is out of range: allowed 1 <= top_k <= 32"),
        ("topk_group", lambda a: 9, r"topk_group=9 is out of range: allowed 1 <= topk_group <= n_group=8"),
        ("n_group", lambda a: 3, r"n_group=3 does not divide num_experts=256"),
        ("bias", lambda a: torch.zeros(257, device="cuda"), r"e_score_correction_bias shape \[257\] does not match"),
        ("scores", lambda a: torch.zeros((65, 256), device="cuda"), r"scores must have shape \[64, 256\]"),
        ("biased", lambda a: torch.zeros((64, 260), device="cuda"), r"scores_with_bias must have shape \[64, 256\]"),
        ("biased", lambda a: a["biased"].double(), r"scores_with_bias has dtype float64, expected float32"),
        ("values", lambda a: torch.zeros((64, 9), device="cuda"), r"topk_values must have shape \[64, 8\]"),
        ("indices", lambda a: a["values"].clone(), r"topk_indices has dtype float32, expected int64 or int32"),
        ("num_tokens", lambda a: a["num_tokens"].long(), r"num_tokens has dtype int64, expected int32"),
    ],
)
def test_two_kernel_entry_refuses_a_bad_argument_before_queueing_either_kernel(argument, make, needle, seed):
    arguments = _two_kernel_arguments(PRESETS["deepseek_v3"], 64, seed)
    arguments[argument] = make(arguments)
    written = {name: arguments[name] for name in ("scores", "biased", "values", "indices")}
    before = {name: t.clone() for name, t in written.items()}
    with pytest.raises(ValueError, match=needle):
        library().two_kernel_grouped_topk(*arguments.values())
    _assert_unwritten(written, before)


def test_two_kernel_front_end_refusals_write_no_output(seed):
    """A ``topk_values`` of the wrong shape given through ``out=`` is refused by the library before kernel 1 writes
    the scores given with it; a ``top_k`` out of range is refused by the front end."""
    config = PRESETS["deepseek_v3"]
    x, bias = generate_input(config, 64, "bfloat16", seed)
    xd, bd = to_device(x), to_device(bias)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scores, values, ids = poisoned_outputs(64, config, generator)
    wide = torch.randn((64, 9), generator=generator, device="cuda")
    written = {"scores": scores, "topk_values": values, "wide topk_values": wide, "topk_indices": ids}
    before = {name: t.clone() for name, t in written.items()}
    with pytest.raises(ValueError, match=r"topk_values must have shape \[64, 8\]"):
        two_kernel_grouped_topk(xd, bd, *config.args(), out=(scores, wide, ids))
    with pytest.raises(ValueError, match="top_k=33 is out of range"):
        two_kernel_grouped_topk(xd, bd, 8, 4, 33, True, 2.5, out=(scores, values, ids))
    _assert_unwritten(written, before)


def test_num_threads_is_refused_for_cuda_tensors():
    """The thread count steers the C++ CPU kernel only; on CUDA tensors it is an error, not silently ignored."""
    x = torch.zeros((4, 256), device="cuda")
    with pytest.raises(ValueError, match="num_threads is supported for CPU tensors only"):
        grouped_topk(x, torch.zeros(256, device="cuda"), 8, 4, 8, True, 1.0, num_threads=2)
