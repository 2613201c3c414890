"""The GPU backend's host side on the CPU: torch CPU tensors stand in for pinned and device memory and the graph
runner's stand-in backend re-runs the captured call, so staging, the per-size views, the copies each way, the
outputs each batch gets and the polling of the device from the event loop are checked against the reference
without a GPU."""

from __future__ import annotations

import asyncio
import functools
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_graph_runner_cpu import RecordingBackend  # noqa: E402

from graphs import runner as runner_module  # noqa: E402
from graphs.serve.batcher import Pending  # noqa: E402
from graphs.serve.metrics import ServiceMetrics  # noqa: E402
from graphs.serve.models import ModelSettings, ServedModel  # noqa: E402
from graphs.serve.protocol import INPUT_DATATYPES  # noqa: E402
from graphs.serve.server import ServerSettings, _ModelService  # noqa: E402
from op.testing import assert_routing_close  # noqa: E402


class _Event:
    """A CUDA event's stand-in: not ready for ``pending`` queries, nor for ``busy_s`` seconds, after each record;
    counts queries and waits."""

    def __init__(self) -> None:
        self.pending, self.left, self.waits, self.queries = 0, 0, 0, 0
        self.busy_s, self.ready_at = 0.0, 0.0

    def record(self, stream=None) -> None:
        self.left = self.pending
        self.ready_at = time.perf_counter() + self.busy_s

    def query(self) -> bool:
        self.queries += 1
        self.left -= 1
        return self.left < 0 and time.perf_counter() >= self.ready_at

    def synchronize(self) -> None:
        self.waits += 1


@pytest.fixture
def model(monkeypatch):
    event = _Event()
    empty = torch.empty

    def unpinned(*args, pin_memory=False, **kwargs):
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "Event", lambda: event)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self: self)
    monkeypatch.setattr(torch, "empty", unpinned)
    monkeypatch.setitem(runner_module._BACKENDS, "torch", RecordingBackend)
    # The CPU kernel takes no device token count, so padding rows are computed.
    monkeypatch.setattr(runner_module, "GraphRunner", functools.partial(runner_module.GraphRunner, skip_padding=False))
    served = ServedModel(ModelSettings("deepseek_v3", backend="gpu", with_scores=True, bias_seed=2, max_bucket=16))
    return served, event


def test_a_batch_of_mixed_dtypes_is_one_replay_one_wait_and_matches_the_reference(model):
    served, event = model
    backend = served._backend
    rng = np.random.default_rng(5)
    wires = ["FP32", "BF16", "FP16", "FP32"]
    parts = [
        (rng.standard_normal((n, 256)) * 2).astype(INPUT_DATATYPES[w]) for n, w in zip([1, 3, 2, 5], wires, strict=True)
    ]
    replays, waits = backend.runner._backend.replays, event.waits
    outputs = served.compute(parts)
    assert backend.runner._backend.replays == replays + 1 and event.waits == waits + 1
    x = np.concatenate(parts, dtype=np.float32)
    got = (outputs["scores"], outputs["topk_values"], outputs["topk_indices"])
    assert_routing_close(got, x, served.bias, served.config)


def test_each_batch_owns_its_outputs(model):
    served, _ = model
    rng = np.random.default_rng(6)
    first_x = rng.standard_normal((3, 256)).astype(np.float32)
    kept = served.compute([first_x])
    first = {name: array.copy() for name, array in kept.items()}
    served.compute([rng.standard_normal((3, 256)).astype(np.float32)])
    for name, array in kept.items():
        np.testing.assert_array_equal(array, first[name])
    got = (kept["scores"], kept["topk_values"], kept["topk_indices"])
    assert_routing_close(got, first_x, served.bias, served.config)


def test_the_logits_are_copied_into_the_runners_input_once(model):
    served, _ = model
    runner = served._backend.runner
    x = np.random.default_rng(7).standard_normal((4, 256)).astype(np.float32)
    served.compute([x])
    np.testing.assert_array_equal(runner.static_logits[:4].numpy(), x)


def test_a_batch_above_the_largest_bucket_is_refused(model):
    served, _ = model
    with pytest.raises(ValueError, match="largest bucket"):
        served.compute([np.zeros((17, 256), dtype=np.float32)])


def test_an_inline_batch_polls_the_device_and_leaves_the_event_loop_free(model):
    served, event = model
    service = _ModelService(served, ServerSettings(), ServiceMetrics())
    rng = np.random.default_rng(8)
    parts = [rng.standard_normal((n, 256)).astype(np.float32) for n in (2, 1)]
    batch = [Pending(len(x), x, None) for x in parts]
    event.pending, queries, waits = 3, event.queries, event.waits

    async def meanwhile() -> list:
        other = asyncio.create_task(asyncio.sleep(0))
        results = await service._compute_inline(batch)
        assert other.done()
        return results

    results = asyncio.run(meanwhile())
    # Three polls find the outputs not in, the fourth finds them: collecting them then waits no more.
    assert event.queries == queries + 4 and event.waits == waits + 1
    for x, result in zip(parts, results, strict=True):
        got = (result["scores"], result["topk_values"], result["topk_indices"])
        assert_routing_close(got, x, served.bias, served.config)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_slow_device_is_polled_at_a_bounded_rate_not_spun_on(model, loop):
    """The event loop polls a device that takes long without spinning: after a short spin, about once a
    millisecond (uvloop runs a shorter timer at once, which would spin)."""
    run = asyncio.run if loop == "asyncio" else pytest.importorskip("uvloop").run
    served, event = model
    service = _ModelService(served, ServerSettings(), ServiceMetrics())
    x = np.random.default_rng(9).standard_normal((1, 256)).astype(np.float32)
    event.busy_s, queries = 0.3, event.queries

    async def timed() -> tuple[list, float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        results = await service._compute_inline([Pending(1, x, None)])
        return results, time.perf_counter() - wall, time.thread_time() - cpu

    results, wall, cpu = run(timed())
    polls = event.queries - queries
    assert wall >= event.busy_s
    # Spinning polls tens of thousands of times and takes the loop's thread for the whole wait.
    assert polls < 2000 and cpu < 0.3 * wall, (polls, cpu, wall)
    got = (results[0]["scores"], results[0]["topk_values"], results[0]["topk_indices"])
    assert_routing_close(got, x, served.bias, served.config)


def test_a_server_polling_the_device_answers_every_request_right(model):
    """Concurrent clients of every size and encoding against the polled backend: each answer checked, none lost."""
    from graphs.serve.loadtest import run_loadtest
    from graphs.serve.server import create_app, running_server

    served, event = model
    event.pending = 2
    with running_server(create_app([served], ServerSettings())) as url:
        result = run_loadtest(url, served.name, clients=6, requests=60, max_tokens=40, seed=4)
    assert result.ok, (result.wrong[:3], result.failed[:3])
    assert result.answered == 60 and result.requests_per_replay > 1.0
