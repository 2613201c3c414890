"""A closed-loop HTTP/1.1 load generator for hosts without ``wrk``: ``concurrency`` keep-alive connections, each
sending one pre-built request and reading its answer before the next, for ``seconds``. It does nothing per
request but write fixed bytes and read the answer's length, so one core of it outruns the bare endpoint (the
capacity run shows both clients side by side where ``wrk`` exists).

``python -m graphs.serve.loadgen --url HOST:PORT --path P --body FILE [--header NAME:VALUE] --concurrency C
--seconds S`` prints one JSON line: requests, requests per second, latency p50 and p99 in ms, non-200 answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np


def request_bytes(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _connection(host: str, port: int, request: bytes, until: float, latencies: list, failures: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != b"200":
                failures.append(status.decode())
    finally:
        writer.close()


async def run_load(url: str, path: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> dict:
    host, port = url.rsplit(":", 1)
    request = request_bytes(url, path, body, headers)
    latencies, failures = [], []
    started = time.perf_counter()
    until = started + seconds
    connections = [_connection(host, int(port), request, until, latencies, failures) for _ in range(concurrency)]
    await asyncio.gather(*connections)
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "non_200": len(failures),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="host:port")
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.seconds <= 0:
        parser.error("--concurrency must be >= 1 and --seconds > 0")
    headers = dict(h.split(":", 1) for h in args.header)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run_load(args.url, args.path, args.body.read_bytes(), headers, args.concurrency, args.seconds))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
