"""The C++ CPU kernel's own machinery, on both of its per-token loops (the processor's own and the portable one):
rows split over threads, the thread count's sources, the selection widths it switches between, and its float
decoding and sigmoid at the edges. Inputs are hand-built (answers known exactly) or drawn from ``generate_input``
with the run's recorded seed."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from harness.inputs import generate_input
from op import grouped_topk, reference
from op.build import build_library, library
from op.configs import ALL_CONFIGS
from op.testing import WEIGHT_RTOL, assert_routing_close

THREADS_ENV = "FUSEDGATE_CPU_THREADS"
ISA_ENV = "FUSEDGATE_CPU_ISA"


@pytest.fixture(autouse=True, params=["native", "portable"])
def isa(request, monkeypatch):
    """Every test here runs on the processor's own loop and on the portable one."""
    if request.param == "portable":
        monkeypatch.setenv(ISA_ENV, "portable")
    return request.param


@pytest.fixture
def threads_env(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    return lambda value: monkeypatch.setenv(THREADS_ENV, value)


def unwritten_outputs(num_tokens: int, num_experts: int, top_k: int):
    """Outputs filled with values no routed row holds, so a row that no thread wrote shows."""
    return (
        np.full((num_tokens, num_experts), np.nan, np.float32),
        np.full((num_tokens, top_k), np.nan, np.float32),
        np.full((num_tokens, top_k), -1, np.int64),
    )


@pytest.mark.parametrize(("name", "num_tokens"), [("x_e72", 14600), ("fd_kimi_k2", 2800)])
def test_scores_starting_anywhere_in_a_cache_line_give_the_portable_loop_s_bits(name, num_tokens, seed, monkeypatch):
    """From 4 MiB of scores the AVX-512 loop writes them through a block buffer laid out like the output's cache
    lines, by non-temporal stores, and the partial lines at a block's ends by masked stores. Scores starting at
    every float of a 64-byte line (72 experts also start every other row mid-line), split over three threads:
    the single-threaded portable loop's bits, and nothing written outside the array. First in this file, so that
    a stray write fails here before it can corrupt the heap under another test."""
    config = ALL_CONFIGS[name]
    size = num_tokens * config.num_experts
    assert size * 4 >= 1 << 22
    x, bias = generate_input(config, num_tokens, "float32", seed, "nonfinite")
    loop = os.environ.get(ISA_ENV)
    monkeypatch.setenv(ISA_ENV, "portable")
    want = grouped_topk(x, bias, *config.args(), num_threads=1)
    if loop is None:
        monkeypatch.delenv(ISA_ENV)
    else:
        monkeypatch.setenv(ISA_ENV, loop)
    for offset in range(16):
        backing = np.full(size + 64, np.nan, np.float32)
        start = (-backing.ctypes.data // 4) % 16 + offset
        out = unwritten_outputs(num_tokens, config.num_experts, config.top_k)
        out = (backing[start : start + size].reshape(num_tokens, config.num_experts), *out[1:])
        grouped_topk(x, bias, *config.args(), out=out, num_threads=3)
        for got, expected in zip(out, want, strict=True):
            assert np.array_equal(got, expected), f"scores {offset} floats past a 64-byte boundary"
        assert np.isnan(backing[:start]).all() and np.isnan(backing[start + size :]).all()


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2", "x_e160_g8", "x_e512_k32"])
@pytest.mark.parametrize("num_tokens", [4919, 130])
def test_every_thread_count_gives_the_same_bits(name, num_tokens, seed, threads_env):
    """4919 tokens split unevenly over 2 or 3 threads (3 for every config here); 130 are too few to split."""
    config = ALL_CONFIGS[name]
    x, bias = generate_input(config, num_tokens, "float32", seed, "nonfinite")
    results = []
    for threads in (1, 2, 3):
        out = unwritten_outputs(num_tokens, config.num_experts, config.top_k)
        grouped_topk(x, bias, *config.args(), out=out, num_threads=threads)
        results.append(out)
    for out in results[1:]:
        for got, want in zip(out, results[0], strict=True):
            assert np.array_equal(got, want)
    assert_routing_close(results[0], x, bias, config)


def test_rows_are_split_over_the_threads_asked_for(threads_env):
    count = library().cpu_thread_count
    assert count(4096, 256, 3) == 3
    assert count(1024, 256, 0) == min(len(os.sched_getaffinity(0)), 4), "4 threads' worth of work at most"
    threads_env("3")
    assert count(4096, 256, 0) == 3
    assert count(4096, 256, 2) == 2, "the keyword wins over the environment"
    assert count(1, 256, 3) == 1, "one token never starts a thread"
    assert count(256, 256, 3) == 1, "256 tokens are too little work to split"
    assert count(1024, 128, 3) == 2, "1024 tokens of 128 experts are worth two threads"


def test_calls_from_several_threads_at_once_give_one_thread_s_bits(seed):
    """One call holds the pool of worker threads; the others start threads of their own. The callers are daemon
    threads with a deadline, so a pool that two calls share fails here instead of hanging the run."""
    config = ALL_CONFIGS["kimi_k2"]
    inputs = [generate_input(config, 3000, "float32", seed + i) for i in range(6)]
    expected = [grouped_topk(x, bias, *config.args(), num_threads=1) for x, bias in inputs]
    results: dict[int, tuple] = {}

    def call(i: int) -> None:
        for _ in range(3):
            results[i] = grouped_topk(*inputs[i], *config.args(), num_threads=2)

    callers = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(inputs))]
    for caller in callers:
        caller.start()
    deadline = time.monotonic() + 30
    for caller in callers:
        caller.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(caller.is_alive() for caller in callers), "a call never returned"
    for i, want in enumerate(expected):
        assert all(np.array_equal(g, w) for g, w in zip(results[i], want, strict=True))


