"""Progress of a long command on stderr: one rewritten line on a terminal, whole lines at a modest rate in a log.

A log cannot show ``\\r`` rewrites (they pile up into one enormous line), so when the stream is not a terminal
a line is written at most every ``interval`` seconds, plus the first and the last step.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call it once per step with what the step does; ``close()`` ends the terminal line. Steps past the planned
    ``total`` (refinement points a sweep adds where two paths cross) show as ``[done/total+]``."""

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 10.0):
        self.total, self.done = max(total, 1), 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_line = -float("inf")

    def __call__(self, what: str) -> None:
        self.done += 1
        text = f"[{self.done}/{self.total}{'+' if self.done > self.total else ''}] {what}"
        if self.terminal:
            print(f"\r{text[:78]:<78}", end="", file=self.stream, flush=True)
            return
        now = time.monotonic()
        if self.done in (1, self.total) or now - self._last_line >= self.interval:
            print(text, file=self.stream, flush=True)
            self._last_line = now

    def close(self) -> None:
        if self.terminal:
            print(file=self.stream, flush=True)
