"""Where a request's time goes inside the service: wall-clock timers around its stages, under load.

A child process serves one preset (``--backend``) with timers wrapped around the stages of a request: the whole
ASGI call, ``parse_request``, the backend's batch ``launch`` and ``collect``, the poll of the device, the answer's
encoding and ``_respond`` (uvicorn's writes). The parent drives it with the capacity run's bodies and closed-loop
client (``graphs.serve.loadgen``), a warm-up and then ``--seconds`` per body and concurrency, and after each
reads the child's totals (and CPU time), which the child resets. The timers cost a few µs each, so the capacity
run (``graphs.serve.capacity``), without them, is what ratios are taken from; this says which stage to work on.

``python -m graphs.serve.stages [--backend cpu|gpu] [--concurrency 1,8] [--seconds 3] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from graphs.serve.capacity import BODIES, PATH, PRESET, build_body, run_python, start_server

# (name, per batch): the per-batch stages run once for a whole batch of requests.
STAGES = (
    ("request (ASGI call, wall)", False),
    ("parse_request", False),
    ("batch launch", True),
    ("device poll", True),
    ("batch collect", True),
    ("encode_infer_response", False),
    ("_respond (uvicorn's writes)", False),
)


class _Totals:
    def __init__(self) -> None:
        self.counts = {name: 0 for name, _ in STAGES}
        self.seconds = dict.fromkeys(self.counts, 0.0)
        self.cpu_start = time.process_time()

    def add(self, name: str, seconds: float) -> None:
        self.counts[name] += 1
        self.seconds[name] += seconds

    def report(self) -> dict:
        return {"counts": self.counts, "seconds": self.seconds, "cpu_s": time.process_time() - self.cpu_start}


def _timed(totals: list[_Totals], name: str, fn: Callable) -> Callable:
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[0].add(name, time.perf_counter() - start)

    return timed


def _timed_async(totals: list[_Totals], name: str, fn: Callable) -> Callable:
    async def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            totals[0].add(name, time.perf_counter() - start)

    return timed


def serve_timed(preset: str, backend: str, port: int) -> None:
    """The service with its stages timed; SIGUSR1 prints the totals since the last one as a JSON line."""
    import uvicorn

    from graphs.serve import server
    from graphs.serve.models import ModelSettings, ServedModel

    totals = [_Totals()]
    server.parse_request = _timed(totals, "parse_request", server.parse_request)
    server.encode_infer_response = _timed(totals, "encode_infer_response", server.encode_infer_response)
    server._respond = _timed_async(totals, "_respond (uvicorn's writes)", server._respond)
    server._until = _timed_async(totals, "device poll", server._until)
    model = ServedModel(ModelSettings(preset, backend=backend))
    model.launch = _timed(totals, "batch launch", model.launch)
    model.collect = _timed(totals, "batch collect", model.collect)
    call = _timed_async(totals, "request (ASGI call, wall)", server.create_app([model], server.ServerSettings()))

    async def app(scope, receive, send):
        await call(scope, receive, send)

    def report(*_) -> None:
        print(json.dumps(totals[0].report()), flush=True)
        totals[0] = _Totals()

    signal.signal(signal.SIGUSR1, report)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()


def _read_report(process) -> dict:
    """The timed child's totals since the last report (other lines it prints are passed over)."""
    process.send_signal(signal.SIGUSR1)
    for line in process.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"the timed server exited (status {process.wait()}) before it sent its totals")


def table(columns: list[tuple[str, dict, dict]]) -> str:
    """Markdown: a row per stage, a column per (body, concurrency) as ``(title, totals, client figures)``."""
    rows = [
        ("requests per s (client)", [f"{load['requests_per_s']:.0f}" for _, _, load in columns]),
        ("p50 ms (client)", [f"{load['p50_ms']:.2f}" for _, _, load in columns]),
    ]
    requests = [totals["counts"][STAGES[0][0]] for _, totals, _ in columns]
    batches = [totals["counts"]["batch launch"] for _, totals, _ in columns]
    rows.append(
        (
            "server CPU µs per request",
            [f"{t['cpu_s'] / max(n, 1) * 1e6:.1f}" for (_, t, _), n in zip(columns, requests, strict=True)],
        )
    )
    for name, per_batch in STAGES:
        means = []
        for _, totals, _ in columns:
            count = totals["counts"][name]
            means.append(f"{totals['seconds'][name] / count * 1e6:.1f}" if count else "-")
        rows.append((f"{name} µs{' per batch' if per_batch else ''}", means))
    rows.append(("requests per batch", [f"{n / b:.1f}" if b else "-" for n, b in zip(requests, batches, strict=True)]))
    lines = ["| stage | " + " | ".join(title for title, _, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="per body and concurrency, after a 1 s warm-up")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated")
    parser.add_argument("--bodies", default="binary T=1,JSON T=1", help=f"comma-separated of: {', '.join(BODIES)}")
    parser.add_argument("--server-cores", default="0")
    parser.add_argument("--client-cores", default="1")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    # The child's mode: serve with timers on --port.
    parser.add_argument("--serve-timed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_timed:
        serve_timed(PRESET, args.backend, args.port)
        return 0
    bodies = [b.strip() for b in args.bodies.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if any(b not in BODIES for b in bodies) or min(concurrencies) < 1 or args.seconds <= 0:
        parser.error(f"--bodies from {list(BODIES)}, --concurrency >= 1, --seconds > 0")
    command = [sys.executable, "-m", "graphs.serve.stages", "--backend", args.backend, "--serve-timed"]
    process, url = start_server(command, args.server_cores, stdout=True)
    columns = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for name in bodies:
                body, header_length = build_body(*BODIES[name])
                body_file = Path(scratch) / "body"
                body_file.write_bytes(body)
                for concurrency in concurrencies:
                    run_python(url, body_file, header_length, concurrency, 1.0, args.client_cores)
                    _read_report(process)
                    load = run_python(url, body_file, header_length, concurrency, args.seconds, args.client_cores)
                    report = _read_report(process)
                    columns.append((f"{name}, c{concurrency}", report, load.__dict__))
    finally:
        process.terminate()
        process.wait(timeout=60)
    text = (
        f"{args.backend} backend, {PRESET}, {PATH}; server on cores {args.server_cores}, client on "
        f"{args.client_cores}; mean µs per request (per batch where marked), {args.seconds:g} s a column\n\n"
        + table(columns)
        + "\n"
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
