"""Build and load the kernel library: one shared object from ``op/csrc`` exporting CUDA and CPU entry points.

The build is cached under ``$FUSEDGATE_CACHE`` (default ``~/.cache/fusedgate``) in a folder keyed by the
sources' hash, the target architectures and the toolkit version, behind a file lock so parallel test workers
build once. Architectures: ``$FUSEDGATE_CUDA_ARCHS`` where set, else the visible GPU's, else ``80;90a``. Without
``nvcc``, or with ``FUSEDGATE_CUDA_ARCHS=none``, only the C++ CPU kernel is built. ``python -m op.build`` builds
ahead of time and prints each kernel's registers, spills and shared memory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
CPU_SOURCES = ("cpu_kernel.cc",)
CUDA_SOURCES = ("fused.cu", "two_kernel.cu", "fused_block.cu", "replay_rows.cu", "replay_host_rows.cu")
CUDA_FLAGS = ("-std=c++17", "--expt-relaxed-constexpr", "-lineinfo")
# -ffp-contract=off: no fused multiply-add changes a rounding. -fno-trapping-math: lets the compiler turn the CPU
# kernel's float selects into vector blends (it changes no result, only whether FP exceptions may be raised).
CXX_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math")


def _nvcc() -> str | None:
    # ``FUSEDGATE_CUDA_ARCHS=none`` builds the CPU kernel alone on a machine that has nvcc (a quick build for
    # work that touches no CUDA code).
    if os.environ.get("FUSEDGATE_CUDA_ARCHS", "").strip().lower() == "none":
        return None
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


def _cuda_home(nvcc: str) -> str:
    """The toolkit root; ``nvcc`` may be a wrapper script, so ask it rather than resolving the path."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    out = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True, check=False
    ).stderr
    match = re.search(r"TOP=(\S+)", out)
    return str(Path(match.group(1)).resolve()) if match else str(Path(nvcc).resolve().parent.parent)


def _toolkit_version(nvcc: str | None) -> str:
    if nvcc is None:
        return "cpu"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def _visible_gpu_arch() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    major, minor = out[0].split(".")
    # Hopper's arch-specific target keeps its own instructions available.
    return f"{major}{minor}a" if major == "9" else f"{major}{minor}"


def cuda_archs() -> list[str]:
    """Target architectures such as ``['80', '90a']``."""
    visible = _visible_gpu_arch()
    if visible and "FUSEDGATE_CUDA_ARCHS" not in os.environ:
        return [visible]
    raw = os.environ.get("FUSEDGATE_CUDA_ARCHS", "80;90a")
    archs = [a.strip() for a in re.split(r"[;, ]+", raw) if a.strip()]
    for arch in archs:
        if not re.fullmatch(r"\d{2,3}a?", arch):
            raise ValueError(f"FUSEDGATE_CUDA_ARCHS entry {arch!r} is invalid: allowed forms like 80, 90a, 100a")
    return archs


def _arch_list(archs: list[str]) -> str:
    return " ".join(f"{a[:-2] if a.endswith('a') else a[:-1]}.{a[-2:] if a.endswith('a') else a[-1]}" for a in archs)


def cache_root() -> Path:
    return Path(os.environ.get("FUSEDGATE_CACHE", Path.home() / ".cache" / "fusedgate"))


