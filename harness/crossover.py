"""Where one path stops beating another: bootstrap bands on the speedup and conservative crossover detection.

The speedup at a token count is ``median(baseline) / median(candidate)`` (above 1: the candidate is faster).
Its 95% band is a percentile bootstrap over the repeats of both paths. A crossover is reported only between
two token counts whose bands both exclude 1.0, on opposite sides; points whose band holds 1.0 in between are
skipped over, and the crossing is placed by log-linear interpolation of the median speedup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_METHOD = "percentile bootstrap of the ratio of medians"


@dataclass(frozen=True)
class Band:
    tokens: int
    low: float
    median: float
    high: float
    n: int

    @property
    def side(self) -> int:
        """+1: candidate faster beyond doubt; -1: slower beyond doubt; 0: the band holds 1.0."""
        return 1 if self.low > 1.0 else -1 if self.high < 1.0 else 0


@dataclass(frozen=True)
class Crossover:
    low_tokens: int
    high_tokens: int
    at_tokens: float
    direction: str  # "candidate stops winning" or "candidate starts winning"

    @property
    def label(self) -> str:
        """Where it crosses and the band of token counts it lies in, for a plot."""
        return f"T≈{self.at_tokens:.0f} [{self.low_tokens}, {self.high_tokens}]"


def speedup_band(
    baseline: Sequence[float], candidate: Sequence[float], tokens: int, resamples: int = 2000, seed: int = 0
) -> Band:
    base = np.asarray(baseline, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if base.size == 0 or cand.size == 0:
        raise ValueError("speedup_band needs at least one sample of each path")
    rng = np.random.default_rng(seed)
    b = np.median(rng.choice(base, size=(resamples, base.size)), axis=1)
    c = np.median(rng.choice(cand, size=(resamples, cand.size)), axis=1)
    ratios = b / c
    return Band(
        tokens,
        float(np.percentile(ratios, 2.5)),
        float(np.median(base) / np.median(cand)),
        float(np.percentile(ratios, 97.5)),
        int(min(base.size, cand.size)),
    )


def find_crossovers(bands: Sequence[Band]) -> list[Crossover]:
    ordered = sorted(bands, key=lambda band: band.tokens)
    decided = [band for band in ordered if band.side != 0]
    found = []
    for left, right in zip(decided, decided[1:], strict=False):
        if left.side == right.side:
            continue
        # Between the two decided points, place the crossing where the median speedup passes 1.0.
        span = [band for band in ordered if left.tokens <= band.tokens <= right.tokens]
        at = float(right.tokens)
        for a, b in zip(span, span[1:], strict=False):
            if (a.median - 1.0) * (b.median - 1.0) <= 0 and a.median != b.median:
                frac = (1.0 - a.median) / (b.median - a.median)
                at = math.exp(math.log(a.tokens) + frac * (math.log(b.tokens) - math.log(a.tokens)))
                break
        direction = "candidate stops winning" if left.side > 0 else "candidate starts winning"
        found.append(Crossover(left.tokens, right.tokens, at, direction))
    return found


def describe(bands: Sequence[Band], candidate: str, baseline: str) -> str:
    """One line for a report: the crossovers, or their absence with the smallest speedup and where."""
    crossings = find_crossovers(bands)
    if crossings:
        return "; ".join(
            f"{c.direction} between T={c.low_tokens} and T={c.high_tokens} (about T={c.at_tokens:.0f})"
            for c in crossings
        )
    worst = min(bands, key=lambda band: band.median)
    return (
        f"no crossover in range: smallest {baseline}/{candidate} speedup {worst.median:.2f} "
        f"[{worst.low:.2f}, {worst.high:.2f}] at T={worst.tokens}"
    )


def refinement_points(bands: Sequence[Band]) -> list[int]:
    """Token counts to measure next: the geometric midpoint of each neighbour pair whose sides differ."""
    ordered = sorted(bands, key=lambda band: band.tokens)
    points = []
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.side != b.side and b.tokens - a.tokens > 1:
            mid = round(math.sqrt(a.tokens * b.tokens))
            if a.tokens < mid < b.tokens:
                points.append(mid)
    return points
