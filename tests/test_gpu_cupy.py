"""CuPy tensors on CuPy's own stream, for every CUDA path: an eager call ordered behind a spinning kernel with no
synchronisation, and a CUDA-graph capture on a CuPy stream (outputs through ``out=``) replayed on new logits."""

from __future__ import annotations

import numpy as np
import pytest

from harness.inputs import generate_input
from op.configs import PRESETS
from op.testing import assert_routing_close

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")

from op import fused_block_grouped_topk, grouped_topk, two_kernel_grouped_topk  # noqa: E402

PATHS = {"fused": grouped_topk, "two_kernel": two_kernel_grouped_topk, "fused_block": fused_block_grouped_topk}
CONFIG = PRESETS["deepseek_v3"]

# Spins for `cycles` clock ticks, then writes the logits: anything not ordered after it on its stream reads the
# old values.
_SPIN_THEN_COPY = r"""
extern "C" __global__ void spin_then_copy(const float* src, float* dst, long long n, long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    dst[i] = src[i];
}
"""


def _spin_then_copy():
    return cupy.RawKernel(_SPIN_THEN_COPY, "spin_then_copy")


def _outputs(rows):
    return (
        cupy.full((rows, CONFIG.num_experts), -7.0, dtype=cupy.float32),
        cupy.full((rows, CONFIG.top_k), -7.0, dtype=cupy.float32),
        cupy.full((rows, CONFIG.top_k), -7, dtype=cupy.int64),
    )


@pytest.mark.parametrize("path", sorted(PATHS))
def test_eager_call_follows_the_callers_stream_without_synchronisation(path, seed):
    x, bias = generate_input(CONFIG, 4096, "float32", seed)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        source = cupy.asarray(x)
        logits = cupy.zeros_like(source)
        bias_d = cupy.asarray(bias)
        stream.synchronize()
        _spin_then_copy()((64,), (256,), (source, logits, np.int64(source.size), np.int64(200_000_000)))
        scores, values, ids = PATHS[path](logits, bias_d, *CONFIG.args())
        # Queued right behind the routing call on the same stream: sees its final outputs only if the call
        # launched on this stream.
        copies = (scores.copy(), values.copy(), ids.copy())
    stream.synchronize()
    assert_routing_close(tuple(cupy.asnumpy(c) for c in copies), x, bias, CONFIG)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_capture_on_a_cupy_stream_with_out_then_replay_on_new_logits(path, seed):
    first, bias = generate_input(CONFIG, 512, "float32", seed)
    second, _ = generate_input(CONFIG, 512, "float32", seed + 1)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        logits, bias_d, new_logits = cupy.asarray(first), cupy.asarray(bias), cupy.asarray(second)
        out = _outputs(512)
        PATHS[path](logits, bias_d, *CONFIG.args(), out=out)  # warm-up: builds the call's plan outside the capture
        stream.synchronize()
        stream.begin_capture()
        PATHS[path](logits, bias_d, *CONFIG.args(), out=out)
        graph = stream.end_capture()
        for answer, source in ((first, None), (second, new_logits)):
            if source is not None:
                logits[...] = source
            for tensor in out:
                tensor.fill(-7)
            graph.launch(stream)
            stream.synchronize()
            assert_routing_close(tuple(cupy.asnumpy(t) for t in out), answer, bias, CONFIG)
