"""Path ``cpu_kernel`` (the C++ CPU kernel) against the reference through numpy, torch and paddle tensors."""

from __future__ import annotations

import numpy as np
import pytest

from harness.inputs import DISTRIBUTIONS, generate_input
from op import grouped_topk
from op.configs import ALL_CONFIGS
from op.testing import assert_routing_close

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")


def as_torch(a):
    t = torch.from_numpy(a.astype(np.float32) if a.dtype.name == "bfloat16" else a)
    return t.to(torch.bfloat16) if a.dtype.name == "bfloat16" else t


def as_paddle(a):
    t = paddle.to_tensor(a.astype(np.float32) if a.dtype.name == "bfloat16" else a)
    return t.astype("bfloat16") if a.dtype.name == "bfloat16" else t


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_cpu_kernel_numpy(name, dtype, distribution, seed):
    config = ALL_CONFIGS[name]
    x, bias = generate_input(config, 129, dtype, seed, distribution, bias_dtype=dtype)
    assert_routing_close(grouped_topk(x, bias, *config.args()), x, bias, config)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cpu_kernel_takes_read_only_arrays(dtype, seed):
    """Buffers received from the network arrive read-only (``np.frombuffer`` of bytes)."""
    config = ALL_CONFIGS["deepseek_v3"]
    x, bias = generate_input(config, 33, dtype, seed)
    x_ro = np.frombuffer(x.tobytes(), dtype=x.dtype).reshape(x.shape)
    bias_ro = np.frombuffer(bias.tobytes(), dtype=bias.dtype)
    assert not x_ro.flags.writeable and not bias_ro.flags.writeable
    assert_routing_close(grouped_topk(x_ro, bias_ro, *config.args()), x, bias, config)


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2", "x_e160_g8"])
def test_cpu_kernel_torch_tensors(name, seed):
    config = ALL_CONFIGS[name]
    x, bias = generate_input(config, 64, "bfloat16", seed, "router_like")
    scores, values, ids = grouped_topk(as_torch(x), torch.from_numpy(bias), *config.args(), index_dtype="int32")
    assert isinstance(values, torch.Tensor) and ids.dtype == torch.int32
    assert_routing_close((scores, values, ids), x, bias, config)


@pytest.mark.parametrize("name", ["deepseek_v3", "glm45_air", "fd_kimi_k2"])
def test_cpu_kernel_paddle_tensors(name, seed):
    config = ALL_CONFIGS[name]
    x, bias = generate_input(config, 64, "bfloat16", seed, "nonfinite")
    out = grouped_topk(as_paddle(x), paddle.to_tensor(bias), *config.args())
    assert all(isinstance(t, paddle.Tensor) for t in out)
    assert_routing_close(out, x, bias, config)


def test_cpu_kernel_options_and_out(seed):
    config = ALL_CONFIGS["deepseek_v3"]
    x, bias = generate_input(config, 16, "float32", seed)
    scores, values, ids = grouped_topk(x, bias, *config.args(), return_scores=False)
    assert scores is None
    out = (np.full((16, 256), np.nan, np.float32), np.full((16, 8), np.nan, np.float32), np.full((16, 8), -7))
    result = grouped_topk(x, bias.reshape(1, -1), *config.args(), out=out)
    assert result[1] is out[1]
    assert_routing_close(out, x, bias, config)
    empty = grouped_topk(x[:0], bias, *config.args())
    assert empty[0].shape == (0, 256) and empty[2].shape == (0, 8)


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda x, b: grouped_topk(x, b, 8, 4, 33, True, 1.0), "top_k=33"),
        (lambda x, b: grouped_topk(x, b, 7, 4, 8, True, 1.0), "n_group=7"),
        (lambda x, b: grouped_topk(x[:, ::2], b[::2], 8, 4, 8, True, 1.0), "contiguous"),
        (lambda x, b: grouped_topk(x, b[:8], 8, 4, 8, True, 1.0), "e_score_correction_bias shape"),
        (lambda x, b: grouped_topk(x, b, 8, 4, 8, True, 1.0, index_dtype="int8"), "index_dtype"),
        (lambda x, b: grouped_topk(x, b, 8, 4, 8, True, 1.0, out=(None, None)), "out must be a tuple"),
        (
            lambda x, b: grouped_topk(
                x, b, 8, 4, 8, True, 1.0, out=(None, np.zeros((4, 8), np.float32), np.zeros((4, 8), np.int32))
            ),
            "topk_indices",
        ),
        (lambda x, b: grouped_topk(x, b, 8, 4, 8, True, 1.0, num_tokens=np.int32(1)), "num_tokens"),
        (lambda x, b: grouped_topk(x.tolist(), b, 8, 4, 8, True, 1.0), "not supported"),
    ],
)
def test_front_end_errors_name_the_argument(call, needle):
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    with pytest.raises(ValueError, match=needle):
        call(x, np.zeros(256, np.float32))


def test_library_rejects_bad_shapes_at_the_c_boundary():
    from op.build import library

    x = np.zeros((4, 256), np.float32)
    with pytest.raises(ValueError, match="topk_values"):
        library().cpu_grouped_topk(
            x,
            np.zeros(256, np.float32),
            None,
            np.zeros((4, 7), np.float32),
            np.zeros((4, 8), np.int64),
            8,
            4,
            8,
            True,
            1.0,
            0,
        )


def test_cuda_only_entry_points_reject_cpu_tensors():
    from op import cast_sigmoid_bias, noaux_tc, two_kernel_grouped_topk

    x = np.zeros((4, 256), np.float32)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        cast_sigmoid_bias(x, np.zeros(256, np.float32))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        noaux_tc(x, x.copy(), 8, 4, 8, True, 1.0)
    with pytest.raises(ValueError, match="must equal scores shape"):
        noaux_tc(x, x[:2].copy(), 8, 4, 8, True, 1.0)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        two_kernel_grouped_topk(x, np.zeros(256, np.float32), 8, 4, 8, True, 1.0)
