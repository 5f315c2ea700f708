"""The traffic log: every prediction as one JSON line, for the drift monitor.

Files are `traffic-<UTC hour>.jsonl` under the configured folder, with a numeric suffix
when one grows past `rotate_mb`; with `store_text: false` only the text's SHA-256 is kept.
With `redact_pii` (the default) personal data in a text — phone, ID and card numbers,
e-mail and IP addresses (lmops/pii.py) — is replaced by a typed placeholder before the
text touches disk; each record counts what was replaced.

The log must never fail a prediction. Requests only put their records on a bounded queue;
one writer thread appends them. A write that fails (folder missing or replaced by a file,
disk full) is counted, logged at most once a minute, and cut back to the last whole line;
the next write tries again, recreating the folder and reopening a file that was unlinked
under the server, so logging resumes by itself once the disk allows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lmops import pii
from lmops.artifacts import LogKind, ShadowRecord, TrafficRecord, traffic_file_name

log = logging.getLogger(__name__)

# Records waiting for the writer; beyond this they are dropped (and counted), never waited on.
MAX_PENDING = 10_000
# At most one log line per this many seconds while writes keep failing.
ERROR_LOG_INTERVAL_S = 60.0
_STOP = None


class TrafficLog:
    kind: LogKind = "traffic"

    def __init__(
        self,
        directory: Path,
        store_text: bool,
        rotate_mb: float,
        on_error: Callable[[str], None] | None = None,
        max_pending: int = MAX_PENDING,
        redact_pii: bool = True,
    ) -> None:
        """`on_error(kind)` hears of every request whose records were lost: kind "write"
        (the disk refused them) or "dropped" (the writer was too far behind)."""
        self.directory = directory
        self.store_text = store_text
        self.redact_pii = redact_pii
        self.rotate_bytes = int(rotate_mb * 1024 * 1024)
        self._on_error = on_error or (lambda kind: None)
        self._pending: queue.Queue[bytes | None] = queue.Queue(maxsize=max_pending)
        self._fd: int | None = None
        self._hour = ""
        # Why the last write failed; None while logging works.
        self.degraded: str | None = None
        self.errors = 0
        self._last_error_log = -ERROR_LOG_INTERVAL_S
        self._unlogged_errors = 0
        self._error_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="traffic-log", daemon=True)
        self._writer.start()

    def append(
        self,
        request_id: str,
        texts: list[str],
        predictions: list[Any],
        latency_ms: float,
    ) -> None:
        """Queue one request's records; never blocks and never raises. The records are
        built and encoded by the writer thread, off the request's path."""
        self._enqueue((datetime.now(UTC), request_id, texts, predictions, latency_ms))

    def _enqueue(self, item: Any) -> None:
        try:
            self._pending.put_nowait(item)
        except queue.Full:
            self._failed("dropped", f"{MAX_PENDING:,} records already wait for the disk")

    def _encoded(self, request: tuple[Any, ...]) -> bytes:
        """One request's records as log lines (lmops/artifacts.py TrafficRecord)."""
        when, request_id, texts, predictions, latency_ms = request
        lines = []
        for text, prediction in zip(texts, predictions, strict=True):
            stored, redacted = (
                pii.redact(text) if self.store_text and self.redact_pii else (text, None)
            )
            lines.append(
                TrafficRecord(
                    timestamp=when,
                    request_id=request_id,
                    label=prediction.label,
                    score=round(prediction.score, 6),
                    latency_ms=round(latency_ms, 3),
                    model_version=prediction.model_version,
                    text=stored if self.store_text else None,
                    text_sha256=None
                    if self.store_text
                    else hashlib.sha256(text.encode("utf-8")).hexdigest(),
                    pii_redacted=dict(redacted) if redacted else None,
                ).line()
            )
        return ("\n".join(lines) + "\n").encode("utf-8")

    def flush(self) -> None:
        """Wait until every queued record was written or counted as lost."""
        self._pending.join()

    def close(self, timeout: float = 10) -> None:
        """Write what is queued, then stop the writer (at shutdown)."""
        self._pending.put(_STOP)
        self._writer.join(timeout)

    def _write_loop(self) -> None:
        while True:
            request = self._pending.get()
            if request is _STOP:
                self._close_file()
                self._pending.task_done()
                return
            requests = [request]
            while len(requests) < 256:  # what queued meanwhile goes out in the same write
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._pending.task_done()
                    self._pending.put(_STOP)
                    break
                requests.append(more)
            try:
                self._write(b"".join(self._encoded(request) for request in requests))
            except Exception as err:  # the writer thread must outlive any failure
                self._failed("write", f"{type(err).__name__}: {err}", requests=len(requests))
            finally:
                for _ in requests:
                    self._pending.task_done()

    def _write(self, data: bytes) -> None:
        fd = self._file(datetime.now(UTC))
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write: {written} of {len(data)} bytes (disk full?)")
        except OSError:
            # No partial lines: cut the file back to where this write began.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            self._close_file()
            raise
        if self.degraded is not None:
            log.warning("traffic log: writing to %s again (%s)", self.directory, self.degraded)
            self.degraded = None

    def _file(self, now: datetime) -> int:
        """The open file for this hour: reopened when the hour turns, when it grows past
        rotate_mb, and when it was unlinked (its folder deleted) under the server."""
        hour = traffic_file_name(now, kind=self.kind)
        if self._fd is not None:
            stat = os.fstat(self._fd)
            if self._hour != hour or stat.st_size >= self.rotate_bytes or stat.st_nlink == 0:
                self._close_file()
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(
                self._path(now), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            self._hour = hour
        return self._fd

    def _path(self, now: datetime) -> Path:
        path, part = self.directory / traffic_file_name(now, kind=self.kind), 0
        while path.exists() and path.stat().st_size >= self.rotate_bytes:
            part += 1
            path = self.directory / traffic_file_name(now, part, self.kind)
        return path

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _failed(self, kind: str, reason: str, requests: int = 1) -> None:
        for _ in range(requests):
            self._on_error(kind)
        with self._error_lock:  # the writer and the event loop both report
            self.degraded = reason
            self.errors += requests
            self._unlogged_errors += requests
            now = time.monotonic()
            if now - self._last_error_log < ERROR_LOG_INTERVAL_S:
                return
            unlogged, self._last_error_log, self._unlogged_errors = self._unlogged_errors, now, 0
        log.error(
            "traffic log: %d request(s) not logged to %s: %s (predictions are still answered; "
            "next report in %.0f s at most)",
            unlogged,
            self.directory,
            reason,
            ERROR_LOG_INTERVAL_S,
        )


@dataclass
class ShadowedRequest:
    """One request prod answered and the challenger scored, as the shadow hands it over:
    the records are built by the log's writer thread, so that the shadow thread holds the
    GIL as briefly as it can (the event loop needs it)."""

    timestamp: datetime
    request_id: str
    answers: list[Any]  # prod's Predictions
    latency_ms: float
    challenger_version: str
    challenger_labels: list[str]
    probabilities: np.ndarray
    challenger_ms: float

    def records(self) -> list[ShadowRecord]:
        return [
            ShadowRecord(
                timestamp=self.timestamp,
                request_id=self.request_id,
                index=index,
                prod_version=answer.model_version,
                prod_label=answer.label,
                prod_score=round(answer.score, 6),
                prod_latency_ms=round(self.latency_ms, 3),
                challenger_version=self.challenger_version,
                challenger_label=self.challenger_labels[int(row.argmax())],
                challenger_score=round(float(row.max()), 6),
                challenger_latency_ms=round(self.challenger_ms, 3),
            )
            for index, (answer, row) in enumerate(
                zip(self.answers, self.probabilities, strict=True)
            )
        ]


class ShadowLog(TrafficLog):
    """`shadow-<UTC hour>.jsonl` beside the traffic log: the challenger's scores beside
    prod's (lmops/artifacts.py ShadowRecord), written the same way, failing the same way."""

    kind: LogKind = "shadow"

    def __init__(self, directory: Path, rotate_mb: float, on_error: Callable[[str], None]) -> None:
        super().__init__(directory, False, rotate_mb, on_error, redact_pii=False)

    def append_shadowed(self, request: ShadowedRequest) -> None:
        """Queue one shadowed request; never blocks and never raises."""
        self._enqueue(request)

    def _encoded(self, request: Any) -> bytes:
        return ("\n".join(record.line() for record in request.records()) + "\n").encode("utf-8")
