"""GraphRunner's own Python logic on the CPU, through a stand-in backend whose "graph" re-runs the captured call:
copy-in, one replay per call, the per-count view cache, bias change detection, num_tokens written on change."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import op  # noqa: E402
from graphs import runner as runner_module  # noqa: E402
from graphs.runner import GraphRunner  # noqa: E402
from harness.inputs import generate_input  # noqa: E402
from op.configs import PRESETS  # noqa: E402

CONFIG = PRESETS["deepseek_v3"]


class RecordingBackend:
    """torch CPU tensors; capture records the launch, replay runs it again; every copy and replay is counted."""

    name = "torch"

    def __init__(self) -> None:
        self.copies: list[int] = []
        self.replays = 0
        self.run_graphs = True

    def empty(self, shape, dtype):
        return torch.empty(tuple(shape), dtype=getattr(torch, dtype))

    def full(self, shape, value, dtype):
        return torch.full(tuple(shape), value, dtype=getattr(torch, dtype))

    def warm_up(self, fn):
        fn()

    def capture(self, fn):
        return fn, fn()

    def replay(self, graph):
        self.replays += 1
        if self.run_graphs:
            graph()

    def replayer(self, dst, graph):
        def copy_in_and_replay(src):
            self.copy(dst, src)
            self.replay(graph)

        return copy_in_and_replay

    def host_replayer(self, dst, graph, host_in, outputs, event):
        def copy_in_replay_copy_out():
            self.copy(dst, host_in)
            self.replay(graph)
            for host, device in outputs:
                if host is not None:
                    self.copy(host, device)
            event.record()

        return copy_in_replay_copy_out

    def synchronize(self):
        pass

    def memory_in_use(self):
        return 0

    def rows(self, tensor, count):
        return tensor[:count]

    def copy(self, dst, src):
        self.copies.append(dst.data_ptr())
        dst.copy_(src)


@pytest.fixture
def make_runner(monkeypatch):
    monkeypatch.setitem(runner_module._BACKENDS, "torch", RecordingBackend)

    def make(**kwargs):
        # The CPU kernel takes no device token count, so padding rows are computed (skip_padding=False).
        return GraphRunner("fused", CONFIG, [4, 8], "float32", skip_padding=False, **kwargs)

    return make


def fresh_input(tokens, seed):
    x, bias = generate_input(CONFIG, tokens, dtype="float32", seed=seed)
    return torch.from_numpy(x), torch.from_numpy(bias)


def assert_equal_to_eager(actual, x, bias):
    expected = op.grouped_topk(x, bias, *CONFIG.args())
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


def test_each_call_copies_the_new_input_in_and_replays_once(make_runner, seed):
    runner = make_runner()
    backend = runner._backend
    for step in range(3):
        x, bias = fresh_input(3, seed + step)
        replays = backend.replays
        result = runner(x, bias)
        assert backend.replays == replays + 1
        assert_equal_to_eager(result, x, bias)


def test_capture_holds_the_routing_launch_only(make_runner):
    runner = make_runner()
    # Construction copies nothing: copy-in happens per call, outside the captured work.
    assert runner._backend.copies == []


def test_views_are_cached_per_count_and_follow_the_latest_call(make_runner, seed):
    runner = make_runner()
    x, bias = fresh_input(3, seed)
    first = runner(x, bias)
    y, _ = fresh_input(3, seed + 1)
    second = runner(y, bias)
    assert all(a is b for a, b in zip(first, second, strict=True))
    assert_equal_to_eager(second, y, bias)
    other = runner(*fresh_input(5, seed + 2))
    assert other[1].shape == (5, CONFIG.top_k) and other[1] is not first[1]


def test_bias_is_copied_only_when_it_changes(make_runner, seed):
    runner = make_runner()
    backend = runner._backend
    bias_ptr = runner.static_bias.data_ptr()
    x, bias = fresh_input(3, seed)
    runner(x, bias)
    runner(x, bias)
    assert backend.copies.count(bias_ptr) == 1
    bias.add_(0.25)  # in place: torch bumps the tensor's version
    assert_equal_to_eager(runner(x, bias), x, bias)
    assert backend.copies.count(bias_ptr) == 2
    other = bias.clone()  # equal values, another tensor
    runner(x, other)
    assert backend.copies.count(bias_ptr) == 3


def test_device_token_count_is_written_only_when_it_changes(make_runner, monkeypatch, seed):
    runner = make_runner()
    # Only the writes are observed: the stand-in graphs (CPU launches, which take no device count) stay idle.
    runner.skip_padding, runner._backend.run_graphs = True, False
    writes = []
    monkeypatch.setattr(runner, "static_num_tokens", _Recorder(writes))
    x, bias = fresh_input(3, seed)
    runner(x, bias)
    runner(x, bias)
    runner(*fresh_input(5, seed + 1))
    assert writes == [3, 5]


class _Recorder:
    def __init__(self, writes: list) -> None:
        self.writes = writes

    def fill_(self, value: int) -> None:
        self.writes.append(value)


def test_batches_above_the_largest_bucket_are_replayed_in_chunks_into_owned_outputs(make_runner, seed):
    runner = make_runner()
    x, bias = fresh_input(19, seed)
    replays = runner._backend.replays
    result = runner(x, bias)
    assert runner._backend.replays == replays + 3  # 8 + 8 + 3 rows
    assert_equal_to_eager(result, x, bias)
    assert result[1].data_ptr() not in {t.data_ptr() for t in runner._static_out if t is not None}


class _Event:
    def __init__(self) -> None:
        self.records = 0

    def record(self) -> None:
        self.records += 1


def test_a_step_from_host_buffers_copies_in_replays_once_copies_out_and_records(make_runner, seed):
    runner = make_runner()
    backend, event = runner._backend, _Event()
    host_in = torch.empty((5, CONFIG.num_experts))
    host_out = (
        torch.empty((5, CONFIG.num_experts)),
        torch.empty((5, CONFIG.top_k)),
        torch.empty((5, 8), dtype=torch.int64),
    )
    step = runner.from_host(host_in, host_out, event)
    for call in range(3):
        x, bias = fresh_input(5, seed + call)
        host_in.copy_(x)
        replays = backend.replays
        step(bias)
        assert backend.replays == replays + 1 and event.records == call + 1
        assert_equal_to_eager(host_out, x, bias)


def test_a_step_from_host_leaves_the_scores_out_when_not_asked_and_sees_a_new_bias(make_runner, seed):
    runner = make_runner()
    host_in = torch.empty((3, CONFIG.num_experts))
    host_out = (None, torch.empty((3, CONFIG.top_k)), torch.empty((3, 8), dtype=torch.int64))
    step = runner.from_host(host_in, host_out, _Event())
    x, bias = fresh_input(3, seed)
    host_in.copy_(x)
    step(bias)
    step(bias + 0.5)
    expected = op.grouped_topk(x, bias + 0.5, *CONFIG.args())
    assert torch.equal(host_out[1], expected[1]) and torch.equal(host_out[2], expected[2])


def test_from_host_refuses_counts_outside_the_buckets_and_scores_the_runner_does_not_make(make_runner):
    runner = make_runner()
    outputs = (None, torch.empty((9, 8)), torch.empty((9, 8), dtype=torch.int64))
    for rows in (0, 9):
        with pytest.raises(ValueError, match=f"host_logits has {rows} rows: allowed 1..8"):
            runner.from_host(torch.empty((rows, CONFIG.num_experts)), outputs, _Event())
    bare = make_runner(return_scores=False)
    with pytest.raises(ValueError, match="return_scores=False"):
        bare.from_host(torch.empty((2, 256)), (torch.empty((2, 256)), *outputs[1:]), _Event())
