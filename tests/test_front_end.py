"""The eager front-end on the CPU: per-signature plans, argument types, the outputs' allocation, DLPack byte
offsets."""

from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import pytest

from harness.inputs import generate_input
from op import api, grouped_topk, noaux_tc, reference
from op.build import library
from op.configs import PRESETS
from op.frameworks import adapter_for

torch = pytest.importorskip("torch")

DEEPSEEK = PRESETS["deepseek_v3"]
KIMI = PRESETS["kimi_k2"]  # n_group = topk_group = 1, so an n_group of True would equal a valid 1


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_true_never_finds_the_plan_of_one(seed):
    x, bias = generate_input(KIMI, 4, "float32", seed)
    grouped_topk(x, bias, 1, 1, 8, True, 1.0, num_threads=1)
    with pytest.raises(ValueError, match="n_group must be an int"):
        grouped_topk(x, bias, True, 1, 8, True, 1.0, num_threads=1)
    with pytest.raises(ValueError, match="top_k must be an int"):
        grouped_topk(x, bias, 1, 1, 8.0, True, 1.0, num_threads=1)
    with pytest.raises(ValueError, match="routed_scaling_factor must be a real number"):
        grouped_topk(x, bias, 1, 1, 8, True, True, num_threads=1)
    with pytest.raises(ValueError, match="num_threads=True is invalid"):
        grouped_topk(x, bias, 1, 1, 8, True, 1.0, num_threads=True)


def test_errors_are_never_cached(seed):
    x, bias = generate_input(DEEPSEEK, 4, "float32", seed)
    for _ in range(2):
        with pytest.raises(ValueError, match="top_k=33"):
            grouped_topk(x, bias, 8, 4, 33, True, 2.5)
    assert_same(grouped_topk(x, bias, *DEEPSEEK.args()), grouped_topk(x.copy(), bias.copy(), *DEEPSEEK.args()))


def test_a_plan_serves_every_call_of_its_signature_with_that_call_s_data(seed):
    plans = len(api._plans)
    first = generate_input(DEEPSEEK, 6, "bfloat16", seed)
    second = generate_input(DEEPSEEK, 6, "bfloat16", seed + 1)
    a = grouped_topk(*first, *DEEPSEEK.args())
    b = grouped_topk(*second, *DEEPSEEK.args())
    assert len(api._plans) <= plans + 1
    assert not np.array_equal(a[2], b[2])
    assert_same(a, grouped_topk(first[0].copy(), first[1].copy(), *DEEPSEEK.args()))


def test_numpy_scalars_are_accepted(seed):
    x, bias = generate_input(DEEPSEEK, 8, "float32", seed)
    expected = grouped_topk(x, bias, 8, 4, 8, True, 2.5)
    assert_same(grouped_topk(x, bias, np.int64(8), np.int32(4), np.int64(8), np.bool_(True), np.float32(2.5)), expected)
    with pytest.raises(ValueError, match="n_group must be an int"):
        grouped_topk(x, bias, np.bool_(True), 4, 8, True, 2.5)


def test_return_scores_false_gives_the_same_routing(seed):
    x, bias = generate_input(DEEPSEEK, 8, "float32", seed)
    scores, values, ids = grouped_topk(torch.from_numpy(x), torch.from_numpy(bias), *DEEPSEEK.args())
    none, values2, ids2 = grouped_topk(
        torch.from_numpy(x), torch.from_numpy(bias), *DEEPSEEK.args(), return_scores=False
    )
    assert none is None and torch.equal(values, values2) and torch.equal(ids, ids2)


