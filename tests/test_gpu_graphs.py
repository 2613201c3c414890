"""GraphRunner on the GPU: replays equal eager calls bit for bit, padding is harmless, buckets don't alias."""

from __future__ import annotations

import random

import pytest

from graphs.buckets import bucket_list
from graphs.runner import GraphRunner
from op.configs import PRESETS

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

import op  # noqa: E402

EAGER = {"fused": op.grouped_topk, "two_kernel": op.two_kernel_grouped_topk}


def inputs(config, tokens, generator):
    x = torch.randn((tokens, config.num_experts), generator=generator, device="cuda").to(torch.bfloat16)
    bias = torch.randn(config.num_experts, generator=generator, device="cuda") * 0.1
    return x, bias


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        if a is None:
            assert e is None
            continue
        assert a.shape == e.shape
        view = torch.int32 if a.dtype == torch.float32 else a.dtype
        assert torch.equal(a.view(view), e.view(view))


@pytest.mark.parametrize("skip_padding", [True, False])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_token_count_up_to_1100_matches_eager(name, skip_padding, seed):
    config = PRESETS[name]
    runner = GraphRunner("fused", config, bucket_list("fastdeploy", 1024), "bfloat16", skip_padding=skip_padding)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for tokens in range(1, 1101):
        x, bias = inputs(config, tokens, generator)
        assert_same(runner(x, bias), op.grouped_topk(x, bias, *config.args()))


@pytest.mark.parametrize("path", ["fused", "two_kernel"])
@pytest.mark.parametrize("skip_padding", [True, False])
def test_large_token_counts_in_pow2_buckets(path, skip_padding, seed):
    config = PRESETS["deepseek_v3"]
    runner = GraphRunner(path, config, bucket_list("pow2"), "bfloat16", skip_padding=skip_padding)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    rng = random.Random(seed)
    for tokens in [1, 1025, 40000, 65536, 70000, *rng.sample(range(2, 70001), 12)]:
        x, bias = inputs(config, tokens, generator)
        assert_same(runner(x, bias), EAGER[path](x, bias, *config.args()))


def test_composite_torch_runner_matches_eager(seed):
    from op.composite import composite_torch

    config = PRESETS["glm45_air"]
    runner = GraphRunner("composite_torch", config, [1, 8, 64], "bfloat16")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for tokens in (1, 5, 64, 100):
        x, bias = inputs(config, tokens, generator)
        assert_same(runner(x, bias), composite_torch(x, bias, *config.args()))


def test_nan_padding_is_harmless_without_skip(seed):
    config = PRESETS["deepseek_v3"]
    runner = GraphRunner("fused", config, [64], "bfloat16", skip_padding=False)
    runner.static_logits.fill_(float("nan"))
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x, bias = inputs(config, 10, generator)
    assert_same(runner(x, bias), op.grouped_topk(x, bias, *config.args()))
    ids = runner._static_out[2][10:]
    assert ((ids >= 0) & (ids < config.num_experts)).all()
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all()


def test_interleaved_buckets_and_eager_calls_stay_right(seed):
    config = PRESETS["kimi_k2"]
    runners = [GraphRunner(p, config, [1, 16, 256], "bfloat16") for p in ("fused", "two_kernel")]
    generator = torch.Generator(device="cuda").manual_seed(seed)
    rng = random.Random(seed)
    for _ in range(60):
        runner = rng.choice(runners)
        tokens = rng.choice([1, 3, 16, 17, 200, 256, 300])
        x, bias = inputs(config, tokens, generator)
        got = runner(x, bias)
        expected = EAGER[runner.path](x, bias, *config.args())
        op.grouped_topk(x, bias, *config.args())
        assert_same(got, expected)


def test_runner_reports_capture_cost_and_validates():
    config = PRESETS["deepseek_v3"]
    runner = GraphRunner("fused", config, bucket_list("fastdeploy"), "bfloat16")
    stats = runner.stats()
    assert stats["buckets"] == len(bucket_list("fastdeploy")) and stats["capture_seconds"] > 0
    with pytest.raises(ValueError, match="shape"):
        runner(torch.zeros((4, 128), device="cuda", dtype=torch.bfloat16), torch.zeros(128, device="cuda"))
    with pytest.raises(ValueError, match="path="):
        GraphRunner("reference", config, [1], "bfloat16")


@pytest.mark.paddle_gpu
def test_paddle_runner_matches_eager(seed):
    import paddle

    config = PRESETS["deepseek_v3"]
    runner = GraphRunner("fused", config, [1, 8, 64], "bfloat16", framework="paddle")
    paddle.seed(seed)
    for tokens in (1, 7, 64, 65):
        x = paddle.randn([tokens, config.num_experts]).astype("bfloat16")
        bias = paddle.randn([config.num_experts]) * 0.1
        got = runner(x, bias)
        expected = op.grouped_topk(x, bias, *config.args())
        for a, e in zip(got, expected, strict=True):
            assert bool((a == e).all())


def deepseek_v3_runner(bucket, tokens, seed):
    """A deepseek_v3 runner of one bf16 bucket, with fresh logits of ``tokens`` rows and a bias from ``seed``."""
    config = PRESETS["deepseek_v3"]
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x, bias = inputs(config, tokens, generator)
    return config, GraphRunner("fused", config, [bucket], "bfloat16"), generator, x, bias


def test_bias_changes_between_calls_are_seen(seed):
    config, runner, generator, x, bias = deepseek_v3_runner(8, 8, seed)
    assert_same(runner(x, bias), op.grouped_topk(x, bias, *config.args()))
    bias.add_(torch.randn(256, generator=generator, device="cuda"))  # in place: same object, new version
    assert_same(runner(x, bias), op.grouped_topk(x, bias, *config.args()))
    other = torch.randn(256, generator=generator, device="cuda")
    assert_same(runner(x, other), op.grouped_topk(x, other, *config.args()))


