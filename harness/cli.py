"""The ``fusedgate`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from harness.inputs import DISTRIBUTIONS, generate_input
from op import reference
from op.configs import ALL_CONFIGS, PRESETS


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
    return 0 if result.ok else 1


def _report(args: argparse.Namespace) -> int:
    from harness.paths import cuda_reason
    from harness.report import run_report

    # The CPU paths are slow enough at large T that a CPU report stops at 4096 tokens, in steps of 4.
    tokens = args.tokens or ([2**i for i in range(17)] if cuda_reason() is None else [4**i for i in range(7)])
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
    from harness.paths import cuda_reason
    from harness.sweep import DEFAULT_CPU_PAIRS, DEFAULT_GPU_PAIRS, run_sweep

    on_gpu = cuda_reason() is None
    pairs = (
        [tuple(p.split(":")) for p in args.pair] if args.pair else (DEFAULT_GPU_PAIRS if on_gpu else DEFAULT_CPU_PAIRS)
    )
    print(f"speedup bands: {BOOTSTRAP_METHOD}, n = {args.repeats} repeats per point")
    for preset in args.preset or sorted(PRESETS):
        _, bands = run_sweep(preset, args.dtype, args.tokens, pairs, on_gpu, repeats=args.repeats)
        for pair, pair_bands in bands.items():
            candidate, baseline = pair.split(" vs ")
            print(f"{preset}: {pair}: {describe(pair_bands, candidate, baseline)}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from harness.profile import profile

    return profile(args.path, args.preset, args.dtype, args.tokens, Path(args.out))


def _bench(args: argparse.Namespace) -> int:
    from harness.bench import main as bench_main

    return bench_main(args.rest)


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


def _serve(args: argparse.Namespace) -> int:
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
    parser = argparse.ArgumentParser(prog="fusedgate", description=__doc__)
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
    align.add_argument("--path", action="append", help="repeatable; default: every available path")
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
    report.add_argument("--compare", default="", help="an earlier report folder: adds a regression table")
    report.set_defaults(run=_report)

    cross = commands.add_parser("crossover", help="sweep pairs of paths and report where they cross")
    cross.add_argument("--pair", action="append", help="CANDIDATE:BASELINE, repeatable")
    cross.add_argument("--preset", action="append", choices=sorted(ALL_CONFIGS))
    cross.add_argument("--dtype", choices=dtypes, default="bfloat16")
    cross.add_argument("--tokens", type=_positive_token_list, default=[2**i for i in range(17)])
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

    bench = commands.add_parser("bench", help="every GPU path side by side (arguments as harness.bench)")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
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