def _build_key(sources: list[Path], archs: list[str], toolkit: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in {".cu", ".cuh", ".cc", ".h"}:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(" ".join(s.name for s in sources).encode())
    digest.update(";".join(archs).encode())
    digest.update(toolkit.encode())
    digest.update(" ".join(CUDA_FLAGS + CXX_FLAGS).encode())
    return digest.hexdigest()[:16]


def build_library(verbose: bool = False) -> Path:
    """Build (or find in the cache) the shared library and return its path."""
    import tvm_ffi.cpp
    from tvm_ffi.utils import FileLock

    nvcc = _nvcc()
    archs = cuda_archs() if nvcc else []
    sources = [CSRC / s for s in CPU_SOURCES] + ([CSRC / s for s in CUDA_SOURCES] if nvcc else [])
    toolkit = _toolkit_version(nvcc)
    folder = cache_root() / f"{'cuda' + toolkit if nvcc else 'cpu'}-{'_'.join(archs) or 'host'}-"
    folder = Path(str(folder) + _build_key(sources, archs, toolkit))
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "library.path"
    with FileLock(str(folder / ".lock")):
        # The path is kept relative to the folder, so a cache copied to another place (a CI cache, a machine
        # given a prebuilt library) still finds its library.
        if done.exists() and (folder / done.read_text()).exists():
            return folder / done.read_text()
        saved = {k: os.environ.get(k) for k in ("TVM_FFI_CUDA_ARCH_LIST", "CUDA_HOME")}
        if archs:
            os.environ["TVM_FFI_CUDA_ARCH_LIST"] = _arch_list(archs)
            os.environ["CUDA_HOME"] = _cuda_home(nvcc)
        try:
            path = tvm_ffi.cpp.build(
                "fusedgate_ops",
                sources=[str(s) for s in sources],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=list(CUDA_FLAGS),
                extra_include_paths=[str(CSRC)],
                build_directory=str(folder),
            )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        done.write_text(str(Path(path).resolve().relative_to(folder.resolve())))
        if verbose:
            print(f"built {path}", file=sys.stderr)
        return Path(path)


@functools.cache
def library():
    """The loaded tvm-ffi module; built on first use."""
    import tvm_ffi

    return tvm_ffi.load_module(str(build_library()))


def has_cuda_kernels() -> bool:
    return _nvcc() is not None


def resource_report() -> str:
    """Registers, spills and stack per kernel and architecture, from ptxas (one extra device-only compile)."""
    import tvm_ffi.libinfo

    nvcc = _nvcc()
    if nvcc is None:
        return "nvcc not found: no per-kernel resource report"
    includes = [f"-I{tvm_ffi.libinfo.find_include_path()}", f"-I{tvm_ffi.libinfo.find_dlpack_include_path()}"]
    jobs = [(src, arch) for src in CUDA_SOURCES for arch in cuda_archs()]

    def ptxas(job: tuple[str, str]) -> str:
        src, arch = job
        with tempfile.TemporaryDirectory() as tmp:
            return subprocess.run(
                [
                    nvcc,
                    *CUDA_FLAGS,
                    *includes,
                    f"-I{CSRC}",
                    "--resource-usage",
                    "-cubin",
                    f"-gencode=arch=compute_{arch},code=sm_{arch}",
                    "-o",
                    f"{tmp}/k.cubin",
                    str(CSRC / src),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stderr

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        logs = list(pool.map(ptxas, jobs))
    rows = []
    for log in logs:
        for match in re.finditer(
            r"entry function '(\S+)' for '(sm_\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
            r"(\d+) bytes spill loads.*?Used (\d+) registers",
            log,
            flags=re.S,
        ):
            mangled, arch, stack, spill_st, spill_ld, regs = match.groups()
            name = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=False).stdout.strip()
            name = re.sub(r"\(.*", "", name).replace("fusedgate::", "")
            rows.append(f"| {arch} | {name} | {regs} | {spill_st} | {spill_ld} | {stack} |")
    header = [
        "| arch | kernel | registers | spill stores (B) | spill loads (B) | stack frame (B) |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(header + sorted(rows))


def main() -> int:
    path = build_library(verbose=True)
    print(f"library: {path}")
    print(f"CUDA kernels: {'yes, archs ' + ';'.join(cuda_archs()) if has_cuda_kernels() else 'no (nvcc not found)'}")
    if importlib.util.find_spec("torch") is not None:
        from op.torch_call import main as torch_call_main

        torch_call_main()
    if has_cuda_kernels():
        print(resource_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
