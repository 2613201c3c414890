"""Isolation benchmark: T=1 binary requests while large JSON requests are read and parsed.

Starts ``fusedgate serve`` (CPU backend, default limits), keeps one client sending T=1 binary requests back to
back, then sends ``--large`` JSON requests of T=40000 rows of E=256 at once (about 60 MiB each, three decimals
per logit). Prints the T=1 latencies while they were in flight (target: worst under 250 ms), what the large
requests got (200, or 503 beyond the bound on bodies in flight), and the server's peak memory (its process and
the parser's, read from /proc, and the two added, though they need not peak at once) above its resting size,
against the bytes of large bodies admitted (target: under 4x). A benchmark, not a test.

``python -m graphs.serve.isolation [--large 1] [--out FILE]``
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from graphs.serve.capacity import PATH, PRESET, build_body, start_server

TOKENS, EXPERTS = 40000, 256


def large_json_body(seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal((TOKENS, EXPERTS)).round(3)
    tensor = {"name": "gating_output", "shape": [TOKENS, EXPERTS], "datatype": "FP32", "data": x.reshape(-1)}
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _family(pid: int) -> list[int]:
    """The process and its descendants."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += _family(int(child))
    return found


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, float]:
    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    started = time.perf_counter()
    connection.request("POST", PATH, body, headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=1, help="large JSON requests sent at once")
    parser.add_argument("--out", type=Path, default=None, help="markdown file the figures are appended to")
    args = parser.parse_args(argv)
    if args.large < 1:
        parser.error("--large must be >= 1")
    large = large_json_body()
    small, header_length = build_body(1, "binary")
    small_headers = {"Inference-Header-Content-Length": header_length}
    server, url = start_server([sys.executable, "-m", "harness.cli", "serve", "--preset", PRESET], "0-1023")
    try:
        host, port = url.split(":")
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def small_client() -> None:
            connection = http.client.HTTPConnection(host, int(port), timeout=300)
            while not stop.is_set():
                started = time.perf_counter()
                connection.request("POST", PATH, small, small_headers)
                connection.getresponse().read()
                samples.append((started, time.perf_counter() - started))

        resting_kib = {p: _kib(p, "VmRSS") for p in _family(server.pid)}
        client = threading.Thread(target=small_client)
        client.start()
        time.sleep(1.0)
        answers: list[tuple[int, float]] = []
        window_start = time.perf_counter()
        senders = [threading.Thread(target=lambda: answers.append(_post(url, large, {}))) for _ in range(args.large)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        window_end = time.perf_counter()
        time.sleep(0.5)
        stop.set()
        client.join()
        growth = {p: (_kib(p, "VmHWM") - resting_kib[p]) * 1024 for p in resting_kib}
    finally:
        server.terminate()
        server.wait(timeout=60)
    during = [latency * 1e3 for started, latency in samples if window_start <= started <= window_end]
    admitted = sum(1 for status, _ in answers if status == 200)
    body_bytes = max(1, admitted * len(large))
    server_growth = growth.pop(server.pid)
    parser_growth = sum(growth.values())
    lines = [
        f"large JSON bodies: {args.large} x {len(large) / 2**20:.1f} MiB (T={TOKENS}, E={EXPERTS}); answers "
        + ", ".join(f"{status} in {seconds:.2f} s" for status, seconds in sorted(answers)),
        f"T=1 binary requests while they were in flight: {len(during)}, p50 {statistics.median(during):.1f} ms, "
        f"worst {max(during):.1f} ms (target < 250 ms)",
        f"peak memory above resting, against the {admitted} admitted bodies (target < 4x): server process "
        f"{server_growth / 2**20:.0f} MiB = {server_growth / body_bytes:.2f}x; parser process (one body at a time) "
        f"{parser_growth / 2**20:.0f} MiB = {parser_growth / len(large):.2f}x one body; both peaks added "
        f"{(server_growth + parser_growth) / 2**20:.0f} MiB = {(server_growth + parser_growth) / body_bytes:.2f}x",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            out.write("".join(f"- {line}\n" for line in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
