"""The front-end's call for torch tensors, a small extension built against the torch in use.

For torch tensors an eager call of the front-end would otherwise take one framework operation per output
(``new_empty``, ``empty_like``) and one tvm-ffi crossing: on a GPU host three allocations alone cost about one
``torch.sigmoid``. The extension (``op/csrc/torch/torch_call.cc``) does it in one Python call: each output made
as ``at::empty`` makes it (from the allocator torch registers for the device, without the operator dispatch),
one call of the library's entry point through its exported C symbol on torch's current stream, and the outputs
back as torch's own tensors. The kernel library itself stays free of any framework.

It is built on first use (cached under ``$FUSEDGATE_CACHE`` like the library, keyed by its source, the torch and
Python it is built for and the compiler flags) with the C++ compiler torch's headers need. Where it cannot be
built (no compiler or no Python headers), or with ``FUSEDGATE_TORCH_CALL=0``, the front-end calls through
tvm-ffi with outputs allocated in Python, as for every other framework; ``unavailable_reason()`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from op.build import CSRC, build_library, cache_root

SOURCE = CSRC / "torch" / "torch_call.cc"
MODULE = "fusedgate_torch_call"
CXX_FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", "-w")

# One argument of a plan's entry point, in its order: ("input", n), ("output", n), ("int"|"bool"|"float", value)
# or ("none", None).
Argument = tuple[str, Any]

_unavailable: list[str] = []


def enabled() -> bool:
    return os.environ.get("FUSEDGATE_TORCH_CALL", "1").strip() != "0"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _build_folder(torch: Any, tvm_ffi: Any) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), sysconfig.get_config_var("EXT_SUFFIX"),
                 tvm_ffi.__version__, " ".join(CXX_FLAGS)):  # fmt: skip
        digest.update(part.encode())
    return cache_root() / f"torch-call-{digest.hexdigest()[:16]}"


def build_extension() -> Path:
    """Build (or find in the cache) the extension for this torch and Python, and return its path."""
    import torch
    import tvm_ffi
    import tvm_ffi.libinfo
    from torch.utils import cpp_extension
    from tvm_ffi.utils import FileLock

    folder = _build_folder(torch, tvm_ffi)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
    with FileLock(str(folder / ".lock")):
        if target.exists():
            return target
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set $CXX)")
        ffi_library_path = str(Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent)
        torch_library_paths = cpp_extension.library_paths()
        command = [
            compiler, *CXX_FLAGS,
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{sysconfig.get_paths()['include']}",
            *(f"-I{path}" for path in cpp_extension.include_paths()),
            f"-I{tvm_ffi.libinfo.find_include_path()}", f"-I{tvm_ffi.libinfo.find_dlpack_include_path()}",
            str(SOURCE), "-o", str(folder / "partial.so"),
            *(f"-L{linked}" for linked in torch_library_paths), "-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10",
            f"-L{ffi_library_path}", "-ltvm_ffi",
            *(f"-Wl,-rpath,{linked}" for linked in [*torch_library_paths, ffi_library_path]),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        # Renamed into place once whole, so a reader of the cache never loads a half-written file.
        os.replace(folder / "partial.so", target)
        return target


@functools.cache
def _module() -> Any | None:
    """The loaded extension, or None (its reason kept for ``unavailable_reason``)."""
    try:
        path = build_extension()
        loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
        spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except (OSError, RuntimeError, ImportError) as error:
        _unavailable.append(str(error))
        warnings.warn(
            f"fusedgate: torch calls go through tvm-ffi with outputs allocated in Python: {error}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def unavailable_reason() -> str | None:
    """Why torch calls do not take the extension, or None when they do."""
    if not enabled():
        return "FUSEDGATE_TORCH_CALL=0"
    return None if _module() is not None else _unavailable[-1]


@functools.cache
def _entry_address(name: str) -> int:
    """The library's exported C function of entry point ``name`` (tvm-ffi exports each as ``__tvm_ffi_<name>``)."""
    library = _library_handle()
    return ctypes.cast(getattr(library, f"__tvm_ffi_{name}"), ctypes.c_void_p).value


@functools.cache
def _library_handle() -> ctypes.CDLL:
    # The library is already loaded by tvm-ffi; this finds the same copy and keeps it loaded.
    from op.build import library

    library()
    return ctypes.CDLL(str(build_library()))


def plan(
    entry: str,
    device: Any,
    inputs: Sequence[tuple[str, bool]],
    outputs: Sequence[tuple[tuple[int, ...], str]],
    arguments: Sequence[Argument],
    returns: Sequence[Argument],
    release_gil: bool = False,
) -> Callable[..., tuple] | None:
    """A call of library entry point ``entry`` for torch tensors on ``device``, or None where the extension is
    off or unavailable. The call takes the ``inputs`` (name, may be None) in order and returns ``returns``;
    ``outputs`` are allocated fresh on each call; ``arguments`` is the entry point's argument list."""
    if not enabled():
        return None
    module = _module()
    if module is None:
        return None
    import torch

    made = module.make(
        _entry_address(entry),
        device.type,
        device.index or 0,
        torch.Tensor.__dlpack_c_exchange_api__,
        tuple(name for name, _ in inputs),
        tuple(optional for _, optional in inputs),
        tuple((tuple(int(d) for d in shape), dtype) for shape, dtype in outputs),
        tuple(arguments),
        tuple(returns),
        release_gil,
    )
    return functools.partial(module.call, made)


def main() -> int:
    reason = unavailable_reason()
    print(f"torch call extension: {'built, ' + str(build_extension()) if reason is None else 'unavailable: ' + reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
