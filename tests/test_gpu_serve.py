"""The routing service on the GPU backend (graph runner replays): answers equal the reference, batching works."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
http = pytest.importorskip("tritonclient.http")

from graphs.serve.loadtest import run_loadtest  # noqa: E402
from graphs.serve.models import ModelSettings, ServedModel  # noqa: E402
from graphs.serve.protocol import INPUT_DATATYPES  # noqa: E402
from graphs.serve.server import ServerSettings, create_app, running_server  # noqa: E402
from op.testing import assert_routing_close  # noqa: E402


@pytest.fixture(scope="module")
def gpu_server():
    models = [
        ServedModel(ModelSettings("deepseek_v3", backend="gpu", with_scores=True, max_bucket=64)),
        ServedModel(ModelSettings("kimi_k2", backend="gpu", index_dtype="int32", bias_seed=9)),
    ]
    with running_server(create_app(models, ServerSettings(max_queue_delay_us=2000))) as url:
        yield url, {m.name: m for m in models}


@pytest.mark.parametrize("tokens", [1, 37, 64, 200])
@pytest.mark.parametrize("wire", sorted(INPUT_DATATYPES))
@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
def test_gpu_backend_matches_the_reference(gpu_server, name, wire, tokens, seed):
    url, models = gpu_server
    model = models[name]
    x = np.random.default_rng(seed).standard_normal((tokens, model.config.num_experts)) * 2
    x = x.astype(INPUT_DATATYPES[wire])
    tensor = http.InferInput("gating_output", list(x.shape), wire)
    tensor.set_data_from_numpy(x, binary_data=True)
    names = list(model.outputs)
    with http.InferenceServerClient(url) as client:
        answer = client.infer(name, [tensor], outputs=[http.InferRequestedOutput(n, binary_data=True) for n in names])
    got = tuple(answer.as_numpy(n) if n in names else None for n in ("scores", "topk_values", "topk_indices"))
    assert_routing_close(got, x, model.bias, model.config)


def test_gpu_backend_under_concurrent_clients(gpu_server):
    url, _ = gpu_server
    result = run_loadtest(url, "deepseek_v3", clients=32, requests=32 * 50, max_tokens=64, seed=5)
    assert result.ok, result.wrong[:3] + result.failed[:3]
    assert result.answered == 1600 and result.requests_per_replay > 1.0
