"""What the front-end needs from each tensor framework, resolved once per (framework, device).

An ``Adapter`` holds the framework's module and the tensor's device, so the per-call work is only what must
happen per call: allocating the outputs and calling the library. CUDA launches go on the framework's current
stream: torch's reaches the library through its DLPack exchange API; CuPy's and Paddle's are looked up per call,
set as the library's stream for the call, and given to the DLPack export so it inserts no wait on another
stream (a wait on the legacy stream is what breaks a CUDA-graph capture).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FRAMEWORKS = ("torch", "paddle", "numpy", "cupy")
# Every output piece starts on a 16-byte boundary: the kernels store 16 bytes wide where the row allows.
ALIGNMENT = 16

OutputSpec = tuple[tuple[int, ...], str]


def framework_of(tensor: Any, name: str = "gating_output") -> str:
    module = type(tensor).__module__.split(".")[0]
    if module in FRAMEWORKS:
        return module
    raise ValueError(
        f"{name} of type {type(tensor).__name__} is not supported: pass a torch, paddle, cupy or numpy tensor"
    )


def piece_offsets(specs: Sequence[OutputSpec]) -> tuple[list[int], int]:
    """Byte offsets of each output inside one buffer, each rounded up to ``ALIGNMENT``, and the buffer's size."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        total += -(-nbytes // ALIGNMENT) * ALIGNMENT
    return offsets, max(total, ALIGNMENT)


@dataclass(frozen=True)
class Adapter:
    framework: str
    cuda: bool
    device_id: int
    # specs -> a function returning fresh outputs of those shapes and dtypes on the tensor's device.
    allocator: Callable[[Sequence[OutputSpec]], Callable[[], tuple]]
    # library function -> the same function called on this framework's current stream.
    on_stream: Callable[[Callable[..., Any]], Callable[..., Any]]


def adapter_for(tensor: Any) -> Adapter:
    framework = framework_of(tensor)
    return _BUILDERS[framework](tensor)


def is_contiguous(tensor: Any, framework: str) -> bool:
    if framework in ("numpy", "cupy"):
        return tensor.flags.c_contiguous
    return tensor.is_contiguous()


def is_cuda(tensor: Any, framework: str) -> bool:
    if framework == "torch":
        return tensor.is_cuda
    if framework == "paddle":
        return tensor.place.is_gpu_place()
    return framework == "cupy"


