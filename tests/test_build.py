"""op/build.py's choice of CUDA architectures and compiler, on the CPU (nvidia-smi and nvcc faked)."""

from __future__ import annotations

import subprocess

import pytest

from op import build


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.delenv("FUSEDGATE_CUDA_ARCHS", raising=False)
    monkeypatch.setattr(build, "_visible_gpu_arch", lambda: None)


def test_default_archs_without_a_gpu(no_gpu):
    assert build.cuda_archs() == ["80", "90a"]


def test_visible_gpu_wins_over_the_default(no_gpu, monkeypatch):
    monkeypatch.setattr(build, "_visible_gpu_arch", lambda: "90a")
    assert build.cuda_archs() == ["90a"]


def test_environment_wins_over_the_visible_gpu(no_gpu, monkeypatch):
    monkeypatch.setattr(build, "_visible_gpu_arch", lambda: "90a")
    monkeypatch.setenv("FUSEDGATE_CUDA_ARCHS", " 80, 86;90a  100a ")
    assert build.cuda_archs() == ["80", "86", "90a", "100a"]


@pytest.mark.parametrize("raw", ["sm_90", "9.0", "90b", "8"])
def test_malformed_arch_names_the_variable_and_the_forms(no_gpu, monkeypatch, raw):
    monkeypatch.setenv("FUSEDGATE_CUDA_ARCHS", f"80;{raw}")
    with pytest.raises(ValueError, match=rf"FUSEDGATE_CUDA_ARCHS entry '{raw}' is invalid: allowed forms like 80"):
        build.cuda_archs()


@pytest.mark.parametrize(
    "archs,expected",
    [(["80"], "8.0"), (["90a"], "9.0a"), (["80", "90a"], "8.0 9.0a"), (["100a", "120"], "10.0a 12.0")],
)
def test_arch_list_for_tvm_ffi(archs, expected):
    assert build._arch_list(archs) == expected


@pytest.mark.parametrize("value", ["none", "NONE", " None "])
def test_none_builds_the_cpu_kernel_alone_even_where_nvcc_exists(monkeypatch, value):
    monkeypatch.setattr(build.shutil, "which", lambda name: "/opt/cuda/bin/nvcc")
    monkeypatch.setenv("FUSEDGATE_CUDA_ARCHS", value)
    assert build._nvcc() is None and not build.has_cuda_kernels()
    assert build._toolkit_version(None) == "cpu"
    monkeypatch.setenv("FUSEDGATE_CUDA_ARCHS", "90a")
    assert build._nvcc() == "/opt/cuda/bin/nvcc"


@pytest.mark.parametrize(
    "stdout,expected", [("9.0\n", "90a"), ("8.0\n8.0\n", "80"), ("8.6\n", "86"), ("10.0\n", "100"), ("", None)]
)
def test_visible_gpu_arch_from_nvidia_smi(monkeypatch, stdout, expected):
    def fake_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(build.subprocess, "run", fake_run)
    assert build._visible_gpu_arch() == expected


def test_no_nvidia_smi_means_no_visible_gpu(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(build.subprocess, "run", missing)
    assert build._visible_gpu_arch() is None
