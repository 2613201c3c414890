"""``fusedgate loadtest``: concurrent Open Inference Protocol clients against a routing server, every answer checked.

N client threads (each with its own ``tritonclient.http`` client) send requests of random token counts,
datatypes and encodings until a fixed number has been sent; each answer is checked against the numpy
reference with the server's bias (rebuilt from the seed its metadata names, or read from a file whose hash
must match). Throughput, latency percentiles and requests per replay (from the server's own metrics) are
printed; any wrong, missing or failed answer makes the exit status non-zero. Without ``--url`` the command
starts ``fusedgate serve`` itself and stops it with SIGTERM afterwards, which must answer everything in flight.
"""

from __future__ import annotations

import itertools
import math
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphs.serve.models import bias_digest, load_bias, seeded_bias
from graphs.serve.protocol import INPUT_DATATYPES
from op.configs import RoutingConfig

ENCODINGS = ("mixed", "binary")
COUNTS = ("nv_inference_count_total", "nv_inference_exec_count_total")
ROUTING_OUTPUTS = ("scores", "topk_values", "topk_indices")


@dataclass
class LoadResult:
    expected: int = 0
    sent: int = 0
    answered: int = 0
    wrong: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    requests_per_replay: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.wrong and not self.failed and self.answered == self.sent == self.expected