def test_out_with_the_wrong_index_dtype_is_refused(seed):
    x, bias = generate_input(DEEPSEEK, 4, "float32", seed)
    out = (None, np.empty((4, 8), np.float32), np.empty((4, 8), np.int32))
    grouped_topk(x, bias, *DEEPSEEK.args(), index_dtype="int32", out=out)
    with pytest.raises(ValueError, match="topk_indices"):
        grouped_topk(x, bias, *DEEPSEEK.args(), out=out)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda s: (s[None], s[None]), "scores must be 2-D"),
        (lambda s: (s.astype(np.float16), s), "scores must be float32"),
        (lambda s: (s, s.astype(np.float16)), "scores_with_bias must be float32"),
    ],
)
def test_noaux_tc_errors_name_its_own_arguments(make, needle):
    scores = np.zeros((4, 256), np.float32)
    with pytest.raises(ValueError, match=needle) as raised:
        noaux_tc(*make(scores), 8, 4, 8, True, 1.0)
    assert "gating_output" not in str(raised.value)


@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
# 40 x 256 scores pass the largest dense template (16 KiB): they come from a template expanded to the shape.
@pytest.mark.parametrize(
    ("rows", "experts", "top_k"), [(1, 256, 8), (3, 72, 8), (5, 160, 6), (0, 256, 8), (40, 256, 8)]
)
def test_fresh_outputs_are_aligned_disjoint_and_routable(rows, experts, top_k, index_dtype):
    specs = [((rows, experts), "float32"), ((rows, top_k), "float32"), ((rows, top_k), index_dtype)]
    allocate = adapter_for(torch.zeros(1)).allocator(specs)
    pieces = allocate()
    spans = []
    for tensor, (shape, dtype) in zip(pieces, specs, strict=True):
        assert tuple(tensor.shape) == shape and tensor.dtype == getattr(torch, dtype) and tensor.is_contiguous()
        assert tensor.data_ptr() % 16 == 0  # the kernels load and store 16 bytes wide
        spans.append((tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    again = allocate()
    assert all(a.data_ptr() != b.data_ptr() or not a.numel() for a, b in zip(pieces, again, strict=True))
    assert all(a.data_ptr() != b.data_ptr() or not a.numel() for a, b in zip(pieces, allocate(), strict=True))
    if rows:
        args = (1, 1, top_k, True, 1.0)
        x = np.random.default_rng(rows).standard_normal((rows, experts)).astype(np.float32)
        bias = np.zeros(experts, np.float32)
        expected = grouped_topk(x, bias, *args, index_dtype=index_dtype)
        into = grouped_topk(torch.from_numpy(x), torch.from_numpy(bias), *args, index_dtype=index_dtype, out=pieces)
        assert_same(into, expected)


def test_a_none_spec_gives_none():
    scores, values, ids = adapter_for(torch.zeros(1)).allocator([None, ((2, 8), "float32"), ((2, 8), "int64")])()
    assert scores is None and values.shape == (2, 8) and ids.dtype == torch.int64


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


def _capsule_with_offset(buffer: np.ndarray, offset: int, shape: tuple[int, ...], keep: list):
    """A legacy DLPack capsule whose data pointer is ``buffer``'s start and whose tensor begins ``offset``
    bytes later: the layout a producer may hand over, which frameworks usually fold into the pointer."""
    dims = (ctypes.c_int64 * len(shape))(*shape)
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(
        buffer.ctypes.data, _DLDevice(1, 0), len(shape), _DLDataType(2, 32, 1), dims, None, offset
    )
    keep += [dims, managed, buffer]
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype, new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new_capsule(ctypes.addressof(managed), b"dltensor", None)


def test_the_library_reads_from_the_dlpack_byte_offset(seed):
    import tvm_ffi

    x, bias = generate_input(DEEPSEEK, 5, "float32", seed)
    pad = 16  # floats before the logits begin
    buffer = np.concatenate([np.full(pad, 1e4, np.float32), x.ravel()])
    keep: list = []
    shifted = tvm_ffi.from_dlpack(_capsule_with_offset(buffer, pad * 4, x.shape, keep))
    values, ids = np.empty((5, 8), np.float32), np.empty((5, 8), np.int64)
    library().cpu_grouped_topk(shifted, bias, None, values, ids, *DEEPSEEK.args(), 1)
    _, expected_values, expected_ids = grouped_topk(x, bias, *DEEPSEEK.args())
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(values, expected_values)


@pytest.mark.parametrize("framework", ["numpy", "torch", "paddle"])
def test_a_signature_builds_its_plan_once(framework, monkeypatch, seed):
    if framework == "paddle":
        convert = pytest.importorskip("paddle").to_tensor
    else:
        convert = torch.from_numpy if framework == "torch" else np.asarray
    builds = []
    build = api._fused_plan
    monkeypatch.setattr(api, "_plans", {})
    monkeypatch.setattr(api, "_fused_plan", lambda *a: builds.append(a[0]) or build(*a))
    for step in range(3):
        x, bias = generate_input(DEEPSEEK, 4, "float32", seed + step)
        grouped_topk(convert(x), convert(bias), *DEEPSEEK.args())
    assert builds == ["fused_grouped_topk"]


def test_no_scores_with_out_returns_none_for_scores_even_at_zero_tokens(seed):
    for tokens in (0, 3):
        x, bias = generate_input(DEEPSEEK, tokens, "float32", seed)
        out = (np.empty((tokens, 256), np.float32), np.empty((tokens, 8), np.float32), np.empty((tokens, 8), np.int64))
        scores, values, ids = grouped_topk(x, bias, *DEEPSEEK.args(), return_scores=False, out=out)
        assert scores is None and values is out[1] and ids is out[2]


def _counting_builds(monkeypatch) -> list:
    builds = []
    build = api._fused_plan
    monkeypatch.setattr(api, "_plans", {})
    monkeypatch.setattr(api, "_fused_plan", lambda *a: builds.append(a) or build(*a))
    return builds


def test_a_logits_dtype_or_shape_of_its_own_gets_a_plan_of_its_own(monkeypatch, seed):
    """Same routing arguments, other logits: a cached plan of the first would route the second with the wrong
    dtype or shape."""
    builds = _counting_builds(monkeypatch)
    x, bias = generate_input(DEEPSEEK, 4, "float32", seed)
    as_bf16 = torch.from_numpy(x).bfloat16()
    calls = [
        (torch.from_numpy(x), reference.grouped_topk(x, bias, *DEEPSEEK.args())),
        (as_bf16, reference.grouped_topk(as_bf16.float().numpy(), bias, *DEEPSEEK.args())),
        (torch.from_numpy(x[:3].copy()), reference.grouped_topk(x[:3], bias, *DEEPSEEK.args())),
    ]
    for logits, expected in calls:
        scores, values, ids = grouped_topk(logits, torch.from_numpy(bias), *DEEPSEEK.args())
        assert scores.shape == expected[0].shape
        np.testing.assert_array_equal(ids.numpy(), expected[2])
    assert len(builds) == 3


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_the_bias_is_checked_and_read_on_every_call_under_one_plan(framework, monkeypatch, seed):
    """The bias's shape and dtype are not in the key: a plan built for a float32 bias serves a bfloat16 one (each
    routed by its own values) and a bias of another shape or of float64 is refused on every call."""
    builds = _counting_builds(monkeypatch)
    x, bias = generate_input(DEEPSEEK, 4, "float32", seed)
    convert = torch.from_numpy if framework == "torch" else np.asarray
    first = grouped_topk(convert(x), convert(bias), *DEEPSEEK.args())
    np.testing.assert_array_equal(np.asarray(first[2]), reference.grouped_topk(x, bias, *DEEPSEEK.args())[2])
    # Its own bias, far from the first, so the routing must change if it is read.
    other = generate_input(DEEPSEEK, 4, "float32", seed + 1)[1].astype(ml_dtypes.bfloat16)
    given = torch.from_numpy(other.astype(np.float32)).bfloat16() if framework == "torch" else other
    second = grouped_topk(convert(x), given, *DEEPSEEK.args())
    assert not np.array_equal(np.asarray(second[2]), np.asarray(first[2]))
    np.testing.assert_array_equal(np.asarray(second[2]), reference.grouped_topk(x, other, *DEEPSEEK.args())[2])
    for _ in range(2):
        with pytest.raises(ValueError, match=r"e_score_correction_bias shape \[8\] does not match num_experts=256"):
            grouped_topk(convert(x), convert(bias[:8].copy()), *DEEPSEEK.args())
        with pytest.raises(ValueError, match="e_score_correction_bias dtype float64"):
            grouped_topk(convert(x), convert(bias.astype(np.float64)), *DEEPSEEK.args())
    assert len(builds) == 1


def test_a_bias_of_another_framework_is_refused_under_a_cached_plan(seed):
    x, bias = generate_input(DEEPSEEK, 4, "float32", seed)
    grouped_topk(torch.from_numpy(x), torch.from_numpy(bias), *DEEPSEEK.args())
    with pytest.raises(ValueError, match="same framework"):
        grouped_topk(torch.from_numpy(x), bias, *DEEPSEEK.args())


def test_calls_with_and_without_out_keep_plans_of_their_own(monkeypatch, seed):
    """A plan serves either calls with ``out=`` or calls without it: the one without must never drop the given
    tensors, the one with must never allocate."""
    builds = _counting_builds(monkeypatch)
    x, bias = (torch.from_numpy(a) for a in generate_input(DEEPSEEK, 4, "float32", seed))
    fresh = grouped_topk(x, bias, *DEEPSEEK.args())
    for given in ([torch.full_like(t, -1) for t in fresh], tuple(torch.full_like(t, -1) for t in fresh)):
        result = grouped_topk(x, bias, *DEEPSEEK.args(), out=given)
        assert all(r is g for r, g in zip(result, given, strict=True))
        assert all(torch.equal(r, f) for r, f in zip(result, fresh, strict=True))
    again = grouped_topk(x, bias, *DEEPSEEK.args())
    assert all(a.data_ptr() != g.data_ptr() for a, g in zip(again, given, strict=True))
    assert [b[-1] for b in builds] == [False, True]


def test_an_index_dtype_of_its_own_gets_a_plan_of_its_own(seed):
    x, bias = (torch.from_numpy(a) for a in generate_input(DEEPSEEK, 4, "float32", seed))
    assert grouped_topk(x, bias, *DEEPSEEK.args())[2].dtype == torch.int64
    assert grouped_topk(x, bias, *DEEPSEEK.args(), index_dtype="int32")[2].dtype == torch.int32
    assert grouped_topk(x, bias, *DEEPSEEK.args(), return_scores=False)[0] is None
    assert grouped_topk(x, bias, *DEEPSEEK.args())[0] is not None


def test_torch_tensors_reach_the_library_through_the_c_exchange_api(monkeypatch, seed):
    """tvm-ffi hands a torch tensor over through torch's DLPack C exchange API (about 0.1 us a tensor) where torch
    has one; its fallbacks go through ``torch.utils.dlpack.to_dlpack`` or ``__dlpack__``, several times slower. With
    both made to fail, a call still routes."""
    x, bias = (torch.from_numpy(a) for a in generate_input(DEEPSEEK, 3, "float32", seed))
    expected = grouped_topk(x, bias, *DEEPSEEK.args())

    def refuse(*args, **kwargs):
        raise AssertionError("a torch tensor went through a Python DLPack export")

    monkeypatch.setattr(torch.Tensor, "__dlpack__", refuse)
    monkeypatch.setattr(torch.utils.dlpack, "to_dlpack", refuse)
    for routed, wanted in zip(grouped_topk(x.clone(), bias.clone(), *DEEPSEEK.args()), expected, strict=True):
        assert torch.equal(routed, wanted)
