"""What the front-end needs from each tensor framework, resolved once per (framework, device).

An ``Adapter`` holds the framework's module and the tensor's device, so the per-call work is only what must
happen per call: allocating the outputs and calling the library. CUDA launches go on the framework's current
stream: torch's reaches the library through its DLPack exchange API; CuPy's and Paddle's are looked up per call,
set as the library's stream for the call, and given to the DLPack export so it inserts no wait on another
stream (a wait on the legacy stream is what breaks a CUDA-graph capture).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FRAMEWORKS = ("torch", "paddle", "numpy", "cupy")
# Every output piece of a one-buffer allocation (CuPy's) starts on a 16-byte boundary: the kernels store 16 bytes
# wide where the row allows. Framework allocations are aligned at least that far.
ALIGNMENT = 16

OutputSpec = tuple[tuple[int, ...], str]


def framework_of(tensor: Any, name: str = "gating_output") -> str:
    module = type(tensor).__module__.split(".")[0]
    if module in FRAMEWORKS:
        return module
    raise ValueError(
        f"{name} of type {type(tensor).__name__} is not supported: pass a torch, paddle, cupy or numpy tensor"
    )


def piece_offsets(specs: Sequence[OutputSpec | None]) -> tuple[list[int], int]:
    """Byte offsets of each output inside one buffer, each rounded up to ``ALIGNMENT``, and the buffer's size
    (a None spec takes no room)."""
    offsets, total = [], 0
    for spec in specs:
        offsets.append(total)
        if spec is not None:
            shape, dtype = spec
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            total += -(-nbytes // ALIGNMENT) * ALIGNMENT
    return offsets, max(total, ALIGNMENT)


def assemble(makers: Sequence[Callable[[], Any] | None]) -> Callable[[], tuple]:
    """A function calling each maker (None where a maker is None): spelled out for three and four outputs, where a
    generator would cost about as much as one allocation."""
    if len(makers) == 3:
        a, b, c = makers
        if a is None:
            return lambda: (None, b(), c())
        return lambda: (a(), b(), c())
    if len(makers) == 4 and None not in makers:
        a, b, c, d = makers
        return lambda: (a(), b(), c(), d())
    return lambda: tuple(None if make is None else make() for make in makers)


@dataclass(frozen=True)
class Adapter:
    framework: str
    cuda: bool
    device_id: int
    # specs (None where an output is not wanted) -> a function returning fresh outputs of those shapes and dtypes
    # on the tensor's device, None at the None specs.
    allocator: Callable[[Sequence[OutputSpec | None]], Callable[[], tuple]]
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

    cuda = device.type == "cuda"
    make = torch_new_empty if cuda else torch_empty_like

    def allocator(specs: Sequence[OutputSpec | None]) -> Callable[[], tuple]:
        return make(torch, device, specs)

    return Adapter("torch", cuda, device.index or 0, allocator, _direct)


def torch_new_empty(torch: Any, device: Any, specs: Sequence[OutputSpec | None]) -> Callable[[], tuple]:
    """CUDA outputs: one ``new_empty`` per output, bound to an empty tensor of the output's dtype on the device, its
    sizes bound as ints (no dtype, device or shape tuple to parse). The bound tensor has no elements, so a plan
    holds no device memory: a plan built while torch.compile's CUDA graphs warm up would otherwise keep a block of
    their private pool alive, which they refuse."""

    def maker(shape: tuple[int, ...], dtype: str) -> Callable[[], Any]:
        return functools.partial(torch.empty(0, dtype=getattr(torch, dtype), device=device).new_empty, *shape)

    return assemble([None if spec is None else maker(*spec) for spec in specs])


# Largest output whose template is a real tensor of its shape (see torch_empty_like): 16 KiB holds the scores of up
# to 16 tokens of 256 experts, the batches where host cost decides.
DENSE_TEMPLATE_MAX_BYTES = 1 << 14


def torch_empty_like(torch: Any, device: Any, specs: Sequence[OutputSpec | None]) -> Callable[[], tuple]:
    """CPU outputs: one ``torch.empty_like`` per output, bound to a template of the output's shape, dtype and
    device: the cheapest call that yields a fresh torch tensor (no size, dtype or device argument to parse). On a
    2-core x86-64 CPU one takes about 0.78 us against 0.87 for a bound ``new_empty`` with its sizes and 1.6 for
    ``torch.empty`` with dtype and device; a single allocation cut into the outputs costs more than three, as every
    view is an op. Small outputs get a dense template (its own storage); larger ones a one-element tensor expanded
    to the shape, which costs ``empty_like`` a stride check (about 0.06 us). Either way the result is a fresh
    contiguous tensor."""

    def maker(shape: tuple[int, ...], dtype: str) -> Callable[[], Any]:
        dtype = getattr(torch, dtype)
        if math.prod(shape) * dtype.itemsize <= DENSE_TEMPLATE_MAX_BYTES:
            template = torch.empty(shape, dtype=dtype, device=device)
        else:
            template = torch.empty((), dtype=dtype, device=device).expand(shape)
        return functools.partial(torch.empty_like, template)

    return assemble([None if spec is None else maker(*spec) for spec in specs])


def _numpy(tensor: Any) -> Adapter:
    def allocator(specs: Sequence[OutputSpec | None]) -> Callable[[], tuple]:
        return assemble([None if spec is None else functools.partial(np.empty, *spec) for spec in specs])

    return Adapter("numpy", False, 0, allocator, _direct)


def _cupy(tensor: Any) -> Adapter:
    import cupy
    import tvm_ffi

    device_id = tensor.device.id

    def allocator(specs: Sequence[OutputSpec | None]) -> Callable[[], tuple]:
        offsets, total = piece_offsets(specs)

        def allocate() -> tuple:
            with cupy.cuda.Device(device_id):
                buffer = cupy.empty(total, dtype=cupy.uint8)
            return tuple(
                None
                if spec is None
                else buffer[offset : offset + int(np.prod(spec[0])) * np.dtype(spec[1]).itemsize]
                .view(spec[1])
                .reshape(spec[0])
                for spec, offset in zip(specs, offsets, strict=True)
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

    def allocator(specs: Sequence[OutputSpec | None]) -> Callable[[], tuple]:
        # Paddle has no cheap reinterpreting view between float32 and int64, so each output is its own tensor.
        return assemble(
            [
                None if spec is None else functools.partial(paddle.empty, list(spec[0]), spec[1], device=place)
                for spec in specs
            ]
        )

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
