"""Every fusedgate workflow as a nox session. ``nox`` alone runs the CPU set that CI runs; ``nox -l`` lists all.

CPU sessions build their own virtualenv with pip (torch is pinned to the CPU build the project's machines
carry). GPU sessions run in the host's own interpreter (``venv_backend="none"``), because a GPU host brings its
own CUDA build of torch and may have no package index.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["lint", "build", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _install_project(session: nox.Session, extras: str = "torch,paddle") -> None:
    session.install("-e", f".[{extras}]", *nox.project.dependency_groups(PYPROJECT, "test"))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install(next(d for d in nox.project.dependency_groups(PYPROJECT, "dev") if d.startswith("ruff")))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def build(session: nox.Session) -> None:
    """Compile the kernel library (CUDA for sm_80 and sm_90a where nvcc exists) and print per-kernel resources."""
    _install_project(session, "torch")
    session.run("python", "-m", "op.build", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (reference, checker, composites, C++ CPU kernel, Paddle and torch CPU paths)."""
    _install_project(session)
    session.run("python", "-m", "pytest", "-n", "auto", *session.posargs)


GPU_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")]))}


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU tests (marked ``gpu``) in the host's own interpreter, from the checkout, on a CUDA host."""
    session.run("python3", "-m", "op.build", env=GPU_ENV)
    files = sorted(str(p) for p in Path("tests").glob("test_gpu_*.py"))
    session.run("python3", "-m", "pytest", "-m", "gpu", "-n", "8", *files, *session.posargs, env=GPU_ENV)


@nox.session(venv_backend="none")
def sanitize(session: nox.Session) -> None:
    """compute-sanitizer memcheck, racecheck and synccheck over a smoke run of every GPU path, preset and dtype."""
    session.run("python3", "-m", "op.build", env=GPU_ENV)
    for tool in ("memcheck", "racecheck", "synccheck"):
        session.run(
            "compute-sanitizer",
            "--tool",
            tool,
            "--error-exitcode",
            "1",
            "--target-processes",
            "all",
            "python3",
            "-m",
            "harness.smoke",
            env=GPU_ENV,
            external=True,
        )


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Every GPU path side by side (graph replays, hot and cold L2) with ratios and the bandwidth floor."""
    session.run("python3", "-m", "op.build", env=GPU_ENV)
    args = session.posargs or ["--csv", "reports/bench/results.csv"]
    session.run("python3", "-m", "harness.bench", *args, env=GPU_ENV)
