"""Mutation check: every single-line break in ``tests/mutants/*.toml`` must be caught by the tests of its file.

Each row names a source ``file``, a ``find`` text that must occur there exactly once (so the table cannot rot
as the code changes), its ``replace``ment, the DESIGN.md rule it breaks and whether it is ``gpu``-only code. Each
mutant is applied to a scratch copy of the tracked tree, the kernel library is rebuilt there when a C++ file
changed (into a private cache, removed afterwards), and the file's test subset runs with ``-x``; the first
failing test is the mutant's killer. The run fails unless every mutant is killed.

``python -m harness.mutants`` runs the CPU rows (the C++ CPU kernel alone is built); ``--gpu`` runs the
``gpu = true`` rows against the GPU rule tests, building for the visible GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "tests" / "mutants"
C_SUFFIXES = {".cc", ".cu", ".cuh", ".h"}

# The pytest arguments that exercise each mutated source: the hand-built tests whose answers are known exactly,
# narrowed to the path that runs the file, so a CPU run stays within a few minutes on two cores.
CPU_TESTS = {
    "op/reference.py": ["tests/test_reference_rules.py", "-k", "[reference"],
    "op/testing.py": ["tests/test_checker.py"],
    **{
        f"op/csrc/{name}": [
            "tests/test_reference_rules.py",
            "tests/test_cpu_kernel_internals.py",
            "tests/test_cpu_kernel_loops.py",
            "-k",
            "cpu_kernel-numpy or test_cpu_kernel_internals or test_cpu_kernel_loops",
        ]
        for name in ("cpu_kernel.cc", "cpu_pool.h", "cpu_route.h", "cpu_route_portable.h", "cpu_route_avx512.h")
    },
    "op/csrc/torch/torch_call.cc": ["tests/test_torch_call.py"],
}
GPU_TESTS = {
    "op/csrc/routing.cuh": ["tests/test_reference_rules.py", "-k", "fused or two_kernel"],
    # A launch on the legacy default stream passed the torch side-stream test on an H200 (the legacy stream
    # orders itself with blocking streams); a non-blocking CuPy stream has no such ordering.
    "op/csrc/launch.cuh": ["tests/test_gpu_kernels.py", "tests/test_gpu_cupy.py", "-k", "side_stream or eager_call"],
    "op/csrc/fused_latency.cuh": ["tests/test_reference_rules.py", "-k", "fused and not fused_block"],
    "op/csrc/fused_warp.cuh": ["tests/test_reference_rules.py", "-k", "fused and not fused_block"],
    "op/csrc/two_kernel.cu": ["tests/test_gpu_kernels.py", "tests/test_reference_rules.py", "-k", "two_kernel"],
    "op/csrc/replay_rows.cu": [
        "tests/test_gpu_graphs.py",
        "-k",
        "bias_changes or converted_on_copy_in or own_rows or overlapping",
    ],
    "op/csrc/replay_host_rows.cu": ["tests/test_gpu_graphs.py", "-k", "host"],
    "op/csrc/torch/torch_call.cc": ["tests/test_torch_call.py", "-k", "current_stream"],
}
# The rule tests route a few tokens, which `fused` sends to its block-per-token kernel; the warp kernel's rows
# run them with that kernel forced. Likewise the rows of the portable CPU loop and of the pieces it
# shares with the AVX-512 loop (which uses some of them only past 16 candidates): a processor with AVX-512 takes
# the other loop.
TEST_ENV = {
    "op/csrc/fused_warp.cuh": {"FUSEDGATE_LATENCY_MAX_TOKENS": "0", "FUSEDGATE_WARP_MAX_TOKENS": str(2**40)},
    "op/csrc/cpu_route_portable.h": {"FUSEDGATE_CPU_ISA": "portable"},
    "op/csrc/cpu_route.h": {"FUSEDGATE_CPU_ISA": "portable"},
}


@dataclass(frozen=True)
class Mutant:
    table: str
    file: str
    find: str
    replace: str
    rule: str
    gpu: bool


def load_mutants(tables: Path = TABLES) -> list[Mutant]:
    """Every row of every table, with its fields checked."""
    mutants = []
    for path in sorted(tables.glob("*.toml")):
        rows = tomllib.loads(path.read_text()).get("mutant", [])
        for i, row in enumerate(rows):
            missing = {"file", "find", "replace", "rule", "gpu"} - row.keys()
            if missing:
                raise ValueError(f"{path.name} row {i + 1}: missing fields {sorted(missing)}")
            if not isinstance(row["gpu"], bool):
                raise ValueError(f"{path.name} row {i + 1}: gpu must be true or false, got {row['gpu']!r}")
            mutants.append(Mutant(path.name, row["file"], row["find"], row["replace"], str(row["rule"]), row["gpu"]))
    return mutants


def stale_rows(mutants: list[Mutant], root: Path = ROOT) -> list[str]:
    """A message for each row whose ``find`` text does not occur exactly once, or whose file has no tests."""
    problems = []
    for m in mutants:
        tests = GPU_TESTS if m.gpu else CPU_TESTS
        if m.file not in tests:
            problems.append(f"{m.table}: {m.file} has no {'GPU' if m.gpu else 'CPU'} test subset")
            continue
        source = root / m.file
        count = source.read_text().count(m.find) if source.exists() else 0
        if count != 1:
            problems.append(f"{m.table}: {m.file} holds {m.find!r} {count} times, expected exactly once")
        if m.find == m.replace:
            problems.append(f"{m.table}: {m.find!r} replaced by itself")
    return problems


def _tracked_copy(destination: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _environment(tree: Path, cache: Path, gpu: bool) -> dict:
    # The scratch tree first; whatever else the caller's path held (a GPU host's extra packages) after it.
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "FUSEDGATE_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    if not gpu:
        env["FUSEDGATE_CUDA_ARCHS"] = "none"
    return env


def _build(tree: Path, env: dict) -> str | None:
    """Build the library of ``tree``; the compiler's last lines on failure."""
    run = subprocess.run(
        [sys.executable, "-c", "from op.build import build_library; build_library()"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return None if run.returncode == 0 else "\n".join((run.stdout + run.stderr).splitlines()[-15:])


def _pytest(tree: Path, env: dict, arguments: list[str], gpu: bool) -> tuple[int, str]:
    """Run pytest with ``-x``; the exit code and the first failing test's id (pytest's output when none failed)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "-rf",
            "-m",
            "gpu" if gpu else "not gpu",
            *arguments,
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    failed = re.search(r"^FAILED (\S+)", run.stdout, flags=re.M)
    return run.returncode, failed.group(1) if failed else (run.stdout + run.stderr)[-2000:]


def _try_mutant(m: Mutant, tree: Path, cache: Path, gpu: bool) -> tuple[Mutant, str, bool]:
    """Apply one mutant to its own copy of the tree; its killer, and whether it survived. Builds share one
    cache, keyed by the sources' hash: a Python mutant finds the unmutated library there."""
    _tracked_copy(tree)
    env = _environment(tree, cache, gpu)
    target = tree / m.file
    target.write_text(target.read_text().replace(m.find, m.replace))
    if target.suffix in C_SUFFIXES and _build(tree, env):
        return m, "does not build", True
    tests = GPU_TESTS if gpu else CPU_TESTS
    code, detail = _pytest(tree, {**env, **TEST_ENV.get(m.file, {})}, tests[m.file], gpu)
    killer = detail if code == 1 else "SURVIVED" if code == 0 else f"pytest exit {code}"
    return m, killer, code != 1


def run(gpu: bool, jobs: int = 1, files: list[str] | None = None) -> int:
    start = time.monotonic()
    mutants = [m for m in load_mutants() if m.gpu == gpu and (not files or m.file in files)]
    problems = stale_rows(load_mutants())
    if problems:
        print("the mutation tables no longer match the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if not mutants:
        print(f"no {'gpu' if gpu else 'cpu'} rows name {', '.join(files or [])}", file=sys.stderr)
        return 1
    tests = GPU_TESTS if gpu else CPU_TESTS
    rows, survivors = [], 0
    with tempfile.TemporaryDirectory(prefix="fusedgate-mutants-") as scratch:
        tree, cache = Path(scratch) / "tree", Path(scratch) / "cache"
        _tracked_copy(tree)
        env = _environment(tree, cache, gpu)
        error = _build(tree, env)
        if error:
            print(f"the unmutated tree does not build:\n{error}", file=sys.stderr)
            return 1
        # Each subset must pass on the unmutated tree, or a failure would prove nothing about a mutant.
        for file in sorted({m.file for m in mutants}):
            code, detail = _pytest(tree, {**env, **TEST_ENV.get(file, {})}, tests[file], gpu)
            if code != 0:
                print(f"pytest {' '.join(tests[file])} fails on the unmutated tree: {detail}", file=sys.stderr)
                return 1
        # Each mutant gets its own tree, so several can build and run at once (a GPU host's cores compile one
        # translation unit each).
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [
                pool.submit(_try_mutant, m, Path(scratch) / f"mutant{i}", cache, gpu) for i, m in enumerate(mutants)
            ]
            for future in futures:
                m, killer, survived = future.result()
                survivors += survived
                rows.append((m, killer))
                print(f"[{len(rows)}/{len(mutants)}] {m.file}: {killer}", file=sys.stderr, flush=True)
    print(format_table(rows))
    print(f"\n{len(rows) - survivors} of {len(rows)} mutants killed in {time.monotonic() - start:.0f} s")
    return 1 if survivors else 0


def _cell(text: str) -> str:
    return "`" + " ".join(text.split()).replace("|", "\\|") + "`"


def format_table(rows: list[tuple[Mutant, str]]) -> str:
    lines = ["| file | rule | mutation | killed by |", "|---|---|---|---|"]
    for m, killer in rows:
        lines.append(f"| {m.file} | {m.rule} | {_cell(m.find)} -> {_cell(m.replace)} | {killer} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="run the gpu rows against the GPU rule tests")
    parser.add_argument("--jobs", type=int, default=1, help="mutants built and tested at once (default 1)")
    parser.add_argument(
        "--files", nargs="+", metavar="FILE", help="only the rows of these source files (those a change touched)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return run(args.gpu, args.jobs, args.files)


if __name__ == "__main__":
    sys.exit(main())