def test_calls_between_pauses_give_one_thread_s_bits(seed):
    """A pool worker still waking when its caller has routed every row is left out of that call, and may wake into
    the next one: calls after pauses around the workers' spin time (about 200 us) and the wake-up time of an idle
    processor, each checked against one thread, with a deadline so that a call waiting for a worker that never
    joins fails here instead of hanging the run."""
    config = ALL_CONFIGS["glm45_air"]
    inputs = [generate_input(config, 2048 + 8 * i, "float32", seed + i) for i in range(4)]
    expected = [grouped_topk(x, bias, *config.args(), num_threads=1) for x, bias in inputs]
    mismatched: list[tuple[int, float]] = []

    def calls() -> None:
        for round_ in range(10):
            for i, (x, bias) in enumerate(inputs):
                pause = (0.0, 5e-5, 2e-4, 1e-3)[(round_ + i) % 4]
                time.sleep(pause)
                got = grouped_topk(x, bias, *config.args(), num_threads=2)
                if not all(np.array_equal(g, w) for g, w in zip(got, expected[i], strict=True)):
                    mismatched.append((i, pause))

    caller = threading.Thread(target=calls, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "a call never returned"
    assert not mismatched, f"(input, pause) pairs whose routing differed from one thread's: {mismatched}"


def _pool_workers_cpus() -> list[set[int]]:
    """The CPUs each of this process's pool workers may run on, from /proc."""
    allowed = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        if status.get("Name") == "fusedgate-cpu":
            cpus = set()
            for part in status["Cpus_allowed_list"].split(","):
                first, _, last = part.partition("-")
                cpus.update(range(int(first), int(last or first) + 1))
            allowed.append(cpus)
    return allowed


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and two CPUs"
)
def test_pool_workers_may_run_anywhere_but_on_their_caller_s_cpu(seed):
    """The scheduler tends to wake a worker on its waker's CPU, where it cannot start before the caller's part
    ends: each call allows the workers every CPU of the process but the caller's. The caller is a thread pinned to
    one CPU, then to another; the process's own affinity (its main thread's) stays as it was."""
    config = ALL_CONFIGS["glm45"]
    x, bias = generate_input(config, 4096, "float32", seed)
    process_cpus = os.sched_getaffinity(0)
    seen: dict[int, list[set[int]]] = {}

    def call_from(cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})
        grouped_topk(x, bias, *config.args(), num_threads=2)
        seen[cpu] = _pool_workers_cpus()

    for cpu in sorted(process_cpus)[:2]:
        caller = threading.Thread(target=call_from, args=(cpu,), daemon=True)
        caller.start()
        caller.join(timeout=30)
        assert not caller.is_alive(), "a call never returned"
        assert seen[cpu], "the call started no pool worker"
        assert all(allowed == process_cpus - {cpu} for allowed in seen[cpu]), (cpu, seen[cpu])


def test_the_library_shares_no_object_with_another_build_in_the_process():
    """A unique symbol (a static of an inline function or class, such as the CPU thread pool's or the CUDA
    launchers' caches) is one object across the process: a second build of the library loaded beside this one
    would use this one's pool, block state or caches, whose layout may differ. The library exports none, with or
    without its CUDA kernels."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    symbols = subprocess.run(
        [nm, "-D", "--defined-only", str(build_library())], capture_output=True, text=True, check=True
    ).stdout
    unique = [line for line in symbols.splitlines() if line.split()[1:2] == ["u"]]
    assert not unique, f"unique symbols: {unique}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_routes_on_threads_of_its_own(seed):
    """The parent's pool threads do not exist in a child: the child must start its own, not wait for them."""
    config = ALL_CONFIGS["deepseek_v3"]
    x, bias = generate_input(config, 4096, "float32", seed)
    expected = grouped_topk(x, bias, *config.args(), num_threads=2)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as child:
        got = child.apply_async(grouped_topk, (x, bias, *config.args()), {"num_threads": 2}).get(timeout=60)
    assert all(np.array_equal(g, w) for g, w in zip(got, expected, strict=True))


