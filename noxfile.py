"""Every fusedgate workflow as a nox session. ``nox`` alone runs the CPU set that CI runs; ``nox -l`` lists all.

CPU sessions build their own virtualenv with pip (torch is pinned to the CPU build the project's machines
carry). GPU sessions run in the host's own interpreter (``venv_backend="none"``), because a GPU host brings its
own CUDA build of torch and may have no package index.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["lint", "build", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _install_project(session: nox.Session, extras: str = "torch,paddle,serve") -> None:
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


# Harness sessions run in the host's interpreter where a GPU driver is present (its torch has CUDA), and in
# their own virtualenv elsewhere.
HARNESS_BACKEND = "none" if shutil.which("nvidia-smi") else "virtualenv"

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


def _harness(session: nox.Session, *args: str, posargs: bool = True) -> None:
    extra = session.posargs if posargs else []
    if HARNESS_BACKEND == "none":
        session.run("python3", "-m", "op.build", env=GPU_ENV)
        session.run("python3", "-m", "harness.cli", *args, *extra, env=GPU_ENV)
    else:
        _install_project(session)
        session.run("fusedgate", *args, *extra)


@nox.session(venv_backend=HARNESS_BACKEND)
def report(session: nox.Session) -> None:
    """The main job: alignment, crossover sweep and plots into reports/<date>-<card>/ (CPU paths without a GPU)."""
    _harness(session, "report")


@nox.session(venv_backend=HARNESS_BACKEND)
def align(session: nox.Session) -> None:
    """Alignment matrix of every available path against the reference; non-zero exit on any failure."""
    _harness(session, "align")


@nox.session(venv_backend=HARNESS_BACKEND)
def crossover(session: nox.Session) -> None:
    """Crossover sweep of the default path pairs (fused and fused_block against two_kernel on a GPU)."""
    _harness(session, "crossover")


@nox.session(venv_backend="none")
def profile(session: nox.Session) -> None:
    """Nsight Compute over one bench configuration's NVTX range (default deepseek_v3, T=8192, fused)."""
    session.run("python3", "-m", "op.build", env=GPU_ENV)
    session.run("python3", "-m", "harness.cli", "profile", *session.posargs, env=GPU_ENV)


@nox.session(venv_backend=HARNESS_BACKEND)
def serve(session: nox.Session) -> None:
    """The routing service in the foreground (default: deepseek_v3 on the GPU backend where a GPU is present)."""
    backend = "gpu" if HARNESS_BACKEND == "none" else "cpu"
    args = session.posargs or ["--preset", "deepseek_v3", "--backend", backend]
    _harness(session, "serve", *args, posargs=False)


@nox.session(venv_backend=HARNESS_BACKEND)
def loadtest(session: nox.Session) -> None:
    """Checked concurrent clients against a server it starts, for each backend here (CPU, and GPU where present),
    with mixed JSON and binary tensors, then binary only."""
    backends = ["cpu", "gpu"] if HARNESS_BACKEND == "none" else ["cpu"]
    if session.posargs:
        _harness(session, "loadtest")
        return
    for encoding in ("mixed", "binary"):
        for backend in backends:
            _harness(session, "loadtest", "--backend", backend, "--encoding", encoding, posargs=False)


@nox.session(venv_backend=HARNESS_BACKEND)
def capacity(session: nox.Session) -> None:
    """The service against the bare FastAPI endpoint, server and load generator pinned to different cores (wrk
    where installed, else the Python client); the table goes under reports/. GPU backend on a CUDA host.
    Options after ``--``: ``--seconds``, ``--client``, ``--server-cores``, ``--client-cores``, ``--concurrency``."""
    backend = "gpu" if HARNESS_BACKEND == "none" else "cpu"
    command = ["-m", "graphs.serve.capacity", "--backend", backend, *session.posargs]
    if HARNESS_BACKEND == "none":
        session.run("python3", "-m", "op.build", env=GPU_ENV)
        session.run("python3", *command, env=GPU_ENV)
    else:
        _install_project(session)
        session.run("python", *command)
