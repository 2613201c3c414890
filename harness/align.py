"""The alignment matrix: every available path x preset x dtype x T x input distribution against the reference.

Writes long-format rows (DESIGN.md's CSV columns; the statistic in ``p50``, the token count in ``n``) and a
markdown table, and reports whether everything passed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from harness.inputs import DISTRIBUTIONS, generate_input
from harness.paths import PATHS
from op.configs import ALL_CONFIGS
from op.testing import compare_routing

METRICS = (
    ("mismatches", "count"),
    ("excused_near_ties", "count"),
    ("invalid_ids", "count"),
    ("weight_failures", "count"),
    ("scores_failures", "count"),
    ("max_abs_weight_error", "abs"),
    ("max_rel_weight_error", "rel"),
)


@dataclass
class AlignResult:
    rows: list[dict]
    table: str
    failures: list[str]
    skipped: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.failures


def run_alignment(
    paths: Sequence[str],
    presets: Sequence[str],
    dtypes: Sequence[str],
    tokens: Sequence[int],
    distributions: Sequence[str] = DISTRIBUTIONS,
    seed: int = 0,
    card: str = "",
    stamp: str = "",
    commit: str = "",
    progress: Callable[[str], None] | None = None,
) -> AlignResult:
    rows, lines, failures, skipped = [], [], [], {}
    runnable = []
    for name in paths:
        if name not in PATHS:
            raise ValueError(f"path {name!r} is unknown: allowed {', '.join(PATHS)}")
        reason = PATHS[name].unavailable()
        if reason:
            skipped[name] = reason
        else:
            runnable.append(PATHS[name])
    lines.append(
        "| path | preset | dtype | T | distribution | mismatches | excused | invalid ids | max abs err "
        "| max rel err | ok |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        config = ALL_CONFIGS[preset]
        for dtype in dtypes:
            for num_tokens in tokens:
                for distribution in distributions:
                    x, bias = generate_input(config, num_tokens, dtype, seed, distribution)
                    for path in runnable:
                        if progress:
                            progress(f"align {path.name} {preset} {dtype} T={num_tokens} {distribution}")
                        result = compare_routing(path.run(x, bias, config), x, bias, config)
                        for metric, unit in METRICS:
                            rows.append(
                                {
                                    "path": path.name,
                                    "preset": preset,
                                    "E": config.num_experts,
                                    "dtype": dtype,
                                    "T": num_tokens,
                                    "scores": "scores",
                                    "l2": "",
                                    "launch": "",
                                    "distribution": distribution,
                                    "metric": metric,
                                    "unit": unit,
                                    "p25": "",
                                    "p50": getattr(result, metric),
                                    "p75": "",
                                    "n": num_tokens,
                                    "card": card,
                                    "timestamp": stamp,
                                    "commit": commit,
                                }
                            )
                        if not result.ok:
                            failures.append(
                                f"{path.name} {preset} {dtype} T={num_tokens} {distribution}: {result.first_failure}"
                            )
                        lines.append(
                            f"| {path.name} | {preset} | {dtype} | {num_tokens} | {distribution} | {result.mismatches} "
                            f"| {result.excused_near_ties} | {result.invalid_ids} | {result.max_abs_weight_error:.2e} "
                            f"| {result.max_rel_weight_error:.2e} | {'yes' if result.ok else 'NO'} |"
                        )
    return AlignResult(rows, "\n".join(lines), failures, skipped)
