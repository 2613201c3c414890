"""The loadtest can fail: against a model that answers wrongly it exits non-zero, and no client-side exception
is lost."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("tritonclient.http")

from graphs.serve import loadtest  # noqa: E402
from graphs.serve.models import ModelSettings, ServedModel  # noqa: E402
from graphs.serve.server import ServerSettings, create_app, running_server  # noqa: E402
from harness.cli import main  # noqa: E402

LOADTEST = ["--preset", "deepseek_v3", "--clients", "3", "--requests", "12", "--max-request-tokens", "16"]


class _DoubledWeights(ServedModel):
    """Answers every request with its weights doubled: ids right, weights wrong."""

    def collect(self) -> dict[str, np.ndarray]:
        out = super().collect()
        return {**out, "topk_values": out["topk_values"] * 2}


class _ShiftedIds(ServedModel):
    """Answers every request with the next expert's ids."""

    def collect(self) -> dict[str, np.ndarray]:
        out = super().collect()
        return {**out, "topk_indices": (out["topk_indices"] + 1) % self.config.num_experts}


def _serve(model_class):
    return running_server(create_app([model_class(ModelSettings("deepseek_v3"))], ServerSettings()))


@pytest.mark.parametrize("model_class", [_DoubledWeights, _ShiftedIds])
def test_loadtest_exits_non_zero_against_a_wrong_model(model_class, capsys):
    with _serve(model_class) as url:
        assert main(["loadtest", "--url", url, *LOADTEST]) == 1
    out = capsys.readouterr().out
    assert "wrong answers: 12" in out and "WRONG request" in out


def test_loadtest_passes_against_the_right_model(capsys):
    with _serve(ServedModel) as url:
        assert main(["loadtest", "--url", url, *LOADTEST]) == 0
    assert "wrong answers: 0; failed requests: 0" in capsys.readouterr().out


def test_an_exception_in_a_client_thread_is_a_recorded_failure(monkeypatch):
    def broken_check(*_args, **_kwargs):
        raise RuntimeError("checker broke")

    monkeypatch.setattr("op.testing.compare_routing", broken_check)
    with _serve(ServedModel) as url:
        result = loadtest.run_loadtest(url, "deepseek_v3", clients=2, requests=6, max_tokens=8, seed=5)
    assert not result.ok
    assert len(result.failed) == 6 and all("checker broke" in f for f in result.failed)