def test_logits_of_another_dtype_or_on_the_host_are_converted_on_copy_in(seed):
    config, runner, _, x, bias = deepseek_v3_runner(16, 16, seed)
    expected = op.grouped_topk(x, bias, *config.args())
    # Each is refused by the library's copy and taken by torch's converting one.
    for logits in (x.float(), x.cpu(), x.t().contiguous().t()):
        assert_same(runner(logits, bias), expected)
        assert_same(runner(x, bias), expected)


def test_logits_already_in_the_runners_own_rows_are_routed_as_they_are(seed):
    config, runner, _, x, bias = deepseek_v3_runner(8, 5, seed)
    own = runner.static_logits[:5]
    own.copy_(x)
    assert_same(runner(own, bias), op.grouped_topk(x, bias, *config.args()))


def test_overlapping_rows_are_refused_before_anything_is_queued(seed):
    from op.build import library

    _, runner, _, x, _ = deepseek_v3_runner(8, 8, seed)
    runner.static_logits.copy_(x)
    for output in runner._outputs[8]:
        output.fill_(-7)
    torch.cuda.synchronize()
    graph_exec = runner._graphs[8].raw_cuda_graph_exec()
    with pytest.raises(ValueError, match="overlaps"):
        library().replay_rows(runner.static_logits[:4], runner.static_logits[2:6], graph_exec)
    torch.cuda.synchronize()
    # Neither the copy nor the replay ran.
    assert torch.equal(runner.static_logits, x)
    assert all(bool((output == -7).all()) for output in runner._outputs[8])


def host_buffers(config, count, with_scores):
    """Pinned host outputs of ``count`` rows: scores (or None), topk_values, topk_indices, filled with -7."""
    shapes = ((config.num_experts, torch.float32), (config.top_k, torch.float32), (config.top_k, torch.int64))
    buffers = [torch.full((count, width), -7, dtype=dtype, pin_memory=True) for width, dtype in shapes]
    return (buffers[0] if with_scores else None, buffers[1], buffers[2])


@pytest.mark.parametrize("with_scores", [True, False])
@pytest.mark.parametrize("count", [1, 5, 8, 13])
def test_a_batch_from_host_memory_matches_eager(count, with_scores, seed):
    config = PRESETS["deepseek_v3"]
    runner = GraphRunner("fused", config, [8, 16], "float32", return_scores=with_scores)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    event = torch.cuda.Event()
    event.record()
    for _ in range(2):  # fresh logits through one bound step: each call copies its rows in
        x, bias = inputs(config, count, generator)
        x = x.float()
        host_in = x.cpu().pin_memory()
        host_out = host_buffers(config, count, with_scores)
        step = runner.from_host(host_in, host_out, event)
        step(bias)
        event.synchronize()
        expected = op.grouped_topk(x, bias, *config.args(), return_scores=with_scores)
        assert_same(host_out, tuple(None if e is None else e.cpu() for e in expected))


def test_a_bound_host_step_sees_new_logits_and_bias_on_every_call(seed):
    config = PRESETS["deepseek_v3"]
    runner = GraphRunner("fused", config, [8], "float32")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    event = torch.cuda.Event()
    event.record()
    host_in = torch.empty((6, config.num_experts), pin_memory=True)
    host_out = host_buffers(config, 6, True)
    step = runner.from_host(host_in, host_out, event)
    for _ in range(3):
        x, bias = inputs(config, 6, generator)
        host_in.copy_(x.float().cpu())
        step(bias)
        event.synchronize()
        expected = op.grouped_topk(x.float(), bias, *config.args())
        assert_same(host_out, tuple(e.cpu() for e in expected))


def test_a_refused_host_call_queues_nothing(seed):
    config = PRESETS["deepseek_v3"]
    runner = GraphRunner("fused", config, [8], "float32")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x, bias = inputs(config, 8, generator)
    runner(x.float(), bias)
    event = torch.cuda.Event()
    event.record()
    torch.cuda.synchronize()
    before = [runner.static_logits.clone(), *(t.clone() for t in runner._outputs[8])]
    host_in = torch.randn((4, config.num_experts), generator=generator, device="cuda").cpu().pin_memory()
    # topk_values one row too many: refused by the library at the call, after the binding took it.
    scores, values, ids = host_buffers(config, 4, True)
    step = runner.from_host(host_in, (scores, torch.full((5, config.top_k), -7.0, pin_memory=True), ids), event)
    with pytest.raises(ValueError, match="topk_values host \\[5, 8\\] must have 4 rows"):
        step(bias)
    torch.cuda.synchronize()
    after = [runner.static_logits, *runner._outputs[8]]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert bool((scores == -7).all()) and bool((ids == -7).all())


def test_from_host_validates_its_buffers():
    config = PRESETS["deepseek_v3"]
    runner = GraphRunner("fused", config, [8], "float32", return_scores=False)
    event = torch.cuda.Event()
    with pytest.raises(ValueError, match="allowed 1..8"):
        runner.from_host(torch.empty((9, 256), pin_memory=True), host_buffers(config, 9, False), event)
    with pytest.raises(ValueError, match="return_scores=False"):
        runner.from_host(torch.empty((2, 256), pin_memory=True), host_buffers(config, 2, True), event)
    with pytest.raises(ValueError, match="record it once"):
        runner.from_host(torch.empty((2, 256), pin_memory=True), host_buffers(config, 2, False), event)
    event.record()
    on_device = torch.empty((2, 256), device="cuda")
    with pytest.raises(ValueError, match="must be in host memory"):
        runner.from_host(on_device, host_buffers(config, 2, False), event)(torch.zeros(256, device="cuda"))
