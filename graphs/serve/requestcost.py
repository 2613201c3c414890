"""CPU time per request of the service's ASGI application beside the bare endpoint's, in one process, with no HTTP
server, client or socket: what the capacity run measures through the whole stack, less the stack's own share,
so that a few microseconds of the service's work show above a shared machine's noise.

Requests are the capacity run's bodies, sent ``concurrency`` at a time to the application, the service and the bare
endpoint in alternating rounds; each figure is the least CPU time per request over the rounds (other load only
ever adds to it). ``python -m graphs.serve.requestcost [--backend cpu|gpu] [--requests 3000] [--rounds 5]``
prints a markdown table. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from graphs.serve.bare import create_bare_app
from graphs.serve.capacity import BODIES, PATH, PRESET, build_body
from graphs.serve.models import ModelSettings, ServedModel
from graphs.serve.server import create_app


def _scope(body: bytes, header_length: str) -> dict:
    headers = [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode())]
    if header_length:
        headers.append((b"inference-header-content-length", header_length.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


async def _request(app, scope: dict, body: bytes) -> None:
    """One request as an ASGI server hands it over: the whole body at once, then nothing until a disconnect."""
    received = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        # As uvicorn's receive: an event that a disconnect would set.
        await received.wait()
        return {"type": "http.disconnect"}

    status = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(dict(scope), receive, send)
    if status != [200]:
        raise RuntimeError(f"the application answered {status}")


async def _cpu_per_request(app, scope: dict, body: bytes, concurrency: int, requests: int) -> float:
    cpu = time.process_time()
    for _ in range(requests // concurrency):
        await asyncio.gather(*(_request(app, scope, body) for _ in range(concurrency)))
    return (time.process_time() - cpu) / (requests // concurrency * concurrency) * 1e6


async def _lifespan(app) -> tuple[asyncio.Queue, asyncio.Queue]:
    """Start ``app``'s lifespan; returns its inbox (a shutdown put there ends it) and outbox."""
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    asyncio.get_running_loop().create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the service did not start: {started.get('message', started)}")
    return inbox, outbox


async def measure(backend: str, bodies: list[str], concurrencies: list[int], requests: int, rounds: int) -> list[str]:
    service = create_app([ServedModel(ModelSettings(PRESET, backend=backend))])
    bare = create_bare_app()
    inbox, outbox = await _lifespan(service)
    lines = [
        "| body | concurrency | bare CPU µs per request | fusedgate CPU µs per request | difference |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    try:
        for name in bodies:
            body, header_length = build_body(*BODIES[name])
            scope = _scope(body, header_length)
            for concurrency in concurrencies:
                least = {"bare": float("inf"), "fusedgate": float("inf")}
                for app in (bare, service):
                    await _cpu_per_request(app, scope, body, concurrency, max(concurrency, requests // 10))
                for _ in range(rounds):
                    for label, app in (("bare", bare), ("fusedgate", service)):
                        spent = await _cpu_per_request(app, scope, body, concurrency, requests)
                        least[label] = min(least[label], spent)
                cells = [name, str(concurrency), f"{least['bare']:.1f}", f"{least['fusedgate']:.1f}"]
                cells.append(f"{least['fusedgate'] - least['bare']:+.1f}")
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    finally:
        # The batcher drained and the parser process stopped before the loop closes.
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--requests", type=int, default=3000, help="per application, round and row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="1,8", help="comma-separated")
    parser.add_argument("--bodies", default="binary T=1,JSON T=1", help=f"comma-separated of: {', '.join(BODIES)}")
    args = parser.parse_args(argv)
    bodies = [b.strip() for b in args.bodies.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if any(b not in BODIES for b in bodies) or min(concurrencies) < 1 or args.rounds < 1:
        parser.error(f"--bodies from {list(BODIES)}, --concurrency >= 1, --rounds >= 1")
    if args.requests < max(concurrencies):
        parser.error("--requests must be at least the largest --concurrency")
    print(f"{args.backend} backend; least of {args.rounds} alternating rounds of {args.requests} requests", flush=True)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(measure(args.backend, bodies, concurrencies, args.requests, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