def _direct(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn


def _torch(tensor: Any) -> Adapter:
    import torch

    device = tensor.device

    def allocator(specs: Sequence[OutputSpec]) -> Callable[[], tuple]:
        # On the CPU a torch.empty costs about what a view does, so one buffer cut into views saves nothing there;
        # on a GPU each allocation goes through the caching allocator and one buffer is cheaper.
        if device.type == "cpu":
            return torch_separate_buffers(torch, device, specs)
        return torch_one_buffer(torch, device, specs)

    return Adapter("torch", device.type == "cuda", device.index or 0, allocator, _direct)


def torch_separate_buffers(torch: Any, device: Any, specs: Sequence[OutputSpec]) -> Callable[[], tuple]:
    empty = torch.empty
    typed = [(shape, getattr(torch, dtype)) for shape, dtype in specs]
    if len(typed) not in (2, 3) or any(len(shape) != 2 for shape, _ in typed):
        return lambda: tuple(empty(*shape, dtype=dtype, device=device) for shape, dtype in typed)
    # Spelled out for the two- and three-output entry points, the shapes as separate ints: torch parses those
    # faster than a tuple, and a generator would cost about as much as one allocation here.
    ((rows_a, cols_a), dtype_a), ((rows_b, cols_b), dtype_b), *last = typed
    if not last:
        return lambda: (
            empty(rows_a, cols_a, dtype=dtype_a, device=device),
            empty(rows_b, cols_b, dtype=dtype_b, device=device),
        )
    (((rows_c, cols_c), dtype_c),) = last
    return lambda: (
        empty(rows_a, cols_a, dtype=dtype_a, device=device),
        empty(rows_b, cols_b, dtype=dtype_b, device=device),
        empty(rows_c, cols_c, dtype=dtype_c, device=device),
    )


def torch_one_buffer(torch: Any, device: Any, specs: Sequence[OutputSpec]) -> Callable[[], tuple]:
    """One allocation cut into the outputs (strided views of its float32 words, or of their int reinterpretation)."""
    offsets, total = piece_offsets(specs)
    pieces = [
        (
            shape,
            tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))),
            offset // np.dtype(dtype).itemsize,
            dtype,
        )
        for (shape, dtype), offset in zip(specs, offsets, strict=True)
    ]
    reinterpreted = [(dtype, getattr(torch, dtype)) for dtype in sorted({d for *_, d in pieces} - {"float32"})]

    def allocate() -> tuple:
        words = torch.empty(total // 4, dtype=torch.float32, device=device)
        typed = {"float32": words}
        for name, dtype in reinterpreted:
            typed[name] = words.view(dtype)
        return tuple(typed[dtype].as_strided(shape, stride, offset) for shape, stride, offset, dtype in pieces)

    return allocate


def _numpy(tensor: Any) -> Adapter:
    def allocator(specs: Sequence[OutputSpec]) -> Callable[[], tuple]:
        return lambda: tuple(np.empty(shape, dtype=dtype) for shape, dtype in specs)

    return Adapter("numpy", False, 0, allocator, _direct)


def _cupy(tensor: Any) -> Adapter:
    import cupy
    import tvm_ffi

    device_id = tensor.device.id

    def allocator(specs: Sequence[OutputSpec]) -> Callable[[], tuple]:
        offsets, total = piece_offsets(specs)

        def allocate() -> tuple:
            with cupy.cuda.Device(device_id):
                buffer = cupy.empty(total, dtype=cupy.uint8)
            return tuple(
                buffer[offset : offset + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
                for (shape, dtype), offset in zip(specs, offsets, strict=True)
            )

        return allocate

    def stream() -> int:
        return cupy.cuda.get_current_stream(device_id).ptr

    return Adapter("cupy", True, device_id, allocator, _stream_caller(tvm_ffi, device_id, stream))


def paddle_stream(paddle: Any, place: Any) -> int:
    """Paddle's current stream for ``place``, as a raw handle (CUDA stream protocol)."""
    return int(paddle.device.current_stream(place).__cuda_stream__()[1])


def _paddle(tensor: Any) -> Adapter:
    import paddle

    cuda = tensor.place.is_gpu_place()
    device_id = tensor.place.gpu_device_id() if cuda else 0
    # A tensor's place is a generic Place, which paddle.device.current_stream does not take: it wants a CUDAPlace.
    place = paddle.CUDAPlace(device_id) if cuda else tensor.place

    def allocator(specs: Sequence[OutputSpec]) -> Callable[[], tuple]:
        # Paddle has no cheap reinterpreting view between float32 and int64, so each output is its own tensor.
        return lambda: tuple(paddle.empty(list(shape), dtype=dtype, device=place) for shape, dtype in specs)

    if not cuda:
        return Adapter("paddle", False, 0, allocator, _direct)
    import tvm_ffi

    return Adapter(
        "paddle", True, device_id, allocator, _stream_caller(tvm_ffi, device_id, lambda: paddle_stream(paddle, place))
    )


def _stream_caller(tvm_ffi: Any, device_id: int, current_stream: Callable[[], int]):
    device = tvm_ffi.device("cuda", device_id)
    from_dlpack = tvm_ffi.from_dlpack

    def on_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            stream = current_stream()
            # DLPack reserves 0; 1 names the legacy default stream, which is what handle 0 is.
            consumer = stream or 1
            handed = [from_dlpack(a.__dlpack__(stream=consumer)) if hasattr(a, "__dlpack__") else a for a in args]
            with tvm_ffi.use_raw_stream(device, stream):
                return fn(*handed)

        return call

    return on_stream


_BUILDERS = {"torch": _torch, "numpy": _numpy, "cupy": _cupy, "paddle": _paddle}
