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
    "op/csrc/cpu_kernel.cc": [
        "tests/test_reference_rules.py",
        "tests/test_cpu_kernel_internals.py",
        "-k",
        "cpu_kernel-numpy or test_cpu_kernel_internals",
    ],
}
GPU_TESTS = {
    "op/csrc/routing.cuh": ["tests/test_reference_rules.py", "-k", "fused or two_kernel"],
    "op/csrc/launch.cuh": ["tests/test_gpu_kernels.py", "-k", "side_stream"],
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
    env = {**os.environ, "PYTHONPATH": str(tree), "FUSEDGATE_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
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


def run(gpu: bool) -> int:
    start = time.monotonic()
    mutants = [m for m in load_mutants() if m.gpu == gpu]
    problems = stale_rows(load_mutants())
    if problems:
        print("the mutation tables no longer match the code:\n  " + "\n  ".join(problems), file=sys.stderr)
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
        for arguments in {tuple(tests[m.file]) for m in mutants}:
            code, detail = _pytest(tree, env, list(arguments), gpu)
            if code != 0:
                print(f"pytest {' '.join(arguments)} fails on the unmutated tree: {detail}", file=sys.stderr)
                return 1
        for m in mutants:
            target = tree / m.file
            original = target.read_text()
            target.write_text(original.replace(m.find, m.replace))
            try:
                built = _build(tree, env) if target.suffix in C_SUFFIXES else None
                if built:
                    killer = "does not build"
                    survivors += 1
                else:
                    code, detail = _pytest(tree, env, tests[m.file], gpu)
                    killer = detail if code == 1 else "SURVIVED" if code == 0 else f"pytest exit {code}"
                    survivors += code != 1
            finally:
                target.write_text(original)
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
    return run(parser.parse_args(argv).gpu)


if __name__ == "__main__":
    sys.exit(main())
