"""The stream hand-over for CUDA tensors of frameworks other than torch, on the CPU through stand-ins: the Paddle
branch asks Paddle for the tensor's current stream, gives it to every DLPack export and makes it the library's
stream for the call (and only for the call)."""

from __future__ import annotations

import numpy as np
import pytest

from op import frameworks

paddle = pytest.importorskip("paddle")
tvm_ffi = pytest.importorskip("tvm_ffi")


class StandInStream:
    """What ``paddle.device.current_stream`` returns, reduced to the CUDA stream protocol."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.handle


class StandInPlace:
    def __init__(self, device_id: int) -> None:
        self.device_id = device_id

    def is_gpu_place(self) -> bool:
        return True

    def gpu_device_id(self) -> int:
        return self.device_id


class StandInTensor:
    """A Paddle GPU tensor as the front-end sees it: a place, and a DLPack export that records its stream."""

    __module__ = "paddle"

    def __init__(self, array: np.ndarray, place: StandInPlace, exports: list) -> None:
        self.array, self.place, self.exports = array, place, exports

    def __dlpack__(self, stream=None):
        self.exports.append(stream)
        return self.array.__dlpack__()


@pytest.mark.parametrize(("handle", "dlpack_stream"), [(0x5A5A00, 0x5A5A00), (0, 1)])
def test_paddle_branch_launches_on_paddle_s_stream_for_the_tensor_s_device(monkeypatch, handle, dlpack_stream):
    asked, exports, seen = [], [], []
    monkeypatch.setattr(paddle.device, "current_stream", lambda place: asked.append(place) or StandInStream(handle))
    # A CPU build cannot make a CUDAPlace; the stand-in records which device the branch names.
    monkeypatch.setattr(paddle, "CUDAPlace", lambda device_id: ("CUDAPlace", device_id))
    place = StandInPlace(1)
    x = StandInTensor(np.zeros((2, 8), np.float32), place, exports)
    out = StandInTensor(np.zeros((2, 2), np.float32), place, exports)
    device = tvm_ffi.device("cuda", 1)
    before = tvm_ffi.get_raw_stream(device)

    def library_entry(*args):
        seen.append((tvm_ffi.get_raw_stream(device), [type(a).__name__ for a in args]))

    adapter = frameworks.adapter_for(x)
    assert adapter.framework == "paddle" and adapter.cuda and adapter.device_id == 1
    adapter.on_stream(library_entry)(x, out, None, 8, 2.5)
    assert asked == [("CUDAPlace", 1)]
    assert exports == [dlpack_stream, dlpack_stream]
    assert seen == [(handle, ["Tensor", "Tensor", "NoneType", "int", "float"])]
    assert tvm_ffi.get_raw_stream(device) == before
