"""Every fusedgate workflow as a nox session. ``nox`` alone runs the CPU set that CI runs; ``nox -l`` lists all.

CPU sessions share one virtualenv, ``.nox/cpu`` (``cpu_venv``; torch is pinned to the CPU build the project's
machines carry). GPU sessions run in the host's own interpreter, because a GPU host brings its own CUDA build
of torch and may have no package index; ``cuda_host`` stops them with one line where that is not so.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nox

# Every session runs without a virtualenv of its own: CPU sessions use the shared one, GPU sessions the host's.
nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "build", "tests", "mutants"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
CPU_VENV = Path(".nox") / "cpu"
CPU_EXTRAS = "torch,paddle,serve"


def cpu_venv(session: nox.Session) -> Callable[..., None]:
    """The one virtualenv every CPU session runs in (nox would give each session its own, ~1.9 GB apiece):
    created on first use, the project (editable, every extra) and the dev tools installed into it again only
    when pyproject.toml changes. Returns ``run(program, *args)``, which runs a program of that virtualenv."""
    bin_dir = CPU_VENV / "bin"
    if not (bin_dir / "python").exists():
        session.run(sys.executable, "-m", "virtualenv", "-q", str(CPU_VENV), external=True)
    stamp = CPU_VENV / "fusedgate-pyproject.sha256"
    wanted = hashlib.sha256(Path("pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        dev = nox.project.dependency_groups(PYPROJECT, "dev")
        session.run(
            str(bin_dir / "python"), "-m", "pip", "install", "-q", "-e", f".[{CPU_EXTRAS}]", *dev, external=True
        )
        stamp.write_text(wanted)
    env = {
        "VIRTUAL_ENV": str(CPU_VENV.resolve()),
        "PATH": os.pathsep.join([str(bin_dir.resolve()), os.environ["PATH"]]),
    }

    def run(program: str, *args: str, **kwargs) -> None:
        session.run(str(bin_dir / program), *args, env=env | kwargs.pop("env", {}), external=True, **kwargs)

    return run


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    run = cpu_venv(session)
    run("ruff", "check", ".")
    run("ruff", "format", "--check", ".")


@nox.session
def build(session: nox.Session) -> None:
    """Compile the kernel library (CUDA for sm_80 and sm_90a where nvcc exists) and print per-kernel resources."""
    cpu_venv(session)("python", "-m", "op.build", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (reference, checker, composites, C++ CPU kernel, Paddle and torch CPU paths)."""
    cpu_venv(session)("python", "-m", "pytest", "-n", "auto", *session.posargs)


# Harness sessions run in the host's interpreter where a GPU driver is present (its torch has CUDA), and in
# the shared CPU virtualenv elsewhere.
ON_CUDA_HOST = shutil.which("nvidia-smi") is not None

GPU_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")]))}

# Run by the host's python3: prints the distributions of the given names it lacks.
_MISSING = """
import importlib.metadata as m, sys
for name in sys.argv[1:]:
    try:
        m.version(name)
    except m.PackageNotFoundError:
        print(name)
"""


def cuda_host(session: nox.Session, with_tests: bool = False) -> None:
    """Stop a GPU session with one line where there is no CUDA driver, or where the host's python3 lacks the
    project's dependencies, and the test tools ``with_tests`` (saying how to install them: the host keeps its own
    CUDA build of torch)."""
    if shutil.which("nvidia-smi") is None:
        session.error(
            f"the {session.name} session needs a CUDA host (no nvidia-smi on PATH); `nox -l` lists the CPU sessions"
        )
    # The GPU suites run under pytest and xdist; the test group's other tools serve CPU tests only.
    test_tools = [r for r in nox.project.dependency_groups(PYPROJECT, "test") if r.startswith("pytest")]
    needed = [*PYPROJECT["project"]["dependencies"], *(test_tools if with_tests else [])]
    names = [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in needed]
    done = subprocess.run(["python3", "-c", _MISSING, "torch", *names], capture_output=True, text=True, check=False)
    missing = done.stdout.split() if done.returncode == 0 else ["a working python3"]
    if missing:
        install = " ".join(["python3 -m pip install -e .", *(f"'{r}'" for r in needed if r in test_tools)])
        session.error(
            f"python3 on this CUDA host lacks {', '.join(missing)}: install a CUDA build of torch if it is missing, "
            f"then the project's dependencies with `{install}`"
        )


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU tests (marked ``gpu``) in the host's own interpreter, from the checkout, on a CUDA host."""
    cuda_host(session, with_tests=True)
    session.run("python3", "-m", "op.build", env=GPU_ENV)
    # The rule tests carry GPU cases too: every rule over fused, two_kernel, fused_block and composite_torch.
    # So do the torch extension's tests: every entry point through it against the tvm-ffi path.
    files = sorted(str(p) for p in Path("tests").glob("test_gpu_*.py")) + [
        "tests/test_reference_rules.py",
        "tests/test_torch_call.py",
    ]
    session.run("python3", "-m", "pytest", "-m", "gpu", "-n", "8", *files, *session.posargs, env=GPU_ENV)


