"""op.grouped_topk inside torch.compile(fullgraph=True) on CPU tensors: no graph break, results equal eager; and
importing op and its entry points loads no framework (the custom ops are registered only when a trace needs them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.inputs import generate_input
from op.configs import PRESETS

torch = pytest.importorskip("torch")

import op  # noqa: E402


def as_torch(x, bias):
    t = torch.from_numpy(x.astype("float32")).to(torch.bfloat16) if x.dtype.name == "bfloat16" else torch.from_numpy(x)
    return t, torch.from_numpy(bias)


@pytest.mark.parametrize(
    "options",
    [{}, {"return_scores": False}, {"index_dtype": "int32"}],
    ids=["scores", "noscores", "int32"],
)
@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
def test_fullgraph_compile_on_cpu_equals_eager(name, options, seed):
    config = PRESETS[name]
    torch._dynamo.reset()

    def route(x, bias):
        scores, values, ids = op.grouped_topk(x, bias, *config.args(), **options)
        # Work around the op in the same graph, so a break would split it.
        return scores, values * 2, ids

    compiled = torch.compile(route, fullgraph=True)
    for step in range(2):
        x, bias = as_torch(*generate_input(config, 17, "bfloat16", seed + step))
        actual, expected = compiled(x, bias), route(x, bias)
        for a, e in zip(actual, expected, strict=True):
            assert (a is None and e is None) or torch.equal(a, e)


def test_compiled_call_rejects_out():
    config = PRESETS["deepseek_v3"]
    x, bias = as_torch(*generate_input(config, 2, "float32", 0))
    out = op.grouped_topk(x, bias, *config.args())
    compiled = torch.compile(lambda x, b: op.grouped_topk(x, b, *config.args(), out=out), fullgraph=True)
    with pytest.raises(Exception, match="out= is not supported inside torch.compile"):
        compiled(x, bias)


def test_importing_op_and_its_entry_points_loads_no_framework():
    code = (
        "import sys, op\n"
        "from op import grouped_topk, two_kernel_grouped_topk, noaux_tc, cast_sigmoid_bias\n"
        "loaded = [m for m in ('torch', 'paddle', 'cupy', 'tvm_ffi') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=".")
