"""The capacity run: the service against the bare endpoint (``graphs.serve.bare``), same protocol, one sitting.

Both servers are started once, pinned to ``--server-cores`` (taskset); the load generator, pinned to
``--client-cores``, sends pre-built KServe v2 bodies (seeded logits of deepseek_v3: binary FP32 T=1, JSON FP32
T=1, binary FP32 T=128) at each concurrency for ``--seconds``, to the bare endpoint and to the service in
alternating slices (``--rounds``), so that other load on a shared machine hits both alike. The client is ``wrk``
(with ``wrk_body.lua``) where installed, else (or with ``--client python``) the closed-loop
``graphs.serve.loadgen``; ``--client both`` measures the bare endpoint with each, to show the Python client
saturates it. Requests per batch come from the service's own /metrics, and each server's CPU time per request
from its process's CPU time (all its threads) over its slices. The table (markdown) is printed and written to
``--out``. A benchmark, not a test: the targets it reports are ratios measured side by side.

``python -m graphs.serve.capacity [--backend cpu|gpu] [--seconds 15] [--client wrk|python|both]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from graphs.serve.loadtest import metric_totals
from op.configs import PRESETS

PRESET = "deepseek_v3"
PATH = f"/v2/models/{PRESET}/infer"
BODIES = {"binary T=1": (1, "binary"), "JSON T=1": (1, "json"), "binary T=128": (128, "binary")}
OUTPUTS = ("topk_values", "topk_indices")
WRK_SCRIPT = Path(__file__).with_name("wrk_body.lua")
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
# Targets of the issue: concurrency 1, p50 within 2x the bare endpoint's; 8 and 64, >= 0.8x its requests/s; at 64,
# the service's p99 within 3x its p50.
P50_TARGET, RATE_TARGET, TAIL_TARGET, TAIL_CONCURRENCY = 2.0, 0.8, 3.0, 64


@dataclass
class Measured:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_200: int
    requests: int
    # CPU seconds the server's process took during the run (set by the caller, which knows the process).
    server_cpu_s: float = 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_s / self.requests * 1e6 if self.requests else float("nan")


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_body(tokens: int, encoding: str, seed: int = 0) -> tuple[bytes, str]:
    """The request body and its Inference-Header-Content-Length ('' for a JSON body)."""
    experts = PRESETS[PRESET].num_experts
    x = np.random.default_rng([seed, tokens]).standard_normal((tokens, experts), dtype=np.float32) * 2
    tensor = {"name": "gating_output", "shape": [tokens, experts], "datatype": "FP32"}
    binary = encoding == "binary"
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
    else:
        tensor["data"] = x.reshape(-1).tolist()
    outputs = [{"name": name, "parameters": {"binary_data": binary}} for name in OUTPUTS]
    head = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
    return (head + x.tobytes(), str(len(head))) if binary else (head, "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pinned(cores: str, command: list[str]) -> list[str]:
    return ["taskset", "-c", cores, *command]


def start_server(command: list[str], cores: str, stdout: bool = False) -> tuple[subprocess.Popen, str]:
    """``command --port P`` pinned to ``cores``, once it answers ready; ``stdout``: its output kept in a pipe."""
    port = _free_port()
    pipe = {"stdout": subprocess.PIPE, "text": True} if stdout else {}
    process = subprocess.Popen(_pinned(cores, [*command, "--port", str(port)]), **pipe)
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(command)} exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=5) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{' '.join(command)} was not ready within 600 s")
        time.sleep(0.2)


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * UNITS_MS[unit]


def run_wrk(url: str, body: Path, header_length: str, concurrency: int, seconds: float, cores: str) -> Measured:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "--latency"]
    command += ["-s", str(WRK_SCRIPT), f"http://{url}{PATH}"]
    env = {**os.environ, "FUSEDGATE_BODY": str(body), "FUSEDGATE_HEADER_LENGTH": header_length}
    out = subprocess.run(_pinned(cores, command), env=env, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    percentiles = dict(re.findall(r"^\s*(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    if rate is None or count is None or set(percentiles) != {"50", "99"}:
        raise RuntimeError(f"wrk printed no rate or percentiles:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failures = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return Measured(float(rate.group(1)), _ms(percentiles["50"]), _ms(percentiles["99"]), failures, int(count.group(1)))


def run_python(url: str, body: Path, header_length: str, concurrency: int, seconds: float, cores: str) -> Measured:
    command = [sys.executable, "-m", "graphs.serve.loadgen", "--url", url, "--path", PATH, "--body", str(body)]
    command += ["--concurrency", str(concurrency), "--seconds", str(seconds)]
    if header_length:
        command += ["--header", f"Inference-Header-Content-Length:{header_length}"]
    out = subprocess.run(_pinned(cores, command), capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return Measured(result["requests_per_s"], result["p50_ms"], result["p99_ms"], result["non_200"], result["requests"])


CLIENTS = {"wrk": run_wrk, "python": run_python}


def _combined(slices: list[Measured]) -> Measured:
    """Slices of equal length: mean rate, median percentiles, all failures, requests and server CPU time."""
    return Measured(
        float(np.mean([m.requests_per_s for m in slices])),
        float(np.median([m.p50_ms for m in slices])),
        float(np.median([m.p99_ms for m in slices])),
        sum(m.non_200 for m in slices),
        sum(m.requests for m in slices),
        sum(m.server_cpu_s for m in slices),
    )


def _requests_per_batch(before: dict[str, float], after: dict[str, float]) -> float:
    executions = after.get("nv_inference_exec_count_total", 0) - before.get("nv_inference_exec_count_total", 0)
    inferences = after.get("nv_inference_count_total", 0) - before.get("nv_inference_count_total", 0)
    return inferences / executions if executions else float("nan")


def _verdict(concurrency: int, bare: Measured, served: Measured) -> str:
    if concurrency == 1:
        ratio = served.p50_ms / bare.p50_ms
        return f"p50 {ratio:.2f}x ({'meets' if ratio <= P50_TARGET else 'misses'} <= {P50_TARGET}x)"
    ratio = served.requests_per_s / bare.requests_per_s
    verdict = f"{'meets' if ratio >= RATE_TARGET else 'misses'} >= {RATE_TARGET}x"
    if concurrency >= TAIL_CONCURRENCY:
        tail = served.p99_ms / served.p50_ms
        verdict += f"; p99 {tail:.2f}x p50 ({'meets' if tail <= TAIL_TARGET else 'misses'} <= {TAIL_TARGET}x)"
    return verdict


def _row(body: str, concurrency: int, client: str, bare: Measured, served: Measured, per_batch: float) -> str:
    cells = [
        body,
        str(concurrency),
        client,
        f"{bare.requests_per_s:.0f}",
        f"{served.requests_per_s:.0f}",
        f"{served.requests_per_s / bare.requests_per_s:.2f}",
        f"{bare.p50_ms:.2f} / {bare.p99_ms:.2f}",
        f"{served.p50_ms:.2f} / {served.p99_ms:.2f}",
        _verdict(concurrency, bare, served),
        f"{per_batch:.1f}",
        f"{bare.cpu_us_per_request:.0f} / {served.cpu_us_per_request:.0f}",
        f"{bare.non_200} / {served.non_200}",
    ]
    return "| " + " | ".join(cells) + " |"


def _stack() -> str:
    parts = []
    for module in ("uvloop", "httptools", "orjson"):
        try:
            __import__(module)
            parts.append(f"{module} yes")
        except ImportError:
            parts.append(f"{module} no")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seconds", type=float, default=15, help="per server and row, split into --rounds slices")
    parser.add_argument("--rounds", type=int, default=3, help="alternating slices of bare and service runs")
    default_client = "wrk" if shutil.which("wrk") else "python"
    parser.add_argument("--client", choices=["wrk", "python", "both"], default=default_client)
    parser.add_argument("--server-cores", default="0", help="taskset list for both servers")
    parser.add_argument("--client-cores", default="1", help="taskset list for the load generator")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated")
    parser.add_argument("--bodies", default=",".join(BODIES), help=f"comma-separated of: {', '.join(BODIES)}")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument of fusedgate serve")
    parser.add_argument("--out", type=Path, default=None, help="default: reports/capacity-<date>-<backend>.md")
    parser.add_argument("--note", default="", help="a line under the table (machine, other load)")
    args = parser.parse_args(argv)
    bodies = [b.strip() for b in args.bodies.split(",")]
    unknown = [b for b in bodies if b not in BODIES]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if unknown or args.rounds < 1 or args.seconds < 0.5 * args.rounds or min(concurrencies) < 1:
        parser.error(
            f"--bodies from {list(BODIES)}, --rounds >= 1, --seconds >= 0.5 --rounds, --concurrency >= 1 "
            f"(unknown bodies: {unknown})"
        )
    slice_s = args.seconds / args.rounds
    clients = ["wrk", "python"] if args.client == "both" else [args.client]
    if "wrk" in clients and not shutil.which("wrk"):
        parser.error("wrk is not installed here: use --client python")

    service = [sys.executable, "-m", "harness.cli", "serve", "--preset", PRESET, "--backend", args.backend]
    bare, bare_url = start_server([sys.executable, "-m", "graphs.serve.bare"], args.server_cores)
    served, served_url = start_server([*service, *args.serve_arg], args.server_cores)
    header = [
        f"# Capacity: fusedgate ({args.backend} backend) against the bare FastAPI endpoint",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} cores; servers on cores "
        f"{args.server_cores}, load generator on {args.client_cores}; {args.rounds} alternating slices of "
        f"{slice_s:g} s per server and row; {_stack()}; "
        f"fusedgate serve {' '.join(args.serve_arg) or 'with its defaults'}.",
        "",
        "| body | concurrency | client | bare req/s | fusedgate req/s | ratio | bare p50 / p99 ms "
        "| fusedgate p50 / p99 ms | target | requests per batch | server CPU µs per request, bare / fusedgate "
        "| non-200 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for name in bodies:
                body, header_length = build_body(*BODIES[name])
                body_file = Path(scratch) / f"{name.replace(' ', '_')}.body"
                body_file.write_bytes(body)
                for concurrency in concurrencies:
                    for client in clients:
                        run = CLIENTS[client]
                        bare_slices, served_slices = [], []
                        before = metric_totals(served_url, PRESET)
                        for _ in range(args.rounds):
                            for process, url, slices in (
                                (bare, bare_url, bare_slices),
                                (served, served_url, served_slices),
                            ):
                                cpu = process_cpu_seconds(process.pid)
                                measured = run(url, body_file, header_length, concurrency, slice_s, args.client_cores)
                                measured.server_cpu_s = process_cpu_seconds(process.pid) - cpu
                                slices.append(measured)
                        per_batch = _requests_per_batch(before, metric_totals(served_url, PRESET))
                        on_bare, on_served = _combined(bare_slices), _combined(served_slices)
                        row = _row(name, concurrency, client, on_bare, on_served, per_batch)
                        rows.append(row)
                        print(row, flush=True)
    finally:
        for process in (bare, served):
            process.terminate()
            process.wait(timeout=60)
    text = "\n".join([*header, *rows, "", *([args.note] if args.note else [])]) + "\n"
    out = args.out or Path("reports") / f"capacity-{datetime.now(UTC):%Y-%m-%d}-{args.backend}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
