"""The routing service: the Open Inference Protocol over ASGI, one dynamic batcher per served model.

``fusedgate serve`` runs it under uvicorn. Infer requests take a thin ASGI route; health, metadata and metrics
are FastAPI's. A request is read (bounded in size, time and bytes in flight), decoded and validated before it
joins its model's queue; the batch it rides is computed inside an NVTX range ``serve:<preset>:bucket<B>``, on the
event loop when it is small (a GPU batch launched there, its event polled) and on the model's one worker thread
otherwise; its own rows are cut out and encoded in the format it asked for. On shutdown
uvicorn stops accepting, in-flight requests are answered, then every batcher drains its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import nvtx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from graphs.serve.batcher import BatchRecord, DynamicBatcher, Pending, QueueFull, ShuttingDown
from graphs.serve.body import RETRY_AFTER_S, BodyBudget, ClientGone, content_encoding, decompress, receive_body
from graphs.serve.metrics import ServiceMetrics
from graphs.serve.models import MODEL_VERSION, ServedModel
from graphs.serve.parser import ParserProcess
from graphs.serve.protocol import (
    HEADER_LENGTH,
    INPUT_DATATYPES,
    InferRequest,
    ModelSignature,
    ProtocolError,
    encode_infer_response,
    parse_request,
)

NVTX_DOMAIN = "fusedgate"
SERVER_NAME = "fusedgate"
# Bodies above this are decoded, parsed and encoded off the event loop, so one large request does not stall others:
# JSON ones in a child process (the parse holds the GIL nearly throughout: in a thread, two 60 MiB bodies took T=1
# requests to a 345 ms worst latency and a 10 ms median), binary ones in a thread (only a small header to parse).
THREADPOOL_BYTES = 1 << 20
# Room for the JSON header of the largest binary request in the default body limit.
HEADER_ALLOWANCE = 64 << 10
# A launched GPU batch is polled from the event loop: with a yield between polls (other requests run meanwhile)
# for as long as a batch of up to the inline rows usually takes the device (a T=1 batch's copies and replay take
# about 30 µs on the H200, 256 rows about 60 µs), then once a millisecond, so that a device that is slow to answer
# never keeps an otherwise idle loop spinning. Not less: uvloop runs a timer of under half a millisecond at once.
POLL_SPIN_S = 200e-6
POLL_INTERVAL_S = 1e-3
INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
log = logging.getLogger("fusedgate.serve")


@dataclass(frozen=True)
class ServerSettings:
    """``max_body_bytes`` None: the largest binary FP32 request of ``max_tokens`` rows of the widest served model,
    with room for its header. ``max_body_bytes_in_flight`` None: twice the body limit."""

    max_queue_delay_us: int = 100
    max_queue_size: int = 1024
    max_body_bytes: int | None = None
    max_tokens: int = 65536
    body_timeout_s: float = 30.0
    max_body_bytes_in_flight: int | None = None

    def __post_init__(self) -> None:
        for name, low in (
            ("max_queue_delay_us", 0),
            ("max_queue_size", 1),
            ("max_body_bytes", 1),
            ("max_tokens", 1),
            ("max_body_bytes_in_flight", 1),
        ):
            value = getattr(self, name)
            if value is None and name.startswith("max_body"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is out of range: allowed an int >= {low}")
        timeout = self.body_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            raise ValueError(f"body_timeout_s={timeout!r} is out of range: allowed a number of seconds > 0")

    def body_limit(self, models: Sequence[ServedModel]) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        widest = max(m.config.num_experts for m in models)
        return self.max_tokens * widest * max(d.itemsize for d in INPUT_DATATYPES.values()) + HEADER_ALLOWANCE


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _ModelService:
    """A model with its batcher: ``infer(logits)`` awaits the rows of one request."""

    def __init__(self, model: ServedModel, settings: ServerSettings, metrics: ServiceMetrics):
        self.model, self.metrics = model, metrics
        self.signature = ModelSignature(model.name, model.config.num_experts, dict(model.outputs), settings.max_tokens)
        self.batcher = DynamicBatcher(
            self._compute,
            max_rows=model.table.largest,
            max_delay_s=settings.max_queue_delay_us * 1e-6,
            max_queue=settings.max_queue_size,
            on_batch=self._record,
            name=f"serve-{model.name}",
            inline_rows=model.inline_rows,
            inline=self._compute_inline,
        )
        self._domain = nvtx.get_domain(NVTX_DOMAIN)
        self._ranges: dict[int, object] = {}
        # Read at scrape time, so the gauge is never stale between batches.
        metrics.pending.labels(model.name).set_function(lambda: self.batcher.waiting)

    def _bucket(self, rows: int) -> int:
        """The bucket a batch of ``rows`` is labelled by (the largest one for a batch served in chunks)."""
        return self.model.table.bucket_for(min(rows, self.model.table.largest))

    def _range(self, batch: Sequence[Pending]) -> object:
        bucket = self._bucket(sum(p.rows for p in batch))
        attributes = self._ranges.get(bucket)
        if attributes is None:
            attributes = self._ranges[bucket] = self._domain.get_event_attributes(
                message=f"serve:{self.model.name}:bucket{bucket}"
            )
        return attributes

    def _compute(self, batch: Sequence[Pending]) -> list[dict[str, np.ndarray]]:
        # Requests of every logit dtype share a batch: each becomes float32 (exactly) before the kernel.
        self._domain.push_range(self._range(batch))
        try:
            outputs = self.model.compute([p.payload for p in batch])
        finally:
            self._domain.pop_range()
        return _split(batch, outputs)

    async def _compute_inline(self, batch: Sequence[Pending]) -> list[dict[str, np.ndarray]]:
        self._domain.push_range(self._range(batch))
        try:
            self.model.launch([p.payload for p in batch])
            # Polled, not waited for: while the device works, the event loop reads, parses and answers other
            # requests (the next batch gathers meanwhile).
            await _until(self.model.ready)
            outputs = self.model.collect()
        finally:
            self._domain.pop_range()
        return _split(batch, outputs)

    def _record(self, record: BatchRecord) -> None:
        self.metrics.batch(self.model.name, record, self._bucket(record.rows), self.model.padded_rows(record.rows))

    async def route(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        tokens, part = logits.shape[0], self.model.table.largest
        if tokens == 0:
            return self.model.empty_outputs()
        if tokens <= part:
            return await self._submit(logits)
        # A request above the largest bucket goes one bucket-sized part at a time, so that requests arriving
        # meanwhile are computed between its parts instead of waiting for the whole of it.
        parts = [await self._submit(logits[start : start + part]) for start in range(0, tokens, part)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    async def _submit(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return await self.batcher.submit(logits.shape[0], logits)
        except QueueFull as full:
            raise ProtocolError(503, str(full), "QUEUE_FULL") from None
        except ShuttingDown as closing:
            raise ProtocolError(503, str(closing), "UNAVAILABLE") from None
        except Exception as broken:  # noqa: BLE001 - the backend failed; the client gets a 500 naming why
            raise ProtocolError(500, f"routing failed: {broken}", "BACKEND") from None


async def _until(ready: Callable[[], bool]) -> None:
    """Return once ``ready()``, polling it as ``POLL_SPIN_S`` and ``POLL_INTERVAL_S`` say."""
    if ready():
        return
    spin_until = time.perf_counter() + POLL_SPIN_S
    while not ready():
        await asyncio.sleep(0 if time.perf_counter() < spin_until else POLL_INTERVAL_S)


def _split(batch: Sequence[Pending], outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each request's own rows: views of the batch's outputs, which belong to the batch."""
    results, start = [], 0
    for pending in batch:
        stop = start + pending.rows
        results.append({name: array[start:stop] for name, array in outputs.items()})
        start = stop
    return results