@nox.session
def sanitize(session: nox.Session) -> None:
    """compute-sanitizer memcheck, racecheck and synccheck over a smoke run of every GPU path, preset and dtype."""
    cuda_host(session)
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


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation check: every break in tests/mutants/*.toml must fail its file's tests (``-- --gpu``: the CUDA rows
    on a CUDA host, in its own interpreter; ``-- --jobs N``: N mutants at once)."""
    if "--gpu" in session.posargs:
        cuda_host(session, with_tests=True)
        session.run("python3", "-m", "harness.mutants", *session.posargs, env=GPU_ENV)
        return
    cpu_venv(session)("python", "-m", "harness.mutants", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Every GPU path side by side (graph replays, hot and cold L2) with ratios and the bandwidth floor."""
    cuda_host(session)
    session.run("python3", "-m", "op.build", env=GPU_ENV)
    args = session.posargs or ["--csv", "reports/bench/results.csv"]
    session.run("python3", "-m", "harness.bench", *args, env=GPU_ENV)


def _harness(session: nox.Session, *args: str, posargs: bool = True, module: str = "harness.cli") -> None:
    """Run a harness module: in the host's interpreter on a CUDA host, in the shared virtualenv elsewhere."""
    extra = session.posargs if posargs else []
    if ON_CUDA_HOST:
        cuda_host(session)
        session.run("python3", "-m", "op.build", env=GPU_ENV)
        session.run("python3", "-m", module, *args, *extra, env=GPU_ENV)
    else:
        cpu_venv(session)("python", "-m", module, *args, *extra)


@nox.session
def hostcost(session: nox.Session) -> None:
    """Host cost per call of the front-end and the graph runner beside torch.sigmoid, on GPU (where present) and
    CPU tensors, targets marked met or missed: ``nox -s hostcost -- --out reports/<folder>``."""
    _harness(session, *(session.posargs or ["--out", "reports/hostcost"]), posargs=False, module="harness.hostcost")


@nox.session
def cpubench(session: nox.Session) -> None:
    """cpu_kernel against the reference for every preset at T = 1 .. 65536 on 1 and all threads (markdown + CSV)."""
    args = session.posargs or ["--out", "reports/cpu-throughput"]
    _harness(session, *args, posargs=False, module="harness.cpu_throughput")


@nox.session
def report(session: nox.Session) -> None:
    """The main job: alignment, crossover sweep and plots into reports/<date>-<card>/ (CPU paths without a GPU)."""
    _harness(session, "report")


@nox.session
def align(session: nox.Session) -> None:
    """Alignment matrix of every available path against the reference; non-zero exit on any failure."""
    _harness(session, "align")


@nox.session
def crossover(session: nox.Session) -> None:
    """Crossover sweep of the default path pairs (fused and fused_block against two_kernel on a GPU)."""
    _harness(session, "crossover")


@nox.session
def profile(session: nox.Session) -> None:
    """Nsight Compute over one bench configuration's NVTX range (default deepseek_v3, T=8192, fused)."""
    cuda_host(session)
    session.run("python3", "-m", "op.build", env=GPU_ENV)
    session.run("python3", "-m", "harness.cli", "profile", *session.posargs, env=GPU_ENV)


@nox.session
def serve(session: nox.Session) -> None:
    """The routing service in the foreground (default: deepseek_v3 on the GPU backend where a GPU is present)."""
    backend = "gpu" if ON_CUDA_HOST else "cpu"
    args = session.posargs or ["--preset", "deepseek_v3", "--backend", backend]
    _harness(session, "serve", *args, posargs=False)


@nox.session
def loadtest(session: nox.Session) -> None:
    """Checked concurrent clients against a server it starts, for each backend here (CPU, and GPU where present),
    with mixed JSON and binary tensors, then binary only."""
    backends = ["cpu", "gpu"] if ON_CUDA_HOST else ["cpu"]
    if session.posargs:
        _harness(session, "loadtest")
        return
    for encoding in ("mixed", "binary"):
        for backend in backends:
            _harness(session, "loadtest", "--backend", backend, "--encoding", encoding, posargs=False)


@nox.session
def capacity(session: nox.Session) -> None:
    """The service against the bare FastAPI endpoint, server and load generator pinned to different cores (wrk
    where installed, else the Python client); the table goes under reports/. GPU backend on a CUDA host.
    Options after ``--``: ``--seconds``, ``--client``, ``--server-cores``, ``--client-cores``, ``--concurrency``."""
    backend = "gpu" if ON_CUDA_HOST else "cpu"
    _harness(session, "--backend", backend, module="graphs.serve.capacity")
