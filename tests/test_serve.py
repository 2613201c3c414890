"""The routing service on the CPU backend, through tritonclient and raw HTTP: protocol, errors, batching, limits."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
http = pytest.importorskip("tritonclient.http")

from serve_models import GatedModel  # noqa: E402

from graphs.serve.loadtest import run_loadtest  # noqa: E402
from graphs.serve.models import ModelSettings, ServedModel, load_bias, seeded_bias  # noqa: E402
from graphs.serve.protocol import INPUT_DATATYPES  # noqa: E402
from graphs.serve.server import ServerSettings, create_app, running_server  # noqa: E402
from op.configs import PRESETS  # noqa: E402
from op.testing import assert_routing_close  # noqa: E402

MAX_TOKENS = 1000
MAX_BODY = 4 << 20


@pytest.fixture(scope="module")
def bias_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bias") / "glm.npy"
    np.save(path, (np.random.default_rng(7).standard_normal(128) * 0.2).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def server(bias_file):
    models = [
        ServedModel(ModelSettings("deepseek_v3", with_scores=True, bias_seed=3)),
        ServedModel(ModelSettings("glm45_air", index_dtype="int32", bias_file=bias_file)),
    ]
    settings = ServerSettings(max_queue_delay_us=2000, max_body_bytes=MAX_BODY, max_tokens=MAX_TOKENS)
    with running_server(create_app(models, settings)) as url:
        yield url, {m.name: m for m in models}


def post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def logits(rng, tokens, experts, wire="FP32"):
    return (rng.standard_normal((tokens, experts), dtype=np.float32) * 2).astype(INPUT_DATATYPES[wire])


def good_request(url, model, rng):
    x = logits(rng, 5, model.config.num_experts)
    body = {"inputs": [{"name": "gating_output", "shape": [5, model.config.num_experts], "datatype": "FP32"}]}
    body["inputs"][0]["data"] = x.reshape(-1).tolist()
    status, answer = post(url, f"/v2/models/{model.name}/infer", json.dumps(body).encode())
    assert status == 200, answer
    values = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(5, -1)
    ids = np.asarray(answer["outputs"][1]["data"]).reshape(5, -1)
    scores = (
        np.asarray(answer["outputs"][2]["data"], dtype=np.float32).reshape(5, -1)
        if model.settings.with_scores
        else None
    )
    assert_routing_close((scores, values, ids), x, model.bias, model.config)


def test_health_and_metadata(server):
    url, models = server
    with http.InferenceServerClient(url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("deepseek_v3") and client.is_model_ready("glm45_air")
        assert not client.is_model_ready("nope")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata("glm45_air")
    assert meta["inputs"] == [{"name": "gating_output", "datatype": "FP32", "shape": [-1, 128]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"topk_values": "FP32", "topk_indices": "INT32"}
    assert meta["parameters"]["bias_source"] == "file:glm.npy"
    assert meta["parameters"]["bias_sha256"] == models["glm45_air"].bias_sha256


@pytest.mark.parametrize("binary_out", [False, True])
@pytest.mark.parametrize("wire,binary_in", [("FP32", False), ("FP32", True), ("FP16", True), ("BF16", True)])
@pytest.mark.parametrize("name", ["deepseek_v3", "glm45_air"])
def test_infer_matches_the_reference(server, name, wire, binary_in, binary_out, seed):
    url, models = server
    model = models[name]
    rng = np.random.default_rng(seed)
    tokens = int(rng.integers(1, 300))
    x = logits(rng, tokens, model.config.num_experts, wire)
    x[0, 3] = np.nan  # valid input: expert 3 is never chosen for token 0
    tensor = http.InferInput("gating_output", list(x.shape), wire)
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    names = list(model.outputs)
    with http.InferenceServerClient(url) as client:
        answer = client.infer(
            name,
            [tensor],
            outputs=[http.InferRequestedOutput(n, binary_data=binary_out) for n in names],
            request_id="r1",
        )
    assert answer.get_response()["id"] == "r1"
    got = tuple(answer.as_numpy(n) if n in names else None for n in ("scores", "topk_values", "topk_indices"))
    assert got[2].dtype == (np.int32 if model.settings.index_dtype == "int32" else np.int64)
    assert_routing_close(got, x, model.bias, model.config)


def test_a_request_may_ask_for_some_outputs_only(server, seed):
    url, models = server
    x = logits(np.random.default_rng(seed), 4, 256)
    tensor = http.InferInput("gating_output", [4, 256], "FP32")
    tensor.set_data_from_numpy(x)
    with http.InferenceServerClient(url) as client:
        answer = client.infer("deepseek_v3", [tensor], outputs=[http.InferRequestedOutput("topk_indices")])
    assert [o["name"] for o in answer.get_response()["outputs"]] == ["topk_indices"]
    assert answer.as_numpy("topk_indices").shape == (4, 8)


def _json_body(shape, datatype="FP32", data=None, name="gating_output", **extra):
    tensor = {"name": name, "shape": shape, "datatype": datatype}
    if data is not None:
        tensor["data"] = data
    return json.dumps({"inputs": [tensor], **extra}).encode()


BAD_REQUESTS = {
    "wrong input name": (_json_body([1, 256], data=[0.0] * 256, name="logits"), {}, 400, "unknown input 'logits'"),
    "wrong rank": (_json_body([256], data=[0.0] * 256), {}, 400, "rank 1"),
    "wrong width": (_json_body([1, 128], data=[0.0] * 128), {}, 400, "E=128"),
    "unsupported datatype": (_json_body([1, 256], "INT32", [0] * 256), {}, 400, "datatype 'INT32'"),
    "FP16 in JSON": (_json_body([1, 256], "FP16", [0.0] * 256), {}, 400, "binary tensor data only"),
    "data length": (_json_body([2, 256], data=[0.0] * 256), {}, 400, "holds 256 values"),
    "non-numeric data": (_json_body([1, 256], data=["a"] * 256), {}, 400, "must hold numbers"),
    "malformed JSON": (b'{"inputs": [', {}, 400, "malformed JSON"),
    "T above the limit": (_json_body([MAX_TOKENS + 1, 256], data=[]), {}, 400, f"T <= {MAX_TOKENS}"),
    "unknown output": (
        _json_body([1, 256], data=[0.0] * 256, outputs=[{"name": "logits"}]),
        {},
        400,
        "unknown output 'logits'",
    ),
    "header length past the body": (
        _json_body([1, 256], data=[0.0] * 256),
        {"Inference-Header-Content-Length": "999999"},
        400,
        "out of range",
    ),
    "oversize body": (b" " * (MAX_BODY + 1), {}, 413, "exceeds the limit"),
}


def _binary_body(shape, declared, sent):
    tensor = {"name": "gating_output", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": declared}}
    head = json.dumps({"inputs": [tensor]}).encode()
    return head + bytes(sent), {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, case, seed):
    url, models = server
    body, headers, status, needle = BAD_REQUESTS[case]
    got, answer = post(url, "/v2/models/deepseek_v3/infer", body, headers)
    assert got == status and needle in answer["error"], answer
    good_request(url, models["deepseek_v3"], np.random.default_rng(seed))


@pytest.mark.parametrize(
    "declared,sent,needle",
    [
        (100, 100, "does not match shape"),
        (1024, 1032, "add up to 1024"),
        (1024, 1000, "runs past the binary data"),
    ],
)
def test_binary_sizes_that_disagree_with_the_header_are_refused(server, declared, sent, needle, seed):
    url, models = server
    body, headers = _binary_body([1, 256], declared, sent)
    status, answer = post(url, "/v2/models/deepseek_v3/infer", body, headers)
    assert status == 400 and needle in answer["error"], answer
    good_request(url, models["deepseek_v3"], np.random.default_rng(seed))


def test_unknown_model_and_scores_not_offered(server, seed):
    url, models = server
    status, answer = post(url, "/v2/models/nope/infer", _json_body([1, 256], data=[0.0] * 256))
    assert status == 404 and "unknown model 'nope'" in answer["error"]
    body = _json_body([1, 128], data=[0.0] * 128, outputs=[{"name": "scores"}])
    status, answer = post(url, "/v2/models/glm45_air/infer", body)
    assert status == 400 and "unknown output 'scores'" in answer["error"]
    good_request(url, models["glm45_air"], np.random.default_rng(seed))


def _metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_concurrent_clients_all_answered_once_and_batched(server):
    url, models = server
    before = _metric(url, "nv_inference_request_success_total", model="deepseek_v3")
    result = run_loadtest(url, "deepseek_v3", clients=32, requests=32 * 50, max_tokens=64, seed=11)
    assert result.ok, result.wrong[:3] + result.failed[:3]
    assert result.answered == result.sent == 1600
    assert _metric(url, "nv_inference_request_success_total", model="deepseek_v3") - before == 1600
    assert result.requests_per_replay > 1.0
    assert _metric(url, "fusedgate_bucket_fill_ratio_count", model="deepseek_v3") > 0
    assert "nv_inference_pending_request_count" in urllib.request.urlopen(f"http://{url}/metrics").read().decode()
    assert _metric(url, "nv_inference_pending_request_count", model="deepseek_v3") == 0


def test_failures_are_counted_by_reason(server):
    url, _ = server
    before = _metric(url, "nv_inference_request_failure_total", model="deepseek_v3", reason="INVALID_ARGUMENT")
    post(url, "/v2/models/deepseek_v3/infer", b"{")
    after = _metric(url, "nv_inference_request_failure_total", model="deepseek_v3", reason="INVALID_ARGUMENT")
    assert after == before + 1


def _fire(url, count, tokens=1, experts=256, statuses=None):
    statuses, lock = [] if statuses is None else statuses, threading.Lock()
    body = _json_body([tokens, experts], data=[0.5] * (tokens * experts))

    def one():
        status, answer = post(url, "/v2/models/deepseek_v3/infer", body)
        with lock:
            statuses.append((status, answer))

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, statuses


def test_queue_overflow_gives_503_and_nothing_else_breaks(seed):
    model = GatedModel(ModelSettings("deepseek_v3"))
    settings = ServerSettings(max_queue_size=2)
    with running_server(create_app([model], settings)) as url:
        # The first request holds the worker at the gate; two more fill the queue; the other seven are refused.
        model.gate = threading.Event()
        threads, statuses = _fire(url, 1)
        time.sleep(0.3)
        more, _ = _fire(url, 9, statuses=statuses)
        time.sleep(0.5)
        model.gate.set()
        model.gate = None
        for thread in threads + more:
            thread.join()
        codes = sorted(s for s, _ in statuses)
        assert codes == [200] * 3 + [503] * 7, codes
        assert all("queue is full" in a["error"] for s, a in statuses if s == 503)
        assert all(a["outputs"][1]["data"] for s, a in statuses if s == 200)
        good_request(url, model, np.random.default_rng(seed))
        assert _metric(url, "nv_inference_request_failure_total", reason="QUEUE_FULL") == 7


def test_graceful_shutdown_answers_requests_in_flight():
    model = ServedModel(ModelSettings("deepseek_v3"))
    with running_server(create_app([model], ServerSettings(max_queue_delay_us=500_000))) as url:
        threads, statuses = _fire(url, 6, tokens=3)
        time.sleep(0.2)
    # The server has shut down; every request it had accepted was answered.
    for thread in threads:
        thread.join()
    assert sorted(s for s, _ in statuses) == [200] * 6


def test_bias_files_npy_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    bias = seeded_bias(256, 5)
    save_file({"e_score_correction_bias": bias}, str(tmp_path / "b.safetensors"))
    np.testing.assert_array_equal(load_bias(tmp_path / "b.safetensors", 256), bias)
    save_file({"other": bias}, str(tmp_path / "wrong_key.safetensors"))
    with pytest.raises(ValueError, match="no tensor 'e_score_correction_bias'"):
        load_bias(tmp_path / "wrong_key.safetensors", 256)
    np.save(tmp_path / "short.npy", bias[:100])
    with pytest.raises(ValueError, match="holds 100 values"):
        load_bias(tmp_path / "short.npy", 256)
    with pytest.raises(ValueError, match=r"\.npy or \.safetensors"):
        load_bias(tmp_path / "b.txt", 256)
    model = ServedModel(ModelSettings("deepseek_v3", bias_file=tmp_path / "b.safetensors"))
    assert model.bias_source == "file:b.safetensors" and PRESETS["deepseek_v3"] == model.config


def test_server_settings_are_validated():
    with pytest.raises(ValueError, match="max_queue_size=0"):
        ServerSettings(max_queue_size=0)
    with pytest.raises(ValueError, match="backend='tpu'"):
        ServedModel(ModelSettings("deepseek_v3", backend="tpu"))


def test_batch_metrics_count_each_model_and_bucket_apart():
    from prometheus_client.parser import text_string_to_metric_families

    from graphs.serve.batcher import BatchRecord
    from graphs.serve.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    for model, requests, rows, bucket in [("a", 2, 3, 4), ("b", 1, 1, 1), ("a", 1, 1, 1), ("a", 3, 4, 4)]:
        metrics.batch(model, BatchRecord(requests, rows, (1e-6,) * requests, 2e-6), bucket, bucket)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert samples["nv_inference_count_total", (("model", "a"),)] == 6
    assert samples["nv_inference_count_total", (("model", "b"),)] == 1
    assert samples["nv_inference_exec_count_total", (("model", "a"),)] == 3
    assert samples["fusedgate_inference_rows_total", (("model", "a"),)] == 8
    assert samples["fusedgate_bucket_fill_ratio_count", (("model", "b"),)] == 1
    replays = {"a": {"4": 2, "1": 1}, "b": {"1": 1}}
    for model, buckets in replays.items():
        for bucket, count in buckets.items():
            assert samples["fusedgate_bucket_replays_total", (("bucket", bucket), ("model", model))] == count
