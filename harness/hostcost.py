"""Host cost per call of the front-end, beside one framework op (``torch.sigmoid``) measured in the same process.

Each row is the wall-clock time per call of ``calls`` back-to-back calls (on a GPU, closed by one
synchronisation), taken ``repeats`` times with the rows interleaved, so drift in the machine's speed hits every
row alike; the table gives the median, and the ratios compare the medians or, with ``--statistic min``, each
row's least time (on a machine shared with other jobs, many short repeats and their least time give the cost of
a call that no other work interrupted, which a median of long repeats does not). Targets are ratios within this
one run: absolute figures move between hosts of one kind by more than the differences they would judge. The
graph runner gets a different input tensor on every call (a rotation of distinct tensors built beforehand), as a
server does.

``python -m harness.hostcost --out reports/hostcost`` writes ``hostcost.csv`` and ``hostcost.md`` there.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.inputs import generate_input
from harness.results import cpu_card, git_commit
from op.build import library
from op.configs import PRESETS

PRESET = "deepseek_v3"
DISTINCT_INPUTS = 64


@dataclass(frozen=True)
class Row:
    name: str
    call: Callable[[], object] | None  # None: the row times ``loop`` itself
    baseline: str | None = None  # the row whose time the target ratio divides by
    target: float | None = None
    loop: Callable[[int], None] | None = None  # runs the call n times, for rows that vary their input per call


def _rows(torch, device: str, tokens: int) -> list[Row]:
    import op
    from graphs.runner import GraphRunner

    config = PRESETS[PRESET]
    x_np, bias_np = generate_input(config, tokens, "bfloat16", seed=0)
    as_tensor = lambda a: torch.from_numpy(a.astype("float32")).to(torch.bfloat16).to(device)  # noqa: E731
    x, bias = as_tensor(x_np), torch.from_numpy(bias_np).to(device)
    args = config.args()
    out = op.grouped_topk(x, bias, *args)
    shapes = ((tokens, config.num_experts), (tokens, config.top_k), (tokens, config.top_k))
    f32, i64 = torch.float32, torch.int64
    cuda = device == "cuda"
    sigmoid = "torch.sigmoid(x)"
    eager_target, two_kernel_target, runner_target = (1.5, 2.5, 2.5) if cuda else (3.0, None, None)
    rows = [
        Row(sigmoid, lambda: torch.sigmoid(x)),
        Row(
            "three torch.empty (the outputs)",
            lambda: (
                torch.empty(shapes[0], dtype=f32, device=device),
                torch.empty(shapes[1], dtype=f32, device=device),
                torch.empty(shapes[2], dtype=i64, device=device),
            ),
        ),
        # How the tvm-ffi path allocates its outputs (bound empty_like on the CPU, bound new_empty on CUDA, where a
        # plan must hold no device memory), and the alternatives it measured against: bound new_empty with the
        # sizes, and one allocation cut into the outputs by views. Torch calls take the torch extension, which
        # allocates in C++ (the plan rows below).
        Row("the tvm-ffi path's allocation of the three outputs", _op_allocation(torch, device, shapes)),
        Row("three bound new_empty", _new_empty(torch, device, shapes)),
        Row("one torch.empty cut into the outputs (view + 3 as_strided)", _one_buffer(torch, device, shapes)),
        Row("op.grouped_topk eager", lambda: op.grouped_topk(x, bias, *args), sigmoid, eager_target),
        Row(
            "op.grouped_topk(..., return_scores=False)",
            lambda: op.grouped_topk(x, bias, *args, return_scores=False),
            sigmoid,
            eager_target,
        ),
        Row(
            "op.grouped_topk(..., out=preallocated)",
            lambda: op.grouped_topk(x, bias, *args, out=out),
            sigmoid,
            eager_target,
        ),  # fmt: skip
        # The floor under the front-end: the library entry point alone on preallocated outputs (at T=1 on the
        # CPU this includes the kernel's own work, about a third of it; DLPack hand-over of the tensors is most of
        # the rest).
        Row("library entry point alone, outputs given", _library_call(cuda, x, bias, out, args)),
        Row("library entry point alone, no scores", _library_call(cuda, x, bias, (None, *out[1:]), args)),
        # An eager call is its plan's look-up and its plan; the plan of each path alone, in this process.
        Row("op.grouped_topk's plan alone: torch extension", _plan_alone(True, "fused", x, bias, args)),
        Row("op.grouped_topk's plan alone: tvm-ffi, outputs from Python", _plan_alone(False, "fused", x, bias, args)),
    ]
    if not cuda:
        return rows
    scores, biased = op.cast_sigmoid_bias(x, bias)
    rows += [
        Row(
            "op.two_kernel_grouped_topk eager",
            lambda: op.two_kernel_grouped_topk(x, bias, *args),
            sigmoid,
            two_kernel_target,
        ),  # fmt: skip
        Row("op.two_kernel_grouped_topk's plan alone: torch extension", _plan_alone(True, "two", x, bias, args)),
        Row(
            "op.two_kernel_grouped_topk's plan alone: tvm-ffi, outputs from Python",
            _plan_alone(False, "two", x, bias, args),
        ),
        Row("op.cast_sigmoid_bias eager", lambda: op.cast_sigmoid_bias(x, bias), sigmoid),
        Row("op.noaux_tc eager", lambda: op.noaux_tc(scores, biased, *args), sigmoid),
        Row("op.fused_block_grouped_topk eager", lambda: op.fused_block_grouped_topk(x, bias, *args), sigmoid),
    ]
    runner = GraphRunner("fused", config, [tokens], "bfloat16", name=PRESET)
    inputs = [as_tensor(generate_input(config, tokens, "bfloat16", seed=i)[0]) for i in range(DISTINCT_INPUTS)]
    graph = runner._graphs[tokens]

    def runner_loop(n: int) -> None:
        for i in range(n):
            runner(inputs[i % DISTINCT_INPUTS], bias)

    replay = "bare graph.replay() of that bucket"
    # The runner's copy-in and replay in one library call beside the framework's copy and replay it replaced.
    static = runner.static_logits[:tokens]
    replay_rows, graph_exec = library().replay_rows, graph.raw_cuda_graph_exec()

    def torch_copy_and_replay() -> None:
        static.copy_(x)
        graph.replay()

    rows += [
        Row(f'GraphRunner("fused", ...)(x, bias) at T={tokens}', None, replay, runner_target, loop=runner_loop),
        Row(replay, graph.replay),
        Row("the runner's copy-in and replay (library replay_rows)", lambda: replay_rows(static, x, graph_exec)),
        Row("torch copy_ of the same rows, then graph.replay()", torch_copy_and_replay),
    ]
    return rows


def _op_allocation(torch, device: str, shapes) -> Callable[[], object]:
    from op.frameworks import adapter_for

    (rows, experts), (_, k), _ = shapes
    specs = [((rows, experts), "float32"), ((rows, k), "float32"), ((rows, k), "int64")]
    return adapter_for(torch.empty(0, device=device)).allocator(specs)


def _new_empty(torch, device: str, shapes) -> Callable[[], object]:
    (rows, experts), (_, k), _ = shapes
    make_scores = torch.empty(0, dtype=torch.float32, device=device).new_empty
    make_ids = torch.empty(0, dtype=torch.int64, device=device).new_empty
    return lambda: (make_scores(rows, experts), make_scores(rows, k), make_ids(rows, k))


def _one_buffer(torch, device: str, shapes) -> Callable[[], object]:
    (rows, experts), (_, k), _ = shapes
    # float32 words: the scores, the values and the ids (two words each), each piece on a 16-byte boundary.
    first_values = -(-rows * experts // 4) * 4
    first_ids = first_values + -(-rows * k // 4) * 4
    words = first_ids + 2 * rows * k

    def allocate() -> tuple:
        buffer = torch.empty(words, dtype=torch.float32, device=device)
        return (
            buffer.as_strided((rows, experts), (experts, 1), 0),
            buffer.as_strided((rows, k), (k, 1), first_values),
            buffer.view(torch.int64).as_strided((rows, k), (k, 1), first_ids // 2),
        )

    return allocate


def _plan_alone(extension: bool, path: str, x, bias, args) -> Callable[[], object]:
    """The plan an eager call of ``path`` ("fused" or "two") finds, built with the torch extension or without it
    (``FUSEDGATE_TORCH_CALL=0``) and called without the look-up."""
    from op import api

    saved = os.environ.get("FUSEDGATE_TORCH_CALL")
    os.environ["FUSEDGATE_TORCH_CALL"] = "1" if extension else "0"
    try:
        if path == "fused":
            plan = api._fused_plan("fused_grouped_topk", False, x, bias, *args, "int64", True, None, None, False)
        else:
            plan = api._two_kernel_plan(x, bias, *args, "int64", True, None, False)
    finally:
        if saved is None:
            os.environ.pop("FUSEDGATE_TORCH_CALL")
        else:
            os.environ["FUSEDGATE_TORCH_CALL"] = saved
    return lambda: plan(x, bias, None, None)


def _library_call(cuda: bool, x, bias, out, args) -> Callable[[], object]:
    if cuda:
        entry = library().fused_grouped_topk
        return lambda: entry(x, bias, *out, None, *args)
    entry = library().cpu_grouped_topk
    return lambda: entry(x, bias, *out, *args, 0)


def _time_rows(
    rows: list[Row], sync: Callable[[], None], calls: int, repeats: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {row.name: [] for row in rows}
    loops = {row.name: row.loop or _repeat(row.call) for row in rows}
    for loop in loops.values():
        loop(max(calls // 10, 1))
    sync()
    for _ in range(repeats):
        for name, loop in loops.items():
            start = clock()
            loop(calls)
            sync()
            samples[name].append((clock() - start) * 1e6 / calls)
    return samples


def _repeat(call: Callable[[], object]) -> Callable[[int], None]:
    def loop(n: int) -> None:
        for _ in range(n):
            call()

    return loop


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


STATISTICS = {"median": statistics.median, "min": min}


def measure(
    device: str, tokens: int, calls: int, repeats: int, clock: str = "wall", statistic: str = "median"
) -> list[dict]:
    """One table: per row its median, least and largest µs, and where it has a target, the ratio of the rows'
    ``statistic`` and whether it is met."""
    if clock == "thread" and device != "cpu":
        raise ValueError("clock='thread' counts this thread's CPU time only: allowed for device 'cpu' alone")
    import torch

    rows = _rows(torch, device, tokens)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = _time_rows(rows, sync, calls, repeats, CLOCKS[clock])
    medians = {name: statistics.median(values) for name, values in samples.items()}
    judged = {name: STATISTICS[statistic](values) for name, values in samples.items()}
    card = torch.cuda.get_device_name() if device == "cuda" else cpu_card()
    table = []
    for row in rows:
        ratio = judged[row.name] / judged[row.baseline] if row.baseline else None
        table.append({
            "device": device,
            "card": card,
            "clock": clock,
            "statistic": statistic,
            "preset": PRESET,
            "T": tokens,
            "call": row.name,
            "us_p50": round(medians[row.name], 2),
            "us_min": round(min(samples[row.name]), 2),
            "us_max": round(max(samples[row.name]), 2),
            "against": row.baseline or "",
            "ratio": "" if ratio is None else round(ratio, 2),
            "target": "" if row.target is None else f"<= {row.target}x",
            "status": "" if row.target is None or ratio is None else ("met" if ratio <= row.target else "missed"),
            "commit": git_commit(),
        })  # fmt: skip
    return table


def markdown(table: list[dict]) -> str:
    lines = []
    for device in dict.fromkeys(r["device"] for r in table):
        part = [r for r in table if r["device"] == device]
        first = part[0]
        lines += [
            f"### {first['card']} ({device} tensors), {first['preset']}, T={first['T']}, bfloat16, "
            f"{first['clock']} clock, ratios of the {first['statistic']}",
            "",
            f"| call | µs ({first['statistic']}) | range | ratio | target | status |",
            "|---|---|---|---|---|---|",
        ]
        for r in part:
            ratio = f"{r['ratio']}x {r['against']}" if r["ratio"] != "" else ""
            lines.append(
                f"| `{r['call']}` | {r['us_min'] if r['statistic'] == 'min' else r['us_p50']} | "
                f"{r['us_min']}-{r['us_max']} | {ratio} | {r['target']} | "
                f"{r['status']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for hostcost.csv and hostcost.md")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--devices", default="auto", help="'auto' (cuda where present, and cpu), or a list: cuda,cpu")
    parser.add_argument(
        "--statistic",
        choices=sorted(STATISTICS),
        default="median",
        help="what the ratios compare: each row's median over the repeats, or its least (with many short repeats, "
        "the cost of a call when no other work took the core, steadier on a shared machine)",
    )
    parser.add_argument(
        "--cpu-clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="clock of the CPU-tensor table: 'thread' counts only this thread's CPU time, steadier on a machine "
        "shared with other work (GPU tables are always wall-clock)",
    )
    args = parser.parse_args(argv)
    import torch

    devices = args.devices.split(",") if args.devices != "auto" else []
    if not devices:
        devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    table = [
        row
        for device in devices
        for row in measure(
            device,
            args.tokens,
            args.calls,
            args.repeats,
            args.cpu_clock if device == "cpu" else "wall",
            args.statistic,
        )
    ]
    text = markdown(table)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostcost.md").write_text(text + "\n")
    with open(args.out / "hostcost.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {args.out / 'hostcost.md'} and hostcost.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
