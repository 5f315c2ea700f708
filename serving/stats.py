"""Inference statistics as Triton's statistics extension reports them: per model, counts
and cumulative nanoseconds since the server started (`GET /v2/models/NAME/stats`)."""

from __future__ import annotations

import threading
import time
from typing import Any


class InferenceStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # the engine thread and the event loop both report
        self.success = [0, 0]  # requests answered, and their time end to end
        self.fail = [0, 0]
        self.compute = [0, 0]  # session runs (batches), and their time
        self.inferences = 0  # texts answered
        self.last_inference_ms = 0

    def succeeded(self, texts: int, ns: int) -> None:
        with self._lock:
            self.success[0] += 1
            self.success[1] += ns
            self.inferences += texts
            self.last_inference_ms = int(time.time() * 1000)

    def failed(self, ns: int) -> None:
        with self._lock:
            self.fail[0] += 1
            self.fail[1] += ns

    def executed(self, ns: int) -> None:
        with self._lock:
            self.compute[0] += 1
            self.compute[1] += ns

    def triton(self, name: str, version: str) -> dict[str, Any]:
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inferences,
                "execution_count": self.compute[0],
                "inference_stats": {
                    "success": {"count": self.success[0], "ns": self.success[1]},
                    "fail": {"count": self.fail[0], "ns": self.fail[1]},
                    "compute_infer": {"count": self.compute[0], "ns": self.compute[1]},
                },
            }
