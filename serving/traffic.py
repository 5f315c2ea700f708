"""The traffic log: every prediction as one JSON line, for the drift monitor.

Files are `traffic-<UTC hour>.jsonl` under the configured folder, with a numeric suffix
when one grows past `rotate_mb`; with `store_text: false` only the text's SHA-256 is kept.
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class TrafficLog:
    def __init__(self, directory: Path, store_text: bool, rotate_mb: float) -> None:
        self.directory = directory
        self.store_text = store_text
        self.rotate_bytes = int(rotate_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._handle: Any = None
        self._hour = ""
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, now: datetime) -> Path:
        stem = f"traffic-{now:%Y%m%dT%H}"
        path, part = self.directory / f"{stem}.jsonl", 0
        while path.exists() and path.stat().st_size >= self.rotate_bytes:
            part += 1
            path = self.directory / f"{stem}.{part}.jsonl"
        return path

    def append(
        self,
        request_id: str,
        texts: list[str],
        predictions: list[Any],
        latency_ms: float,
    ) -> None:
        now = datetime.now(UTC)
        lines = []
        for text, prediction in zip(texts, predictions, strict=True):
            record: dict[str, Any] = {
                "timestamp": now.isoformat(timespec="milliseconds"),
                "request_id": request_id,
                "label": prediction.label,
                "score": round(prediction.score, 6),
                "latency_ms": round(latency_ms, 3),
                "model_version": prediction.model_version,
            }
            if self.store_text:
                record["text"] = text
            else:
                record["text_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
            lines.append(json.dumps(record, ensure_ascii=False))
        with self._lock:
            handle = self._handle_for(now)
            handle.write("\n".join(lines) + "\n")
            handle.flush()

    def _handle_for(self, now: datetime) -> Any:
        """The open file for this hour, reopened when the hour turns or it grows too big;
        opening a file per request was a measurable share of the server's time."""
        hour = now.strftime("%Y%m%dT%H")
        if self._handle is None or self._hour != hour or self._handle.tell() >= self.rotate_bytes:
            if self._handle is not None:
                self._handle.close()
            self._handle = self._path(now).open("a", encoding="utf-8")
            self._hour = hour
        return self._handle
