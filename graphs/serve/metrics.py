"""Prometheus metrics of the routing service, named after Triton Inference Server's where it has one.

Triton's cumulative microsecond counters (request, queue and compute durations) and its inference and
execution counts are kept under its names; what Triton lacks (bucket fill, replays per bucket, latency
histograms) is under ``fusedgate_``. Requests per replay = ``nv_inference_count / nv_inference_exec_count``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from graphs.serve.batcher import BatchRecord

LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
FILL_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class ServiceMetrics:
    """One registry per server, so that several servers (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.success = Counter("nv_inference_request_success", "Successful inference requests", ["model"], registry=r)
        self.failure = Counter(
            "nv_inference_request_failure", "Failed inference requests, by reason", ["model", "reason"], registry=r
        )
        self.inference_count = Counter(
            "nv_inference_count",
            "Inference requests computed",
            ["model"],
            registry=r,
        )
        self.exec_count = Counter("nv_inference_exec_count", "Batches computed (graph replays)", ["model"], registry=r)
        self.request_us = Counter(
            "nv_inference_request_duration_us", "Cumulative end-to-end request time (µs)", ["model"], registry=r
        )
        self.queue_us = Counter(
            "nv_inference_queue_duration_us", "Cumulative time requests waited in the queue (µs)", ["model"], registry=r
        )
        self.compute_us = Counter(
            "nv_inference_compute_infer_duration_us", "Cumulative batch compute time (µs)", ["model"], registry=r
        )
        self.pending = Gauge(
            "nv_inference_pending_request_count", "Requests accepted and waiting for a batch", ["model"], registry=r
        )
        self.request_seconds = Histogram(
            "fusedgate_request_duration_seconds",
            "End-to-end request time",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("fusedgate_inference_rows", "Token rows computed for requests", ["model"], registry=r)
        self.fill = Histogram(
            "fusedgate_bucket_fill_ratio",
            "Real rows / rows computed per batch",
            ["model"],
            buckets=FILL_BUCKETS,
            registry=r,
        )
        self.replays = Counter("fusedgate_bucket_replays", "Batches per bucket", ["model", "bucket"], registry=r)
        self._done: dict[str, tuple] = {}
        self._batches: dict[str, tuple] = {}
        self._replays: dict[tuple[str, int], object] = {}

    def batch(self, model: str, record: BatchRecord, bucket: int, padded_rows: int) -> None:
        # As in request_done: the labelled children looked up once (seven lookups took 7 of a batch's 10 µs here).
        children = self._batches.get(model)
        if children is None:
            children = self._batches[model] = tuple(
                metric.labels(model)
                for metric in (
                    self.inference_count,
                    self.exec_count,
                    self.queue_us,
                    self.compute_us,
                    self.rows,
                    self.fill,
                )
            )
        inference_count, exec_count, queue_us, compute_us, rows, fill = children
        replays = self._replays.get((model, bucket))
        if replays is None:
            replays = self._replays[model, bucket] = self.replays.labels(model, str(bucket))
        inference_count.inc(record.requests)
        exec_count.inc()
        queue_us.inc(sum(record.queue_seconds) * 1e6)
        compute_us.inc(record.compute_seconds * 1e6)
        rows.inc(record.rows)
        fill.observe(record.rows / padded_rows)
        replays.inc()

    def request_done(self, model: str, seconds: float) -> None:
        # The labelled children, looked up once per model: labels() takes a lock and builds a key each call.
        children = self._done.get(model)
        if children is None:
            children = self._done[model] = (
                self.success.labels(model),
                self.request_us.labels(model),
                self.request_seconds.labels(model),
            )
        success, request_us, request_seconds = children
        success.inc()
        request_us.inc(seconds * 1e6)
        request_seconds.observe(seconds)

    def request_failed(self, model: str, reason: str) -> None:
        self.failure.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
