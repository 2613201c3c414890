"""A served routing model: its preset, its bias (and where it came from), and the backend that computes batches.

Backends take a batch as the logits of its requests (numpy arrays ``[rows, E]`` of any input dtype) and return
numpy outputs that the caller owns: ``gpu`` writes them into pinned memory, copies them in, replays the graph
runner's bucket and copies the rows back; ``cpu`` runs the C++ CPU kernel on them. FP16 and BF16 logits become
float32 first: exactly, and the kernels compute in float32 anyway (DESIGN.md, rule 1), so requests of every dtype
can share one batch and one graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphs.buckets import BucketTable, bucket_list
from op.configs import RoutingConfig, get_config

BIAS_KEY = "e_score_correction_bias"
MODEL_VERSION = "1"
# Batches of up to this many rows are computed on the event loop instead of the worker thread (see inline_rows).
INLINE_ROWS = {"cpu": 16, "gpu": 256}
# Views of the pinned and device buffers kept per batch size, bounded like the graph runner's.
VIEW_CACHE_ENTRIES = 4096
BACKENDS = ("cpu", "gpu")


def seeded_bias(num_experts: int, seed: int) -> np.ndarray:
    """The bias a model gets when no file is given: small normal values from a recorded seed."""
    return (np.random.default_rng(seed).standard_normal(num_experts) * 0.1).astype(np.float32)


def bias_digest(bias: np.ndarray) -> str:
    """The sha256 of a float32 bias's bytes: what model metadata publishes and a client checks its copy against."""
    return hashlib.sha256(bias.tobytes()).hexdigest()


def load_bias(path: Path, num_experts: int) -> np.ndarray:
    """A bias of ``num_experts`` values from ``.npy``, or ``.safetensors`` under the key ``e_score_correction_bias``."""
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if BIAS_KEY not in tensors:
            raise ValueError(f"{path} holds no tensor {BIAS_KEY!r} (it has: {', '.join(sorted(tensors)) or 'none'})")
        array = tensors[BIAS_KEY]
    else:
        raise ValueError(f"bias file {path} must end in .npy or .safetensors")
    array = np.asarray(array).astype(np.float32).reshape(-1)
    if array.shape != (num_experts,):
        raise ValueError(f"bias file {path} holds {array.size} values: the model has E={num_experts} experts")
    return array


@dataclass(frozen=True)
class ModelSettings:
    preset: str
    backend: str = "cpu"
    index_dtype: str = "int64"
    with_scores: bool = False
    bias_file: Path | None = None
    bias_seed: int = 0
    bucket_policy: str = "pow2"
    max_bucket: int = 8192


class _CpuBackend:
    """Computes a batch when it is launched."""

    def __init__(self, model: ServedModel):
        self.model = model
        self._outputs: tuple | None = None

    def launch(self, parts: Sequence[np.ndarray]) -> None:
        from op import grouped_topk

        m = self.model
        logits = parts[0].astype(np.float32, copy=False) if len(parts) == 1 else np.concatenate(parts, dtype=np.float32)
        self._outputs = grouped_topk(
            logits, m.bias, *m.config.args(), index_dtype=m.settings.index_dtype, return_scores=m.settings.with_scores
        )

    def ready(self) -> bool:
        return True

    def collect(self) -> tuple:
        outputs, self._outputs = self._outputs, None
        return outputs


class _GpuBackend:
    """The float32 graph runner, fed from pinned host memory. A batch is one library call (``GraphRunner.from_host``):
    the copy in, the replay, the copies out and an event behind them, queued asynchronously; no torch op runs per
    batch and none depends on the number of requests in it. The event says when the outputs are in: polled from the
    event loop, waited for from a worker thread."""

    def __init__(self, model: ServedModel):
        import torch

        from graphs.runner import GraphRunner

        if not torch.cuda.is_available():
            raise RuntimeError("backend 'gpu' needs a CUDA GPU visible to torch; use --backend cpu")
        s, self.largest, experts = model.settings, model.table.largest, model.config.num_experts
        self.bias = torch.from_numpy(model.bias).cuda()
        self.runner = GraphRunner(
            "fused",
            model.config,
            model.table.buckets,
            "float32",
            index_dtype=s.index_dtype,
            return_scores=s.with_scores,
            name=model.name,
        )
        self.staging = torch.empty((self.largest, experts), dtype=torch.float32, pin_memory=True)
        self.host_out = (
            torch.empty((self.largest, experts), dtype=torch.float32, pin_memory=True) if s.with_scores else None,
            torch.empty((self.largest, model.config.top_k), dtype=torch.float32, pin_memory=True),
            torch.empty((self.largest, model.config.top_k), dtype=getattr(torch, s.index_dtype), pin_memory=True),
        )
        self.done = torch.cuda.Event()
        # torch creates the CUDA event at its first record; the bound steps take its handle.
        self.done.record(torch.cuda.current_stream())
        self._views: dict[int, tuple] = {}
        self._arrays: tuple = ()

    def _views_for(self, rows: int) -> tuple:
        views = self._views.get(rows)
        if views is None:
            host = tuple(None if h is None else h[:rows] for h in self.host_out)
            step = self.runner.from_host(self.staging[:rows], host, self.done)
            views = (self.staging[:rows].numpy(), step, tuple(None if h is None else h.numpy() for h in host))
            if len(self._views) < VIEW_CACHE_ENTRIES:
                self._views[rows] = views
        return views

    def launch(self, parts: Sequence[np.ndarray]) -> None:
        rows = sum(len(part) for part in parts)
        if rows > self.largest:
            raise ValueError(f"a batch of {rows} rows passes the largest bucket, {self.largest}")
        staged, step, self._arrays = self._views_for(rows)
        # One call for all the parts (a copy per part cost about 1 µs more each).
        np.concatenate(parts, out=staged, casting="same_kind")
        step(self.bias)

    def ready(self) -> bool:
        return self.done.query()

    def collect(self) -> tuple:
        self.done.synchronize()
        # The pinned buffers take the next batch: the caller gets its own copy.
        return tuple(None if a is None else a.copy() for a in self._arrays)


