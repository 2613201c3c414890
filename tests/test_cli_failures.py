"""Commands a new user runs where they cannot work (no CUDA GPU, a port in use, a bad argument): one line on
stderr, a non-zero exit, no traceback. Each runs as a subprocess, as a user would run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import cuda_reason

ROOT = Path(__file__).resolve().parent.parent
needs_no_gpu = pytest.mark.skipif(cuda_reason() is None, reason="checks the refusal on a machine without a CUDA GPU")


def fusedgate(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_one_line_refusal(done: subprocess.CompletedProcess, needle: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and needle in lines[0], done.stderr


@needs_no_gpu
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["bench"], "fusedgate bench: needs a CUDA GPU"),
        (["bench", "--configs", "deepseek_v3", "--tokens", "1"], "on a CUDA host run `nox -s bench`"),
        (["serve", "--preset", "deepseek_v3", "--backend", "gpu"], "fusedgate serve: needs a CUDA GPU"),
    ],
)
def test_gpu_commands_refuse_without_a_gpu(argv, needle):
    done = fusedgate(*argv)
    assert_one_line_refusal(done, needle)
    assert done.stdout == ""


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["align", "--path", "bogus"], "argument --path: invalid choice: 'bogus'"),
        (["bench", "--tokens", "0"], "0 is out of range: allowed >= 1"),
        (["crossover", "--pair", "fused:nothing"], "expected CANDIDATE:BASELINE"),
    ],
)
def test_bad_arguments_get_one_line(argv, needle):
    done = fusedgate(*argv)
    assert_one_line_refusal(done, needle)
    assert done.returncode == 2


def test_bench_help_shows_its_real_options():
    done = fusedgate("bench", "--help")
    assert done.returncode == 0
    for option in ("--configs", "--tokens", "--paths", "--l2", "--launch", "--csv"):
        assert option in done.stdout
    assert "rest" not in done.stdout


def test_serve_on_a_port_in_use_says_so_before_announcing_itself():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = fusedgate("serve", "--preset", "deepseek_v3", "--port", str(port))
    assert_one_line_refusal(done, f"cannot listen on 127.0.0.1:{port}")
    assert "serving" not in done.stdout


def test_nox_gpu_session_without_a_cuda_host_says_what_it_needs(tmp_path):
    pytest.importorskip("nox")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists())
    done = subprocess.run(
        [sys.executable, "-m", "nox", "-s", "gpu"],
        cwd=ROOT,
        env=os.environ | {"PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output and "ModuleNotFoundError" not in output
    assert "the gpu session needs a CUDA host" in output


def test_nox_gpu_session_on_a_host_without_the_dependencies_says_how_to_install_them(tmp_path):
    pytest.importorskip("nox")
    # A CUDA host as the session sees it (nvidia-smi on PATH) whose python3 has none of the project's packages.
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    for tool in ("nvidia-smi", "python3"):
        (tmp_path / tool).chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-m", "nox", "-s", "gpu"],
        cwd=ROOT,
        env=os.environ | {"PATH": os.pathsep.join([str(tmp_path), os.environ["PATH"]])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output and "ModuleNotFoundError" not in output
    assert "lacks torch, numpy, ml_dtypes" in output and "python3 -m pip install -e ." in output


def test_align_ends_with_a_one_line_summary():
    done = fusedgate("align", "--preset", "x_e72", "--tokens", "5", "--distribution", "ties")
    assert done.returncode == 0
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("alignment: ") and "cases over" in last and "every case passed" in last


@needs_no_gpu
def test_crossover_on_the_cpu_uses_the_report_range_and_shows_progress(monkeypatch, capsys):
    import harness.sweep
    from harness.cli import main
    from harness.sweep import SweepResult, default_tokens

    seen = []

    def fake_sweep(preset, dtype, tokens, pairs, on_gpu, repeats, progress):
        seen.append(list(tokens))
        for t in tokens:
            progress(f"time {preset} T={t}")
        return SweepResult({}, {})

    monkeypatch.setattr(harness.sweep, "run_sweep", fake_sweep)
    assert main(["crossover", "--preset", "glm45_air"]) == 0
    assert seen == [default_tokens(False)] and max(seen[0]) == 4096
    err = capsys.readouterr().err
    # Not a terminal: whole lines, never carriage returns.
    assert "\r" not in err and err.splitlines()[0].startswith("[1/")


def test_progress_writes_whole_lines_at_a_modest_rate_when_not_a_terminal():
    import io

    from harness.progress import Progress

    stream = io.StringIO()
    progress = Progress(1000, stream=stream, interval=3600)
    for i in range(1000):
        progress(f"step {i}")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines == ["[1/1000] step 0", "[1000/1000] step 999"]


def test_progress_rewrites_one_line_on_a_terminal():
    import io

    from harness.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(3, stream=stream)
    for i in range(3):
        progress(f"step {i}")
    progress.close()
    assert stream.getvalue().count("\r") == 3 and stream.getvalue().count("\n") == 1
