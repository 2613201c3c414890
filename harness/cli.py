"""The ``fusedgate`` command line.

A command that cannot run here (no CUDA GPU, a port in use, a bad argument) says why in one line on stderr
and exits non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import numpy as np

from harness.inputs import DISTRIBUTIONS, generate_input
from harness.paths import PATHS, cuda_reason
from op import reference
from op.configs import ALL_CONFIGS, PRESETS


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (the usage text is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(command: str, message: str) -> int:
    print(f"fusedgate {command}: {message}", file=sys.stderr)
    return 1


def _needs_gpu(command: str, hint: str) -> int | None:
    """Exit status 1 with the reason where no CUDA GPU is usable, else None."""
    reason = cuda_reason()
    return None if reason is None else _fail(command, f"needs a CUDA GPU ({reason}); {hint}")


def _reference_table(args: argparse.Namespace) -> int:
    names = args.preset or sorted(PRESETS)
    print(f"numpy reference, {args.dtype} logits, distribution {args.distribution}, seed {args.seed}")
    print("| preset | E | n_group | topk_group | top_k | T | fallback rows | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        config = ALL_CONFIGS[name]
        x, bias = generate_input(config, args.tokens, args.dtype, args.seed, args.distribution)
        start = time.perf_counter()
        _, values, ids = reference.grouped_topk(x, bias, *config.args())
        elapsed = time.perf_counter() - start
        fallback = int(
            ((ids == np.arange(config.top_k)) & (values == reference.fallback_weight(config.top_k))).all(axis=1).sum()
        )
        print(
            f"| {name} | {config.num_experts} | {config.n_group} | {config.topk_group} | {config.top_k} "
            f"| {args.tokens} | {fallback} | {elapsed:.3f} |"
        )
    return 0


def _align(args: argparse.Namespace) -> int:
    from harness.align import run_alignment
    from harness.paths import CPU_PATHS, GPU_PATHS, cuda_reason

    paths = args.path or list(CPU_PATHS + (GPU_PATHS if cuda_reason() is None else ()))
    result = run_alignment(paths, args.preset or sorted(ALL_CONFIGS), args.dtype, args.tokens, args.distribution)
    if args.csv:
        from harness.results import write_csv

        write_csv(Path(args.csv), result.rows)
    print(result.table)
    for name, reason in result.skipped.items():
        print(f"skipped {name}: {reason}")
    for failure in result.failures:
        print(f"FAIL {failure}")
    print(result.summary)
    return 0 if result.ok else 1


def _report(args: argparse.Namespace) -> int:
    from harness.paths import cuda_reason
    from harness.report import run_report
    from harness.sweep import default_tokens

    tokens = args.tokens or default_tokens(cuda_reason() is None)
    folder = run_report(
        Path(args.out),
        args.preset or sorted(PRESETS),
        args.dtype,
        tokens,
        args.align_tokens,
        args.repeats,
        Path(args.compare) if args.compare else None,
    )
    print(f"report written to {folder / 'report.md'}")
    return 0


def _crossover(args: argparse.Namespace) -> int:
    from harness.crossover import BOOTSTRAP_METHOD, describe
    from harness.progress import Progress
    from harness.sweep import (
        CPU_LAUNCHES,
        DEFAULT_CPU_PAIRS,
        DEFAULT_GPU_PAIRS,
        GPU_LAUNCHES,
        default_tokens,
        run_sweep,
    )

    on_gpu = cuda_reason() is None
    pairs = args.pair or (DEFAULT_GPU_PAIRS if on_gpu else DEFAULT_CPU_PAIRS)
    unavailable = {p: PATHS[p].unavailable() for pair in pairs for p in pair if PATHS[p].unavailable()}
    if unavailable:
        return _fail("crossover", "; ".join(f"path {p} is unavailable here: {why}" for p, why in unavailable.items()))
    tokens = args.tokens or default_tokens(on_gpu)
    presets = args.preset or sorted(PRESETS)
    launches = GPU_LAUNCHES if on_gpu else CPU_LAUNCHES
    paths = {p for pair in pairs for p in pair}
    progress = Progress(len(presets) * len(launches) * len(tokens) * len(paths))
    print(f"speedup bands: {BOOTSTRAP_METHOD}, n = {args.repeats} repeats per point; T = {tokens}", flush=True)
    for preset in presets:
        sweep = run_sweep(preset, args.dtype, tokens, pairs, on_gpu, repeats=args.repeats, progress=progress)
        for launch, pairs_bands in sweep.bands.items():
            for pair, pair_bands in pairs_bands.items():
                candidate, baseline = pair.split(" vs ")
                print(f"{preset}: {launch}: {pair}: {describe(pair_bands, candidate, baseline)}", flush=True)
    progress.close()
    return 0


def _compare(args: argparse.Namespace) -> int:
    from harness.compare import compare_folders

    try:
        lines = compare_folders(Path(args.old), Path(args.new))
    except ValueError as error:
        return _fail("compare", str(error))
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"cross-card table written to {args.out}")
    else:
        print(text, end="")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from harness.profile import profile

    return profile(args.path, args.preset, args.dtype, args.tokens, Path(args.out))


def _bench(args: argparse.Namespace) -> int:
    refused = _needs_gpu("bench", "on a CUDA host run `nox -s bench`")
    if refused is not None:
        return refused
    from harness.bench import run

    return run(args)


def _model_settings(args: argparse.Namespace) -> list:
    from graphs.serve.models import ModelSettings

    return [
        ModelSettings(
            preset,
            backend=args.backend,
            index_dtype=args.index_dtype,
            with_scores=args.with_scores,
            bias_file=args.bias_files.get(preset),
            bias_seed=args.bias_seed,
            bucket_policy=args.bucket_policy,
            max_bucket=args.max_bucket,
        )
        for preset in args.preset
    ]


def _port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None; checked before the server announces itself."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the server sets it: a port left in TIME_WAIT by an earlier server is free to take.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def _serve(args: argparse.Namespace) -> int:
    if args.backend == "gpu":
        refused = _needs_gpu("serve", "use --backend cpu here")
        if refused is not None:
            return refused
    busy = _port_in_use(args.host, args.port)
    if busy:
        return _fail("serve", f"cannot listen on {args.host}:{args.port}: {busy} (pick another --port)")
    from graphs.serve.models import ServedModel
    from graphs.serve.server import serve

    models = [ServedModel(s) for s in _model_settings(args)]
    return serve(models, args.settings, args.host, args.port)


def _loadtest(args: argparse.Namespace) -> int:
    from graphs.serve.loadtest import describe, run_loadtest, spawn_server, stop_server
    from graphs.serve.server import free_port

    process, url = None, args.url
    if not url:
        port = free_port()
        extra = ["--max-queue-delay-us", str(args.max_queue_delay_us)]
        process = spawn_server(args.preset, args.backend, port, extra + (["--with-scores"] if args.with_scores else []))
        url = f"127.0.0.1:{port}"
    try:
        bias = Path(args.bias) if args.bias else None
        result = run_loadtest(
            url, args.preset, args.clients, args.requests, args.max_request_tokens, args.seed, bias, args.encoding
        )
    finally:
        status = stop_server(process) if process is not None else 0
    print(describe(result, args.preset, args.backend if process else f"at {url}", args.clients, args.encoding))
    if status != 0:
        print(f"the server exited with status {status} on SIGTERM")
    return 0 if result.ok and status == 0 else 1


def _pair(text: str) -> tuple[str, str]:
    candidate, sep, baseline = text.partition(":")
    if not sep or candidate not in PATHS or baseline not in PATHS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CANDIDATE:BASELINE, each one of {', '.join(PATHS)}")
    return candidate, baseline


def _token_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token counts") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be integers >= 0")
    return values


def _positive_token_list(text: str) -> list[int]:
    values = _token_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be >= 1 here")
    return values


def build_parser() -> argparse.ArgumentParser:
    from harness.bench import build_parser as bench_parser

    parser = OneLineParser(prog="fusedgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    dtypes = ["float32", "bfloat16", "float16"]

    ref = commands.add_parser("reference", help="route a generated batch with the numpy reference and time it")
    ref.add_argument("--preset", action="append", choices=sorted(ALL_CONFIGS), help="repeatable; default: all presets")
    ref.add_argument("--tokens", type=int, default=65536)
    ref.add_argument("--dtype", choices=dtypes, default="bfloat16")
    ref.add_argument("--distribution", choices=DISTRIBUTIONS, default="randn")
    ref.add_argument("--seed", type=int, default=0)
    ref.set_defaults(run=_reference_table)

    align = commands.add_parser("align", help="alignment matrix of every available path against the reference")
    align.add_argument(
        "--path", action="append", choices=sorted(PATHS), help="repeatable; default: every available path"
    )
    align.add_argument("--preset", action="append", choices=sorted(ALL_CONFIGS))
    align.add_argument("--dtype", action="append", choices=dtypes, default=None)
    align.add_argument("--tokens", type=_token_list, default=[1, 7, 128, 1000])
    align.add_argument("--distribution", action="append", choices=DISTRIBUTIONS)
    align.add_argument("--csv", default="")
    align.set_defaults(run=_align)

    report = commands.add_parser("report", help="alignment, crossover sweep and plots into reports/<date>-<card>/")
    report.add_argument("--out", default="reports")
    report.add_argument("--preset", action="append", choices=sorted(ALL_CONFIGS))
    report.add_argument("--dtype", choices=dtypes, default="bfloat16")
    report.add_argument(
        "--tokens",
        type=_positive_token_list,
        default=None,
        help="default: powers of 2 up to 65536 on a GPU, of 4 up to 4096 on the CPU",
    )
    report.add_argument("--align-tokens", type=_token_list, default=[1, 7, 128])
    report.add_argument("--repeats", type=int, default=15)
    report.add_argument(
        "--compare",
        default="",
        help="an earlier report folder: adds a regression table (same card) or the cross-card table (another card)",
    )
    report.set_defaults(run=_report)

    cross = commands.add_parser("crossover", help="sweep pairs of paths and report where they cross")
    cross.add_argument("--pair", action="append", type=_pair, help="CANDIDATE:BASELINE, repeatable")
    cross.add_argument("--preset", action="append", choices=sorted(ALL_CONFIGS))
    cross.add_argument("--dtype", choices=dtypes, default="bfloat16")
    cross.add_argument(
        "--tokens",
        type=_positive_token_list,
        default=None,
        help="default: powers of 2 up to 65536 on a GPU, of 4 up to 4096 on the CPU (as report)",
    )
    cross.add_argument("--repeats", type=int, default=15)
    cross.set_defaults(run=_crossover)

    prof = commands.add_parser("profile", help="Nsight Compute over one bench configuration's NVTX range")
    prof.add_argument("--path", default="fused", choices=["fused", "fused_noscores", "two_kernel", "fused_block"])
    prof.add_argument("--preset", default="deepseek_v3", choices=sorted(ALL_CONFIGS))
    prof.add_argument("--dtype", choices=dtypes, default="bfloat16")
    prof.add_argument("--tokens", type=int, default=8192)
    prof.add_argument("--out", default="reports/profile")
    prof.set_defaults(run=_profile)

    serve = commands.add_parser("serve", help="the routing service (Open Inference Protocol, dynamic batching)")
    serve.add_argument("--preset", action="append", required=True, choices=sorted(PRESETS), help="repeatable")
    serve.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--index-dtype", choices=["int64", "int32"], default="int64")
    serve.add_argument("--with-scores", action="store_true", help="also offer the [T, E] scores output")
    serve.add_argument("--bias", action="append", metavar="NAME=FILE", help=".npy or .safetensors; repeatable")
    serve.add_argument("--bias-seed", type=int, default=0, help="seed of the bias of models given no --bias file")
    serve.add_argument("--bucket-policy", choices=["pow2", "fastdeploy", "vllm", "sglang"], default="pow2")
    serve.add_argument("--max-bucket", type=int, default=8192, help="largest bucket: the most rows one batch takes")
    serve.add_argument("--max-queue-delay-us", type=int, default=100)
    serve.add_argument("--max-queue-size", type=int, default=1024)
    serve.add_argument(
        "--max-body-bytes", type=int, default=None, help="default: a binary FP32 request of --max-tokens rows fits"
    )
    serve.add_argument("--max-body-bytes-in-flight", type=int, default=None, help="default: twice --max-body-bytes")
    serve.add_argument("--body-timeout-s", type=float, default=30.0, help="a body not in by then gets 408")
    serve.add_argument("--max-tokens", type=int, default=65536, help="most tokens in one request")
    serve.set_defaults(run=_serve)

    load = commands.add_parser("loadtest", help="concurrent clients against the service, every answer checked")
    load.add_argument("--url", default="", help="host:port of a running server; default: start one")
    load.add_argument("--preset", default="deepseek_v3", choices=sorted(PRESETS))
    load.add_argument("--backend", choices=["cpu", "gpu"], default="cpu", help="of the server started here")
    load.add_argument("--with-scores", action="store_true", help="of the server started here")
    load.add_argument("--max-queue-delay-us", type=int, default=100, help="of the server started here")
    load.add_argument("--clients", type=int, default=32)
    load.add_argument("--requests", type=int, default=2000)
    load.add_argument("--max-request-tokens", type=int, default=512)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--bias", default="", help="the bias file of a --url server whose model was given one")
    load.add_argument(
        "--encoding", choices=["mixed", "binary"], default="mixed", help="mixed: JSON or binary at random per tensor"
    )
    load.set_defaults(run=_loadtest)

    bench = commands.add_parser(
        "bench", parents=[bench_parser(add_help=False)], help="every GPU path side by side, hot and cold L2"
    )
    bench.set_defaults(run=_bench)

    compare = commands.add_parser("compare", help="the cross-card table of two report folders")
    compare.add_argument("old", help="a report folder (holding results.csv), e.g. the H100 one under reports/")
    compare.add_argument("new", help="another report folder")
    compare.add_argument("--out", default="", help="write the markdown table here instead of stdout")
    compare.set_defaults(run=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reference" and args.tokens < 0:
        parser.error(f"--tokens={args.tokens} is out of range: allowed >= 0")
    if args.command == "align":
        args.dtype = args.dtype or ["bfloat16"]
        args.distribution = args.distribution or list(DISTRIBUTIONS)
    if args.command == "serve":
        from graphs.serve.server import ServerSettings

        args.bias_files = {}
        for spec in args.bias or []:
            name, sep, path = spec.partition("=")
            if not sep or name not in args.preset:
                parser.error(f"--bias {spec!r}: expected NAME=FILE with NAME one of the served presets {args.preset}")
            args.bias_files[name] = Path(path)
        try:
            args.settings = ServerSettings(
                args.max_queue_delay_us,
                args.max_queue_size,
                args.max_body_bytes,
                args.max_tokens,
                args.body_timeout_s,
                args.max_body_bytes_in_flight,
            )
        except ValueError as error:
            parser.error(str(error))
    if args.command == "loadtest" and min(args.clients, args.requests, args.max_request_tokens) < 1:
        parser.error("--clients, --requests and --max-request-tokens must each be >= 1")
    if getattr(args, "repeats", 15) < 3:
        parser.error(f"--repeats={args.repeats} is out of range: allowed >= 3")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
