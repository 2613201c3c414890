"""The bench's bandwidth-floor arithmetic and cold-L2 input sets, on the CPU (no GPU property is read)."""

from __future__ import annotations

import pytest

from harness import bench, timing
from harness.timing import Timing


@pytest.mark.parametrize(
    "tokens,experts,top_k,elem,scores,index_bytes,expected",
    [
        # logits read + (weight + id) per choice written + float32 scores row written
        (1, 256, 8, 2, True, 8, 256 * 2 + 8 * 12 + 256 * 4),
        (1, 256, 8, 2, False, 8, 256 * 2 + 8 * 12),
        (1000, 384, 8, 4, True, 4, 1000 * (384 * 4 + 8 * 8 + 384 * 4)),
        (0, 256, 8, 2, True, 8, 0),
    ],
)
def test_floor_bytes(tokens, experts, top_k, elem, scores, index_bytes, expected):
    assert bench.floor_bytes(tokens, experts, top_k, elem, scores, index_bytes) == expected


def test_floor_us_is_bytes_over_bandwidth_in_microseconds():
    # 65536 deepseek_v3 tokens in bfloat16 with scores, at 4 TB/s (read + write).
    nbytes = 65536 * (256 * 2 + 8 * 12 + 256 * 4)
    assert bench.floor_us(65536, 256, 8, 2, True, 4e12) == pytest.approx(nbytes / 4e12 * 1e6, rel=1e-12)
    assert bench.floor_us(65536, 256, 8, 2, True, 4e12) == pytest.approx(26.738688, rel=1e-9)


def test_floor_fraction_row_swaps_the_quartile_ends():
    latency = {"path": "fused", "metric": "latency", "unit": "us", "p25": "8", "p50": "10", "p75": "16"}
    row = bench.floor_fraction_row(latency, 4.0, Timing(p25=8.0, p50=10.0, p75=16.0, n=30))
    assert row["metric"] == "floor_fraction" and row["unit"] == "fraction" and row["path"] == "fused"
    # The slowest quartile gives the smallest fraction.
    assert (row["p25"], row["p50"], row["p75"]) == ("0.25", "0.4", "0.5")
    assert latency["metric"] == "latency"


@pytest.mark.parametrize(
    "per_set,expected",
    [(1 << 20, 20), (60 << 20, 2), (40 << 20, 3), (25 << 20, 4), (1 << 30, 2)],
)
def test_cold_input_sets_total_twice_the_l2(monkeypatch, per_set, expected):
    monkeypatch.setattr(timing, "l2_bytes", lambda: 50 << 20)
    assert timing.cold_input_sets(per_set) == expected