def _request_headers(scope: dict) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def _respond(send, status: int, content: bytes, headers: dict[str, str]) -> None:
    raw = [(b"content-length", str(len(content)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def _message_now(receive) -> dict | None:
    """The next ASGI message if the server holds it already, else None, without waiting: a receive that would
    wait is abandoned at its first step, before it takes anything (an anyio cancel scope, Starlette's way of not
    waiting, costs about 70 µs a request here)."""
    step = receive()
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    step.close()
    return None


def _client_gone(receive) -> bool:
    """Whether the client has disconnected, without waiting (the server answers a receive after a disconnect at
    once)."""
    message = _message_now(receive)
    return message is not None and message["type"] == "http.disconnect"


class _RoutingApp:
    """The ASGI application: infer requests go straight to their handler (the hot path, without FastAPI's routing
    and dependency resolution per request); everything else, lifespan included, to FastAPI."""

    def __init__(self, api: FastAPI, infer):
        self.api, self.infer, self.state = api, infer, api.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                await self.infer(match["name"], match["version"], scope, receive, send)
                return
        await self.api(scope, receive, send)


def create_app(models: Sequence[ServedModel], settings: ServerSettings | None = None) -> _RoutingApp:
    settings = settings or ServerSettings()
    metrics = ServiceMetrics()
    services = {m.name: _ModelService(m, settings, metrics) for m in models}
    if len(services) != len(models):
        raise ValueError("each model is served once: a preset was given twice")
    body_limit = settings.body_limit(models)
    budget = BodyBudget(settings.max_body_bytes_in_flight or 2 * body_limit)
    parser = ParserProcess()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await parser.start()
        for service in services.values():
            await service.batcher.start()
        # What is loaded by now (torch among it, about 200k objects) lives as long as the server: kept out of the
        # collector's sight, a full collection scans only what requests create. It took about 100 ms here, and was
        # the p99 latency at concurrency 64.
        gc.collect()
        gc.freeze()
        app.state.ready = True
        yield
        app.state.ready = False
        for service in services.values():
            await service.batcher.stop()
        await asyncio.to_thread(parser.close)

    app = FastAPI(title=SERVER_NAME, lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.ready = False
    app.state.metrics = metrics
    app.state.body_limit = body_limit

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    def service_for(name: str, version: str | None = None) -> _ModelService:
        if name not in services:
            raise ProtocolError(404, f"unknown model {name!r}: served models are {', '.join(sorted(services))}")
        if version is not None and version != MODEL_VERSION:
            raise ProtocolError(404, f"model {name} has no version {version!r}: served versions are {MODEL_VERSION}")
        return services[name]

    @app.exception_handler(ProtocolError)
    async def protocol_error(_, error: ProtocolError) -> JSONResponse:
        return _error(error.status, error.message)

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if not app.state.ready:
            return _error(503, "the server is not ready")
        return JSONResponse({"ready": True})

    @app.get("/v2")
    async def server_metadata() -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            own = version("fusedgate")
        except PackageNotFoundError:
            own = "unknown"
        return {"name": SERVER_NAME, "version": own, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        return service_for(name, version).model.metadata(settings.max_tokens)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        service_for(name, version)
        if not app.state.ready:
            return _error(503, f"model {name} is not ready")
        return JSONResponse({"name": name, "ready": True})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def read_request(service: _ModelService, scope: dict, receive) -> InferRequest:
        headers = _request_headers(scope)
        declared = headers.get("content-length")
        wbits = content_encoding(headers.get("content-encoding"))
        length = int(declared) if declared and declared.isdigit() else None
        # A small body is usually in whole when its request starts: read then, it needs no timer (about 4 µs).
        first = _message_now(receive)
        try:
            if first is not None and not first.get("more_body", False):
                body, taken = await receive_body(receive, length, body_limit, budget, first)
            else:
                async with asyncio.timeout(settings.body_timeout_s):
                    body, taken = await receive_body(receive, length, body_limit, budget, first)
        except TimeoutError:
            raise ProtocolError(
                408, f"the request body did not arrive within {settings.body_timeout_s} s", "BODY_TIMEOUT"
            ) from None
        try:
            if wbits is not None:
                # In a thread whatever the compressed size: a small body may decode to the size limit.
                body = await asyncio.to_thread(decompress, body, wbits, body_limit)
                budget.take(len(body))
                taken += len(body)
            header_length = headers.get(HEADER_LENGTH)
            if len(body) <= THREADPOOL_BYTES:
                return parse_request(body, header_length, service.signature)
            if header_length is None:
                return await parser.parse(body, header_length, service.signature)
            return await asyncio.to_thread(parse_request, body, header_length, service.signature)
        finally:
            budget.give(taken)

    async def infer(name: str, version: str | None, scope: dict, receive, send) -> None:
        started = time.perf_counter()
        try:
            service = service_for(name, version)
        except ProtocolError as error:
            await _respond(send, error.status, _error_body(error.message), {"content-type": "application/json"})
            return
        try:
            with service.batcher.arriving():
                parsed = await read_request(service, scope, receive)
            rows = await service.route(parsed.logits)
            outputs = [(out, rows[out], binary) for out, binary in parsed.outputs]
            if parsed.logits.nbytes > THREADPOOL_BYTES:
                content, headers = await asyncio.to_thread(encode_infer_response, name, parsed.id, outputs)
            else:
                content, headers = encode_infer_response(name, parsed.id, outputs)
            if _client_gone(receive):
                raise ClientGone("the client disconnected before its answer was sent")
        except ClientGone as gone:
            log.warning("model %s: %s", name, gone)
            metrics.request_failed(name, "CLIENT_DISCONNECT")
            return
        except ProtocolError as error:
            metrics.request_failed(name, error.reason)
            await _respond(send, error.status, _error_body(error.message), _error_headers(error))
            return
        except Exception as error:  # noqa: BLE001 - a fault of ours (a parser process gone): logged, counted, a 500
            log.exception("model %s: the request failed inside the server", name)
            metrics.request_failed(name, "INTERNAL")
            await _respond(send, 500, _error_body(f"internal error: {error!r}"), {"content-type": "application/json"})
            return
        await _respond(send, 200, content, headers)
        metrics.request_done(name, time.perf_counter() - started)

    return _RoutingApp(app, infer)


def _error_body(message: str) -> bytes:
    return JSONResponse({"error": message}).body


def _error_headers(error: ProtocolError) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if error.status == 503:
        headers["retry-after"] = str(RETRY_AFTER_S)
    if error.status in (408, 413):
        # The client may still be sending: the connection cannot carry another request.
        headers["connection"] = "close"
    return headers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_server(app, host: str, port: int):
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=30
    )
    return uvicorn.Server(config)


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Serve ``app`` from a background thread; yields ``host:port``; on exit shuts down gracefully."""
    port = port or free_port(host)
    server = uvicorn_server(app, host, port)
    thread = threading.Thread(target=server.run, name="fusedgate-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"{host}:{port}"
    finally:
        server.should_exit = True
        thread.join()


def serve(models: Sequence[ServedModel], settings: ServerSettings, host: str, port: int) -> int:
    """Run the service in the foreground until SIGINT or SIGTERM; returns the exit status."""
    app = create_app(models, settings)
    server = uvicorn_server(app, host, port)
    names = ", ".join(f"{m.name} ({m.settings.backend}, bias {m.bias_source})" for m in models)
    print(f"fusedgate serving {names} on http://{host}:{port}", flush=True)
    server.run()
    return 0