def test_environment_variable_reaches_a_call(threads_env, seed):
    config = ALL_CONFIGS["deepseek_v3"]
    x, bias = generate_input(config, 8, "float32", seed)
    threads_env("not-a-number")
    with pytest.raises(ValueError, match=THREADS_ENV):
        grouped_topk(x, bias, *config.args())
    assert_routing_close(grouped_topk(x, bias, *config.args(), num_threads=1), x, bias, config)


@pytest.mark.parametrize("value", ["0", "-2", "2x", "1025", " "])
def test_bad_environment_values_are_rejected(value, threads_env):
    threads_env(value)
    with pytest.raises(ValueError, match=f"{THREADS_ENV}='{value}' is invalid: allowed an integer 1 <="):
        library().cpu_thread_count(4096, 256, 0)


@pytest.mark.parametrize("value", [0, -1, 1025, 1.5, True, "2", np.float32(2.0)])
def test_bad_num_threads_are_rejected(value):
    x = np.zeros((4, 256), np.float32)
    with pytest.raises(ValueError, match="num_threads=.* is invalid: allowed an int 1 <= num_threads <= 1024"):
        grouped_topk(x, np.zeros(256, np.float32), 8, 4, 8, True, 1.0, num_threads=value)


def test_numpy_integer_num_threads_is_accepted(seed):
    config = ALL_CONFIGS["glm45_air"]
    x, bias = generate_input(config, 5, "float32", seed)
    assert_routing_close(grouped_topk(x, bias, *config.args(), num_threads=np.int64(2)), x, bias, config)


def test_num_threads_at_the_c_boundary_is_checked():
    x = np.zeros((2, 8), np.float32)
    args = (np.zeros(8, np.float32), None, np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64), 1, 1, 2, True, 1.0)
    with pytest.raises(ValueError, match="num_threads=-1 is out of range"):
        library().cpu_grouped_topk(x, *args, -1)


@pytest.mark.parametrize("num_experts", [16, 24, 40, 128, 1024])
def test_equal_experts_go_to_the_lower_index_at_every_selection_width(num_experts):
    """Every expert ties: all are candidates, so 16, 24 and 40 experts take the 16-, 32- and 64-wide rank selection
    and 128 or more the insertion list."""
    x = np.zeros((3, num_experts), np.float32)
    _, values, ids = grouped_topk(x, np.zeros(num_experts, np.float32), 1, 1, 8, True, 1.0)
    assert (ids == np.arange(8)).all()
    assert (values == np.float32(0.125)).all()


@pytest.mark.parametrize("num_experts", [24, 128])
def test_strictly_ordered_experts_come_out_in_order(num_experts):
    ramp = np.arange(num_experts, dtype=np.float32) / num_experts
    x = np.stack([ramp, -ramp])
    _, _, ids = grouped_topk(x, np.zeros(num_experts, np.float32), 1, 1, 8, True, 1.0)
    assert ids[0].tolist() == list(range(num_experts - 1, num_experts - 9, -1))
    assert ids[1].tolist() == list(range(8))


def test_float16_nan_and_inf_logits_decode_as_such():
    # A NaN logit is invalid however large its bias; +-inf are valid with s = 1 and 0.
    x = np.array([[np.nan, -np.inf, np.inf, 0.0]], np.float16)
    bias = np.array([10.0, 0.0, 0.0, 0.0], np.float32)
    _, values, ids = grouped_topk(x, bias, 1, 1, 3, False, 1.0)
    assert ids[0].tolist() == [2, 3, 1]
    assert values[0].tolist() == [1.0, 0.5, 0.0]


def test_infinite_bias_makes_an_expert_invalid():
    x = np.zeros((1, 4), np.float32)
    bias = np.array([np.inf, 0.0, -np.inf, 0.1], np.float32)
    _, _, ids = grouped_topk(x, bias, 1, 1, 2, True, 1.0)
    assert ids[0].tolist() == [3, 1]


def test_an_infinite_bias_is_invalid_where_groups_are_scored():
    # Four groups of four tie at 1.0 (0.5 + 0.5); the infinite bias must neither raise group 0 nor be chosen.
    x = np.zeros((1, 16), np.float32)
    bias = np.zeros(16, np.float32)
    bias[0] = np.inf
    _, _, ids = grouped_topk(x, bias, 4, 2, 2, True, 1.0)
    assert ids[0].tolist() == [1, 2]


def test_sigmoid_holds_the_standard_where_exp_saturates_and_overflows():
    """Near 1 (the argument clamp) and at subnormal and zero scores (exp near and past float's largest value)."""
    x = np.array([[12.0, 15.0, 17.0, 30.0, -87.0, -88.5, -88.72, -89.0, -100.0, -np.inf]], np.float32)
    bias = np.zeros(10, np.float32)
    _, values, ids = grouped_topk(x, bias, 1, 1, 10, False, 1.0)
    _, expected_values, expected_ids = reference.grouped_topk(x, bias, 1, 1, 10, False, 1.0)
    assert ids.tolist() == expected_ids.tolist()
    np.testing.assert_allclose(values, expected_values, rtol=WEIGHT_RTOL, atol=0)
    assert values[0][-3:].tolist() == [0.0, 0.0, 0.0]
