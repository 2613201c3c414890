"""The routing service: the Open Inference Protocol over FastAPI, one dynamic batcher per served model.

``fusedgate serve`` runs it under uvicorn. A request is read (bounded), decoded and validated before it joins
its model's queue; the batch it rides is computed on the model's one worker thread inside an NVTX range
``serve:<preset>:bucket<B>``; its own rows are cut out and encoded in the format it asked for. On shutdown
uvicorn stops accepting, in-flight requests are answered, then every batcher drains its queue.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import nvtx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from graphs.serve.batcher import BatchRecord, DynamicBatcher, Pending, QueueFull, ShuttingDown
from graphs.serve.metrics import ServiceMetrics
from graphs.serve.models import ServedModel
from graphs.serve.protocol import HEADER_LENGTH, ModelSignature, ProtocolError, encode_infer_response, parse_infer

NVTX_DOMAIN = "fusedgate"
SERVER_NAME = "fusedgate"
# Bodies above this are decoded and encoded off the event loop, so one large request does not stall the others.
THREADPOOL_BYTES = 1 << 20
DRAIN_FACTOR = 4


@dataclass(frozen=True)
class ServerSettings:
    max_queue_delay_us: int = 100
    max_queue_size: int = 1024
    max_body_bytes: int = 64 << 20
    max_tokens: int = 65536

    def __post_init__(self) -> None:
        for name, low in (("max_queue_delay_us", 0), ("max_queue_size", 1), ("max_body_bytes", 1), ("max_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is out of range: allowed an int >= {low}")


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
        )
        # Read at scrape time, so the gauge is never stale between batches.
        metrics.pending.labels(model.name).set_function(lambda: self.batcher.waiting)

    def _bucket(self, rows: int) -> int:
        """The bucket a batch of ``rows`` is labelled by (the largest one for a batch served in chunks)."""
        return self.model.table.bucket_for(min(rows, self.model.table.largest))

    def _compute(self, batch: Sequence[Pending]) -> list[dict[str, np.ndarray]]:
        rows = sum(p.rows for p in batch)
        logits = batch[0].payload if len(batch) == 1 else np.concatenate([p.payload for p in batch])
        bucket = self._bucket(rows)
        with nvtx.annotate(f"serve:{self.model.name}:bucket{bucket}", domain=NVTX_DOMAIN):
            outputs = self.model.compute(logits)
        results, start = [], 0
        for pending in batch:
            stop = start + pending.rows
            results.append({name: array[start:stop].copy() for name, array in outputs.items()})
            start = stop
        return results

    def _record(self, record: BatchRecord) -> None:
        self.metrics.batch(self.model.name, record, self._bucket(record.rows), self.model.padded_rows(record.rows))


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes; past it 413, after reading on (up to 4x the limit) so that the client,
    still sending, receives the answer instead of a reset connection."""
    declared = request.headers.get("content-length")
    too_long = ProtocolError(
        413, f"request body of {declared or 'more than ' + str(limit)} bytes exceeds the limit of {limit} bytes"
    )
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_long
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_FACTOR * limit:
            raise too_long
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_long
    return b"".join(chunks)


def create_app(models: Sequence[ServedModel], settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServiceMetrics()
    services = {m.name: _ModelService(m, settings, metrics) for m in models}
    if len(services) != len(models):
        raise ValueError("each model is served once: a preset was given twice")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for service in services.values():
            await service.batcher.start()
        app.state.ready = True
        yield
        app.state.ready = False
        for service in services.values():
            await service.batcher.stop()

    app = FastAPI(title=SERVER_NAME, lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.ready = False
    app.state.metrics = metrics

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    def service_for(name: str) -> _ModelService:
        if name not in services:
            raise ProtocolError(404, f"unknown model {name!r}: served models are {', '.join(sorted(services))}")
        return services[name]

    @app.exception_handler(ProtocolError)
    async def protocol_error(_: Request, error: ProtocolError) -> JSONResponse:
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
    async def model_metadata(name: str) -> dict:
        return service_for(name).model.metadata(settings.max_tokens)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        service_for(name)
        if not app.state.ready:
            return _error(503, f"model {name} is not ready")
        return JSONResponse({"name": name, "ready": True})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        started = time.perf_counter()
        service = service_for(name)
        try:
            body = await _read_body(request, settings.max_body_bytes)
            header_length = request.headers.get(HEADER_LENGTH)
            if len(body) > THREADPOOL_BYTES:
                parsed = await run_in_threadpool(parse_infer, body, header_length, service.signature)
            else:
                parsed = parse_infer(body, header_length, service.signature)
            logits = parsed.logits
            try:
                rows = await service.batcher.submit(logits.shape[0], logits.dtype.name, logits)
            except QueueFull as full:
                raise ProtocolError(503, str(full), "QUEUE_FULL") from None
            except ShuttingDown as closing:
                raise ProtocolError(503, str(closing), "UNAVAILABLE") from None
            except Exception as broken:  # noqa: BLE001 - the backend failed; the client gets a 500 naming why
                raise ProtocolError(500, f"routing failed: {broken}", "BACKEND") from None
            outputs = [(out, rows[out], binary) for out, binary in parsed.outputs]
            if logits.nbytes > THREADPOOL_BYTES:
                content, headers = await run_in_threadpool(encode_infer_response, name, parsed.id, outputs)
            else:
                content, headers = encode_infer_response(name, parsed.id, outputs)
        except ProtocolError as error:
            metrics.request_failed(name, error.reason)
            return _error(error.status, error.message)
        metrics.request_done(name, time.perf_counter() - started)
        return Response(content, headers=headers)

    return app


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_server(app: FastAPI, host: str, port: int):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    return uvicorn.Server(config)


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
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
