"""The capacity and request-cost runs are benchmarks, not tests: here only their bookkeeping (server CPU time per
request, the verdicts against the targets) and that the request-cost run has every request answered."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("fastapi")

from graphs.serve.capacity import Measured, _combined, _verdict, process_cpu_seconds  # noqa: E402


def test_a_process_cpu_time_agrees_with_the_process_own_count():
    before, own = process_cpu_seconds(os.getpid()), time.process_time()
    while time.process_time() - own < 0.2:
        pass
    # The kernel counts in clock ticks (10 ms where SC_CLK_TCK is 100).
    assert process_cpu_seconds(os.getpid()) - before == pytest.approx(time.process_time() - own, abs=0.05)


def test_slices_add_their_requests_and_cpu_time():
    slices = [Measured(1000.0, 1.0, 2.0, 0, 2000, 0.3), Measured(3000.0, 2.0, 4.0, 1, 6000, 0.5)]
    combined = _combined(slices)
    assert combined.requests == 8000 and combined.non_200 == 1
    assert combined.cpu_us_per_request == pytest.approx(100.0)
    assert combined.requests_per_s == 2000.0


def test_verdicts_name_each_target():
    bare, served = Measured(1000.0, 1.0, 2.0, 0, 1), Measured(900.0, 2.5, 6.0, 0, 1)
    assert _verdict(1, bare, served) == "p50 2.50x (misses <= 2.0x)"
    assert _verdict(8, bare, served) == "meets >= 0.8x"
    assert _verdict(64, bare, served) == "meets >= 0.8x; p99 2.40x p50 (meets <= 3.0x)"
    assert "p99 3.20x p50 (misses" in _verdict(64, bare, Measured(700.0, 2.5, 8.0, 0, 1))


def test_the_request_cost_run_answers_every_request_of_both_applications():
    import asyncio

    from graphs.serve.requestcost import measure

    lines = asyncio.run(measure("cpu", ["binary T=1", "JSON T=1"], [1, 3], requests=6, rounds=1))
    assert len(lines) == 2 + 4
    for line in lines[2:]:
        bare, served = (float(cell) for cell in line.strip("| ").split(" | ")[2:4])
        assert bare > 0 and served > 0


def test_the_stage_timings_time_every_stage_of_requests_under_load(tmp_path):
    """The timed child serves the capacity run's body; every stage is timed, once a request or once a batch."""
    from graphs.serve import stages

    out = tmp_path / "stages.md"
    stages.main(["--seconds", "0.5", "--concurrency", "1", "--bodies", "JSON T=1", "--out", str(out)])
    cells = [line.strip("| ").split(" | ") for line in out.read_text().splitlines() if line.startswith("| ")]
    rows = dict(cells[1:])
    for name, per_batch in stages.STAGES:
        value = rows[f"{name} µs{' per batch' if per_batch else ''}"]
        assert float(value) > 0, (name, value)
    assert float(rows["server CPU µs per request"]) > 0
    assert rows["requests per batch"] == "1.0"