class ServedModel:
    """A preset with its bias and backend; ``compute(parts)`` routes one batch, or ``launch`` starts it and
    ``collect`` takes its outputs (one batch at a time)."""

    def __init__(self, settings: ModelSettings):
        if settings.backend not in BACKENDS:
            raise ValueError(f"backend={settings.backend!r} is unknown: allowed {', '.join(BACKENDS)}")
        if settings.index_dtype not in ("int64", "int32"):
            raise ValueError(f"index_dtype={settings.index_dtype!r} is not supported: allowed int64, int32")
        self.settings = settings
        self.name = settings.preset
        self.config: RoutingConfig = get_config(settings.preset)
        if settings.bias_file is not None:
            self.bias = load_bias(settings.bias_file, self.config.num_experts)
            self.bias_source = f"file:{settings.bias_file.name}"
        else:
            self.bias = seeded_bias(self.config.num_experts, settings.bias_seed)
            self.bias_source = f"seed:{settings.bias_seed}"
        self.bias_sha256 = bias_digest(self.bias)
        self.table = BucketTable(bucket_list(settings.bucket_policy, settings.max_bucket))
        self.outputs = {"topk_values": "FP32", "topk_indices": "INT64" if settings.index_dtype == "int64" else "INT32"}
        if settings.with_scores:
            self.outputs["scores"] = "FP32"
        self._backend = _GpuBackend(self) if settings.backend == "gpu" else _CpuBackend(self)
        # Load the library and touch the path now, so the first requests do not pay for it.
        self.compute([np.zeros((1, self.config.num_experts), dtype=np.float32)])

    @property
    def inline_rows(self) -> int:
        """Batches up to this many rows are computed on the event loop, where they take less time than the hand-off
        to the worker thread and back. On the CPU that is a few rows (the hand-off costs about 50 µs). On the GPU
        the copies, the replay and the wait for them take 28 µs for one row and 60 µs for 256 on the H200 host,
        against 62 µs for the hand-off and back (with the hand-offs and a second wait, a T=1 request took 0.56 ms
        there, against 0.15 ms for the bare endpoint). The event loop polls for the device's outputs, reading and
        answering other requests meanwhile; larger batches go to the worker, as does the copy of their logits
        into pinned memory."""
        return INLINE_ROWS[self.settings.backend]

    def padded_rows(self, rows: int) -> int:
        """Rows the backend computes for a batch of ``rows``: its bucket on the GPU, exactly ``rows`` on the CPU."""
        if self.settings.backend == "cpu":
            return rows
        return sum(chunk.bucket for chunk in self.table.chunks(rows))

    def launch(self, parts: Sequence[np.ndarray]) -> None:
        """Start computing the rows of ``parts`` (the logits of a batch's requests, in order); one batch at a time:
        ``collect()`` it before launching the next."""
        self._backend.launch(parts)

    def ready(self) -> bool:
        """Whether ``collect()`` would return without waiting."""
        return self._backend.ready()

    def collect(self) -> dict[str, np.ndarray]:
        """The outputs of the batch launched last, owned by the caller."""
        scores, values, ids = self._backend.collect()
        out = {"topk_values": values, "topk_indices": ids}
        if scores is not None:
            out["scores"] = scores
        return out

    def compute(self, parts: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """``launch`` then ``collect``, waiting for the outputs."""
        self.launch(parts)
        return self.collect()

    def empty_outputs(self) -> dict[str, np.ndarray]:
        """The answer to a request of no tokens (DESIGN.md, rule 8: empty outputs, nothing launched)."""
        widths = {
            "topk_values": self.config.top_k,
            "topk_indices": self.config.top_k,
            "scores": self.config.num_experts,
        }
        dtypes = {"topk_values": np.float32, "topk_indices": self.settings.index_dtype, "scores": np.float32}
        return {name: np.empty((0, widths[name]), dtype=dtypes[name]) for name in self.outputs}

    def metadata(self, max_tokens: int) -> dict:
        e = self.config.num_experts
        return {
            "name": self.name,
            "versions": [MODEL_VERSION],
            "platform": f"fusedgate_{self.settings.backend}",
            "inputs": [{"name": "gating_output", "datatype": "FP32", "shape": [-1, e]}],
            "outputs": [
                {"name": name, "datatype": datatype, "shape": [-1, e if name == "scores" else self.config.top_k]}
                for name, datatype in self.outputs.items()
            ],
            "parameters": {
                "input_datatypes": "FP32 (JSON or binary), FP16 and BF16 (binary only)",
                "bias_source": self.bias_source,
                "bias_sha256": self.bias_sha256,
                "max_tokens": max_tokens,
                "buckets": ",".join(str(b) for b in self.table.buckets),
                **dataclasses.asdict(self.config),
            },
        }
