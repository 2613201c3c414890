"""Batch buckets: the token counts at which graphs are captured, as inference engines choose them.

A running batch of T tokens is padded up to the smallest bucket >= T; a batch larger than the largest bucket
is served in chunks of the largest bucket (and one smaller bucket for the remainder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_SIZE = 512
POW2_MAX_SIZE = 65536


def _fastdeploy(max_size: int) -> list[int]:
    return [1, 2, 4, *range(8, 129, 8), *range(144, 257, 16), *range(288, 1025, 32)]


def _vllm(max_size: int) -> list[int]:
    return [1, 2, 4, *range(8, 249, 8), *range(256, max_size + 1, 16)]


def _sglang(max_size: int) -> list[int]:
    return [1, 2, 4, 8, 12, *range(16, 257, 8), *range(272, 497, 16), *range(512, max_size + 1, 32)]


def _pow2(max_size: int) -> list[int]:
    return [1 << i for i in range(max_size.bit_length()) if 1 << i <= max_size]


POLICIES = {"fastdeploy": _fastdeploy, "vllm": _vllm, "sglang": _sglang, "pow2": _pow2}


def bucket_list(policy: str | Sequence[int], max_size: int | None = None) -> tuple[int, ...]:
    """The buckets of a named policy up to ``max_size`` (default 512; 65536 for ``pow2``), or an explicit list."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"bucket policy {policy!r} is unknown: allowed {', '.join(POLICIES)} or a list of sizes")
        limit = max_size if max_size is not None else (POW2_MAX_SIZE if policy == "pow2" else DEFAULT_MAX_SIZE)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_size={limit!r} is out of range: allowed an int >= 1")
        buckets = [b for b in POLICIES[policy](limit) if b <= limit]
    else:
        if max_size is not None:
            raise ValueError("max_size applies to a named policy only; an explicit list is used as given")
        buckets = list(policy)
    if not buckets:
        raise ValueError("buckets must not be empty")
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1:
            raise ValueError(f"bucket {b!r} is invalid: buckets must be positive ints")
    if any(a >= b for a, b in zip(buckets, buckets[1:], strict=False)):
        raise ValueError(f"buckets must be sorted ascending without repeats, got {buckets}")
    return tuple(int(b) for b in buckets)


@dataclass(frozen=True)
class Chunk:
    start: int
    size: int
    bucket: int


class BucketTable:
    """Constant-time lookup from a token count to its bucket, through a table precomputed at start."""

    def __init__(self, buckets: Sequence[int]):
        self.buckets = bucket_list(buckets)
        self.largest = self.buckets[-1]
        table = np.zeros(self.largest + 1, dtype=np.int64)
        previous = 0
        for b in self.buckets:
            table[previous + 1 : b + 1] = b
            previous = b
        self._table = table

    def bucket_for(self, num_tokens: int) -> int:
        """The smallest bucket >= ``num_tokens`` (1 <= num_tokens <= the largest bucket)."""
        if not 1 <= num_tokens <= self.largest:
            raise ValueError(f"num_tokens={num_tokens} is out of range: allowed 1 <= num_tokens <= {self.largest}")
        return int(self._table[num_tokens])

    def chunks(self, num_tokens: int) -> list[Chunk]:
        """How a batch is served: whole chunks of the largest bucket, then the remainder in its own bucket."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} is out of range: allowed >= 0")
        out, start = [], 0
        while num_tokens - start > 0:
            size = min(self.largest, num_tokens - start)
            out.append(Chunk(start, size, self.bucket_for(size)))
            start += size
        return out
