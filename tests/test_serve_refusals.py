"""The service's edges on the CPU backend: malformed requests are 400s counted in /metrics, compressed bodies,
versioned routes, T = 0, body limits, slow and vanishing clients, the bound on bodies in flight, and batches
that mix datatypes."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
http = pytest.importorskip("tritonclient.http")

from serve_models import GatedModel  # noqa: E402

from graphs.serve.models import ModelSettings, ServedModel  # noqa: E402
from graphs.serve.protocol import INPUT_DATATYPES  # noqa: E402
from graphs.serve.server import HEADER_ALLOWANCE, ServerSettings, create_app, running_server  # noqa: E402
from harness.inputs import generate_input  # noqa: E402
from op.configs import PRESETS  # noqa: E402
from op.testing import assert_routing_close  # noqa: E402

MAX_TOKENS = 1000
E = 256
INFER = "/v2/models/deepseek_v3/infer"


@pytest.fixture(scope="module")
def model():
    return GatedModel(ModelSettings("deepseek_v3", with_scores=True, bias_seed=4))


@pytest.fixture(scope="module")
def server(model):
    settings = ServerSettings(max_queue_delay_us=1_000_000, max_tokens=MAX_TOKENS, body_timeout_s=1.0)
    app = create_app([model], settings)
    with running_server(app) as url:
        yield url, app


def post(url, path, body, headers=None, method="POST"):
    request = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def get(url, path):
    return post(url, path, None, method="GET")


def metric(url, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    text = get(url, "/metrics")[2].decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def tensor_json(shape=(1, E), data=None, datatype="FP32", **extra):
    tensor = {"name": "gating_output", "shape": list(shape), "datatype": datatype, **extra}
    if data is not None:
        tensor["data"] = data
    return tensor


def body_of(tensor, **extra) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


def binary_body(x: np.ndarray, wire: str, **extra) -> tuple[bytes, dict]:
    tensor = tensor_json(x.shape, datatype=wire, parameters={"binary_data_size": x.nbytes})
    head = json.dumps({"inputs": [tensor], **extra}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def check_answer(answer: bytes, x, model):
    outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in json.loads(answer)["outputs"]}
    got = (outputs["scores"].astype(np.float32), outputs["topk_values"].astype(np.float32), outputs["topk_indices"])
    assert_routing_close(got, x.astype(np.float32), model.bias, model.config)


ZEROS = [0.0] * E
MALFORMED = {
    "integer too large for a float64": b'{"inputs":[{"name":"gating_output","shape":[1,256],"datatype":"FP32",'
    b'"data":[' + b"9" * 310 + b"," + b",".join([b"0"] * 255) + b"]}]}",
    "nested lists 100000 deep": b"[" * 100000,
    "nested objects 100000 deep": b'{"a":' * 100000,
    "datatype a list": body_of(tensor_json(data=ZEROS, datatype=["FP32"])),
    "datatype an object": body_of(tensor_json(data=ZEROS, datatype={"FP32": 1})),
    "output name a list": body_of(tensor_json(data=ZEROS), outputs=[{"name": ["topk_values"]}]),
    "output name an object": body_of(tensor_json(data=ZEROS), outputs=[{"name": {"a": 1}}]),
    "a string number in data": body_of(tensor_json(data=["1.5"] + ZEROS[1:])),
    "the string NaN in data": body_of(tensor_json(data=["NaN"] + ZEROS[1:])),
    "null in data": body_of(tensor_json(data=[None] + ZEROS[1:])),
    "true in data": body_of(tensor_json(data=[True] + ZEROS[1:])),
    "data nested deeper than the shape": body_of(tensor_json(data=[[[v] for v in ZEROS]])),
    "data nested as another shape": body_of(tensor_json(shape=(2, E), data=[ZEROS[:128]] * 4)),
    "data a string": body_of(tensor_json(data="0.5")),
    "binary_data_output a string": body_of(tensor_json(data=ZEROS), parameters={"binary_data_output": "false"}),
    "binary_data a number": body_of(
        tensor_json(data=ZEROS), outputs=[{"name": "scores", "parameters": {"binary_data": 1}}]
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_are_400_with_an_error_and_counted(server, model, case):
    url, _ = server
    before = metric(url, "nv_inference_request_failure_total", reason="INVALID_ARGUMENT")
    status, headers, answer = post(url, INFER, MALFORMED[case])
    assert status == 400 and headers["content-type"] == "application/json", (status, answer[:200])
    assert json.loads(answer)["error"]
    assert metric(url, "nv_inference_request_failure_total", reason="INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize("value", ["2_12", "+12", "0x10", "1\u00b2", "-0"])
def test_header_length_must_be_plain_decimal_digits(server, value):
    url, _ = server
    x, _ = generate_input(PRESETS["deepseek_v3"], 1, "float32", seed=1)
    body, _ = binary_body(x, "FP32")
    status, _, answer = post(url, INFER, body, {"Inference-Header-Content-Length": value})
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(answer)["error"]


def test_numbers_beyond_float32_are_infinite_logits_and_triton_nan_tokens_are_read(server, model):
    url, _ = server
    x, _ = generate_input(PRESETS["deepseek_v3"], 2, "float32", seed=2)
    x[0, 3], x[1, 7], x[1, 9] = np.inf, np.nan, -np.inf
    text = json.dumps({"inputs": [tensor_json((2, E), x.reshape(-1).tolist())]}).replace("Infinity", "1e39")
    assert "NaN" in text
    status, _, answer = post(url, INFER, text.encode())
    assert status == 200, answer
    check_answer(answer, x, model)


@pytest.mark.parametrize("wire", ["FP32", "FP16", "BF16"])
def test_no_tokens_get_empty_outputs(server, model, wire):
    url, _ = server
    x = np.empty((0, E), dtype=INPUT_DATATYPES[wire])
    body, headers = binary_body(x, wire)
    status, _, answer = post(url, INFER, body, headers)
    assert status == 200, answer
    outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
    assert outputs["topk_values"]["shape"] == [0, 8] and outputs["topk_values"]["data"] == []
    assert outputs["topk_indices"]["datatype"] == "INT64" and outputs["scores"]["shape"] == [0, E]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZip"])
def test_compressed_bodies_are_decoded(server, model, encoding):
    url, _ = server
    x, _ = generate_input(PRESETS["deepseek_v3"], 3, "float32", seed=3)
    plain = body_of(tensor_json((3, E), x.reshape(-1).tolist()))
    packed = gzip.compress(plain) if encoding.lower() == "gzip" else zlib.compress(plain)
    status, _, answer = post(url, INFER, packed, {"Content-Encoding": encoding})
    assert status == 200, answer
    check_answer(answer, x, model)


def test_compression_refusals(server):
    url, app = server
    x, _ = generate_input(PRESETS["deepseek_v3"], 1, "float32", seed=4)
    plain = body_of(tensor_json((1, E), x.reshape(-1).tolist()))
    status, _, answer = post(url, INFER, plain, {"Content-Encoding": "gzip"})
    assert status == 400 and "Content-Encoding" in json.loads(answer)["error"]
    status, _, answer = post(url, INFER, plain, {"Content-Encoding": "br"})
    assert status == 415 and "'br'" in json.loads(answer)["error"]
    status, _, answer = post(url, INFER, gzip.compress(plain)[:-9], {"Content-Encoding": "gzip"})
    assert status == 400 and "truncated" in json.loads(answer)["error"]
    bomb = gzip.compress(b" " * (app.state.body_limit + 1))
    status, _, answer = post(url, INFER, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decoded request body exceeds" in json.loads(answer)["error"]


def test_versioned_routes(server, model):
    url, _ = server
    x, _ = generate_input(PRESETS["deepseek_v3"], 2, "float32", seed=5)
    body = body_of(tensor_json((2, E), x.reshape(-1).tolist()))
    status, _, answer = post(url, "/v2/models/deepseek_v3/versions/1/infer", body)
    assert status == 200 and json.loads(answer)["model_version"] == "1"
    check_answer(answer, x, model)
    status, _, answer = get(url, "/v2/models/deepseek_v3/versions/1")
    assert status == 200 and json.loads(answer)["versions"] == ["1"]
    assert get(url, "/v2/models/deepseek_v3/versions/1/ready")[0] == 200
    for path, method in [("/infer", "POST"), ("", "GET"), ("/ready", "GET")]:
        status, _, answer = post(url, f"/v2/models/deepseek_v3/versions/2{path}", body, method=method)
        assert status == 404 and "no version '2'" in json.loads(answer)["error"], (path, answer)
    with http.InferenceServerClient(url) as client:
        assert client.is_model_ready("deepseek_v3", "1")
        assert client.get_model_metadata("deepseek_v3", "1")["name"] == "deepseek_v3"


def test_default_body_limit_admits_the_largest_binary_request():
    models = [ServedModel(ModelSettings("deepseek_v3")), ServedModel(ModelSettings("glm45_air"))]
    settings = ServerSettings(max_tokens=65536)
    assert settings.body_limit(models) == 65536 * 256 * 4 + HEADER_ALLOWANCE
    assert ServerSettings(max_body_bytes=123).body_limit(models) == 123


def test_a_binary_request_of_max_tokens_fits_the_default_limit(server, model):
    url, _ = server
    x, _ = generate_input(PRESETS["deepseek_v3"], MAX_TOKENS, "float32", seed=6)
    body, headers = binary_body(x, "FP32", outputs=[{"name": n} for n in ("scores", "topk_values", "topk_indices")])
    status, _, answer = post(url, INFER, body, headers)
    assert status == 200, answer[:300]


def raw_request(url: str, declared: int, sent: bytes, extra: str = "") -> socket.socket:
    host, port = url.split(":")
    connection = socket.create_connection((host, int(port)))
    connection.sendall(
        f"POST {INFER} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {declared}\r\n{extra}\r\n".encode() + sent
    )
    return connection


def test_a_body_that_arrives_too_slowly_gets_408(server):
    url, _ = server
    before = metric(url, "nv_inference_request_failure_total", reason="BODY_TIMEOUT")
    started = time.monotonic()
    with raw_request(url, 5000, b'{"inputs": [') as connection:
        connection.settimeout(10)
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1.0 s" in answer
    assert 0.9 < time.monotonic() - started < 5
    assert metric(url, "nv_inference_request_failure_total", reason="BODY_TIMEOUT") == before + 1


def test_a_client_gone_mid_body_is_one_log_line_and_a_failure(server, caplog):
    url, _ = server
    before = metric(url, "nv_inference_request_failure_total", reason="CLIENT_DISCONNECT")
    with caplog.at_level(logging.WARNING):
        raw_request(url, 5000, b'{"inputs": [').close()
        deadline = time.monotonic() + 5
        while metric(url, "nv_inference_request_failure_total", reason="CLIENT_DISCONNECT") == before:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    records = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None and "\n" not in records[0].getMessage()


def test_a_client_gone_before_its_answer_is_not_a_success(server, model):
    url, _ = server
    x, _ = generate_input(PRESETS["deepseek_v3"], 1, "float32", seed=7)
    body, headers = binary_body(x, "FP32")
    successes = metric(url, "nv_inference_request_success_total")
    gone = metric(url, "nv_inference_request_failure_total", reason="CLIENT_DISCONNECT")
    model.gate = threading.Event()
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        raw_request(url, len(body), body, extra).close()
        time.sleep(0.3)
    finally:
        model.gate.set()
        model.gate = None
    deadline = time.monotonic() + 5
    while metric(url, "nv_inference_request_failure_total", reason="CLIENT_DISCONNECT") == gone:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric(url, "nv_inference_request_success_total") == successes


def test_bodies_in_flight_are_bounded_with_503_and_retry_after(model):
    x, _ = generate_input(PRESETS["deepseek_v3"], 20, "float32", seed=8)
    body, headers = binary_body(x, "FP32")
    settings = ServerSettings(max_body_bytes_in_flight=10_000, body_timeout_s=5.0)
    with running_server(create_app([model], settings)) as url:
        # Alone, a body larger than the bound is admitted.
        assert len(body) > 10_000 and post(url, INFER, body, headers)[0] == 200
        with raw_request(url, 8000, b"{"):
            time.sleep(0.2)
            status, answer_headers, answer = post(url, INFER, body, headers)
        assert status == 503 and answer_headers["retry-after"] == "1"
        assert "request bodies" in json.loads(answer)["error"]
        assert metric(url, "nv_inference_request_failure_total", reason="BODY_BUDGET") == 1
        assert post(url, INFER, body, headers)[0] == 200


def test_requests_of_every_datatype_share_one_batch(server, model):
    url, _ = server
    wires = ["FP32", "FP16", "BF16"] * 2
    inputs = [generate_input(PRESETS["deepseek_v3"], 2, "float32", seed=10 + i)[0] for i in range(len(wires))]
    answers = [None] * len(wires)

    def send(i):
        answers[i] = post(url, INFER, *binary_body(inputs[i].astype(INPUT_DATATYPES[wires[i]]), wires[i]))

    batches = metric(url, "nv_inference_exec_count_total")
    model.gate = threading.Event()
    try:
        # The first request holds the worker at the gate; the others queue behind it, then go as one batch.
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(wires))]
        threads[0].start()
        time.sleep(0.3)
        for thread in threads[1:]:
            thread.start()
        time.sleep(0.5)
    finally:
        model.gate.set()
        model.gate = None
    for thread in threads:
        thread.join()
    assert metric(url, "nv_inference_exec_count_total") == batches + 2
    for i, (status, _, answer) in enumerate(answers):
        assert status == 200, answer
        check_answer(answer, inputs[i].astype(INPUT_DATATYPES[wires[i]]), model)


def test_a_lone_request_does_not_wait_for_the_batch_deadline(server, model):
    url, _ = server
    x, _ = generate_input(PRESETS["deepseek_v3"], 1, "float32", seed=9)
    body, headers = binary_body(x, "FP32")
    post(url, INFER, body, headers)
    started = time.perf_counter()
    status, _, _ = post(url, INFER, body, headers)
    # The server's batch deadline is 1 s.
    assert status == 200 and time.perf_counter() - started < 0.5


def test_large_json_bodies_are_parsed_in_the_child_process(model):
    from graphs.serve.server import THREADPOOL_BYTES

    x, _ = generate_input(PRESETS["deepseek_v3"], 600, "float32", seed=11)
    good = body_of(tensor_json((600, E), x.reshape(-1).tolist()))
    bad = body_of(tensor_json((600, E), ["0.5"] + x.reshape(-1).tolist()[1:]))
    assert len(good) > THREADPOOL_BYTES
    with running_server(create_app([model], ServerSettings(max_body_bytes=8 << 20))) as url:
        status, _, answer = post(url, INFER, good)
        assert status == 200, answer[:300]
        check_answer(answer, x, model)
        status, _, answer = post(url, INFER, bad)
        assert status == 400 and "found str" in json.loads(answer)["error"]


def test_a_fault_inside_the_server_is_a_counted_500_with_an_error(server, model, monkeypatch):
    url, _ = server

    def broken(*_args):
        raise RuntimeError("encoder broke")

    monkeypatch.setattr("graphs.serve.server.encode_infer_response", broken)
    x, _ = generate_input(PRESETS["deepseek_v3"], 1, "float32", seed=12)
    status, headers, answer = post(url, INFER, *binary_body(x, "FP32"))
    assert status == 500 and "encoder broke" in json.loads(answer)["error"]
    assert metric(url, "nv_inference_request_failure_total", reason="INTERNAL") == 1


def test_a_request_above_the_largest_bucket_is_computed_in_parts(seed):
    small = ServedModel(ModelSettings("deepseek_v3", with_scores=True, bias_seed=4, max_bucket=64))
    x, _ = generate_input(PRESETS["deepseek_v3"], 200, "float32", seed=seed)
    with running_server(create_app([small], ServerSettings())) as url:
        status, _, answer = post(url, INFER, *binary_body(x, "FP32"))
        assert status == 200, answer[:300]
        check_answer(answer, x, small)
        assert metric(url, "nv_inference_exec_count_total") == 4