def metric_totals(url: str, model: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    totals = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.name in (
                "nv_inference_count_total",
                "nv_inference_exec_count_total",
            ):
                totals[sample.name] = sample.value
    return totals


def _model_description(client, model: str, bias_file: Path | None) -> tuple[RoutingConfig, np.ndarray, list[str]]:
    metadata = client.get_model_metadata(model)
    p = metadata["parameters"]
    config = RoutingConfig(
        int(p["num_experts"]),
        int(p["n_group"]),
        int(p["topk_group"]),
        int(p["top_k"]),
        bool(p["renormalize"]),
        float(p["routed_scaling_factor"]),
    )
    source = p["bias_source"]
    if bias_file is not None:
        bias = load_bias(bias_file, config.num_experts)
    elif source.startswith("seed:"):
        bias = seeded_bias(config.num_experts, int(source.removeprefix("seed:")))
    else:
        raise ValueError(f"model {model} has its bias from {source}: pass the same file with --bias")
    if bias_digest(bias) != p["bias_sha256"]:
        raise ValueError(f"the bias here differs from model {model}'s ({source}): answers could not be checked")
    return config, bias, [o["name"] for o in metadata["outputs"]]


def _draw_logits(rng: np.random.Generator, tokens: int, experts: int, wire: str) -> np.ndarray:
    x = rng.standard_normal((tokens, experts), dtype=np.float32) * 2
    # A few NaN logits: valid input (DESIGN.md, routing rules 2 and 7), so the service must route them like any other.
    if rng.random() < 0.1:
        x[rng.integers(tokens), rng.integers(experts)] = np.nan
    return x.astype(INPUT_DATATYPES[wire])


def run_loadtest(
    url: str,
    model: str,
    clients: int,
    requests: int,
    max_tokens: int,
    seed: int,
    bias_file: Path | None = None,
    encoding: str = "mixed",
) -> LoadResult:
    """``encoding``: ``mixed`` draws JSON or binary per tensor (protocol coverage); ``binary`` sends and asks for
    binary tensors only, as a latency-minded client would."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r} is unknown: allowed {', '.join(ENCODINGS)}")
    from tritonclient import http

    from op.testing import compare_routing

    with http.InferenceServerClient(url) as probe:
        config, bias, outputs = _model_description(probe, model, bias_file)
    before = metric_totals(url, model)
    result, lock = LoadResult(expected=requests), threading.Lock()
    numbers = itertools.count()

    def one_request(client, rng: np.random.Generator, n: int) -> None:
        # Token counts log-uniform in [1, max_tokens]: mostly small requests, a few large ones.
        tokens = int(math.exp(rng.uniform(0, math.log(max_tokens))))
        wire = ("FP32", "FP16", "BF16")[rng.integers(3)]
        binary_in = wire != "FP32" or encoding == "binary" or bool(rng.integers(2))
        x = _draw_logits(rng, tokens, config.num_experts, wire)
        tensor = http.InferInput("gating_output", list(x.shape), wire)
        tensor.set_data_from_numpy(x, binary_data=binary_in)
        asked = [
            http.InferRequestedOutput(o, binary_data=encoding == "binary" or bool(rng.integers(2))) for o in outputs
        ]
        started = time.perf_counter()
        answer = client.infer(model, [tensor], outputs=asked, request_id=str(n))
        elapsed = time.perf_counter() - started
        got = tuple(answer.as_numpy(o) if o in outputs else None for o in ROUTING_OUTPUTS)
        comparison = compare_routing(got, x, bias, config)
        answered_id = answer.get_response().get("id")
        with lock:
            result.answered += 1
            result.latencies.append(elapsed)
            result.rows += tokens
            if answered_id != str(n):
                result.wrong.append(f"request {n}: answered with id {answered_id!r}")
            elif not comparison.ok:
                result.wrong.append(f"request {n} (T={tokens}, {wire}): {comparison.first_failure}")

    def client_loop(worker: int) -> None:
        rng = np.random.default_rng([seed, worker])
        try:
            client = http.InferenceServerClient(url, network_timeout=120.0, connection_timeout=120.0)
        except Exception as error:  # noqa: BLE001 - a client that cannot start is a failure, not a silent thread
            with lock:
                result.failed.append(f"client {worker} could not start: {error!r}")
            return
        with client:
            while True:
                with lock:
                    n = next(numbers)
                    if n >= requests:
                        return
                    result.sent += 1
                try:
                    one_request(client, rng, n)
                except Exception as error:  # noqa: BLE001 - every failure, ours or the server's, is counted
                    with lock:
                        result.failed.append(f"request {n}: {error!r}")

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - start
    after = metric_totals(url, model)
    executions = after.get("nv_inference_exec_count_total", 0) - before.get("nv_inference_exec_count_total", 0)
    inferences = after.get("nv_inference_count_total", 0) - before.get("nv_inference_count_total", 0)
    if executions:
        result.requests_per_replay = inferences / executions
    return result


def describe(result: LoadResult, model: str, backend: str, clients: int, encoding: str) -> str:
    lat = sorted(result.latencies)
    p50 = statistics.median(lat) * 1e3 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan")
    lines = [
        f"model {model}, backend {backend}, {clients} clients, {encoding} encoding: {result.answered}/{result.sent} "
        f"answered in "
        f"{result.seconds:.2f} s",
        f"throughput {result.answered / result.seconds:.1f} requests/s, {result.rows / result.seconds:.0f} tokens/s; "
        f"latency p50 {p50:.2f} ms, p99 {p99:.2f} ms; requests per replay {result.requests_per_replay:.2f}",
        f"wrong answers: {len(result.wrong)}; failed requests: {len(result.failed)}",
    ]
    lines += [f"WRONG {w}" for w in result.wrong[:10]] + [f"FAILED {f}" for f in result.failed[:10]]
    return "\n".join(lines)


def spawn_server(preset: str, backend: str, port: int, extra: list[str]) -> subprocess.Popen:
    """``fusedgate serve`` in a child process, returned once its model reports ready."""
    from tritonclient import http

    command = [sys.executable, "-m", "harness.cli", "serve", "--preset", preset, "--backend", backend]
    process = subprocess.Popen([*command, "--port", str(port), *extra])
    deadline = time.monotonic() + 600
    with http.InferenceServerClient(f"127.0.0.1:{port}") as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"fusedgate serve exited with status {process.returncode} before it was ready")
            try:
                if client.is_model_ready(preset):
                    return process
            except Exception:  # noqa: BLE001, S110 - not listening yet: poll again
                pass
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("fusedgate serve was not ready within 600 s")
            time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> int:
    """SIGTERM, then the exit status: 0 for a clean shutdown (uvicorn re-raises the signal once it has drained)."""
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return -1
    return 0 if status in (0, -signal.SIGTERM) else status
