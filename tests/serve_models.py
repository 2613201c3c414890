"""Served models the service tests share."""

from __future__ import annotations

import threading

from graphs.serve.models import ServedModel


class GatedModel(ServedModel):
    """Computes only once ``gate`` is open, so a test can hold a batch while other requests queue."""

    gate: threading.Event | None = None
    # Held at the gate on the worker thread, never on the event loop.
    inline_rows = 0

    def compute(self, logits):
        if self.gate is not None:
            self.gate.wait(30)
        return super().compute(logits)
