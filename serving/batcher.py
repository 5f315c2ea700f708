"""Micro-batching: requests wait up to `max_wait_ms` to share one session run of at most
`max_batch_size` texts. Each caller gets exactly its own answers back, in order.

One caller's bad text must not fail its batch-mates: when a batch fails, its texts are run
again one by one, each request gets its own answers, and a request holding a text that
fails alone (while the engine still answers a plain text) hears `TextRejected` naming it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# What a healthy engine always answers: the check that tells a poison text from a broken engine.
PLAIN_TEXT = "ok"


class Overloaded(Exception):
    """The queue is full: the caller should retry later (503 + Retry-After)."""


class TextRejected(Exception):
    """The engine fails on this text alone, and answers others (a 4xx for its caller)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"text {index} could not be processed by the model: {reason}")
        self.index, self.reason = index, reason


@dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self,
        predict: Callable[[list[str]], list[Any]],
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=max_queue)
        self._on_batch = on_batch or (lambda size, depth: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker: asyncio.Task | None = None
        self._carry: _Request | None = None
        self._busy = False

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run())

    async def submit(self, texts: list[str]) -> list[Any]:
        request = _Request(texts, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise Overloaded from None
        return await request.future

    async def _gather(self) -> list[_Request]:
        batch = [await self.queue.get()]
        size = len(batch[0].texts)
        deadline = time.perf_counter() + self.max_wait
        while size < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 and self.queue.empty():
                break
            try:
                request = (
                    self.queue.get_nowait()
                    if remaining <= 0
                    else await asyncio.wait_for(self.queue.get(), remaining)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if size + len(request.texts) > self.max_batch_size and size:
                # Too big to join: it leads the next batch instead.
                self._carry = request
                break
            batch.append(request)
            size += len(request.texts)
        return batch

    async def _run(self) -> None:
        while True:
            if self._carry is not None:
                batch, self._carry = [self._carry], None
            else:
                batch = await self._gather()
            self._busy = True
            try:
                await self._answer(batch)
            except Exception as err:  # the batcher must outlive anything a batch does
                log.exception("micro-batcher: a batch failed unexpectedly")
                self._settle(batch, err)
            finally:
                self._busy = False

    async def _answer(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        texts = [t for request in batch for t in request.texts]
        self._on_batch(len(texts), self.queue.qsize())
        try:
            results = await loop.run_in_executor(self._executor, self._predict, texts)
        except Exception as err:
            await self._isolate(batch, err)
            return
        start = 0
        for request in batch:
            end = start + len(request.texts)
            if not request.future.done():
                request.future.set_result(results[start:end])
            start = end

    async def _isolate(self, batch: list[_Request], batch_error: Exception) -> None:
        """Run a failed batch's texts one by one, so that only the callers whose texts fail
        alone hear of it; when a plain text fails too, the engine is broken, and every
        caller hears the original error."""
        loop = asyncio.get_running_loop()

        def alone(text: str) -> Any:
            try:
                return self._predict([text])[0]
            except Exception as err:
                return err

        answers = [
            [await loop.run_in_executor(self._executor, alone, t) for t in request.texts]
            for request in batch
        ]
        failed = any(isinstance(a, Exception) for texts in answers for a in texts)
        plain = await loop.run_in_executor(self._executor, alone, PLAIN_TEXT) if failed else None
        if isinstance(plain, Exception):
            log.error("micro-batcher: the engine fails on a plain text too: %s", batch_error)
            self._settle(batch, batch_error)
            return
        for request, request_answers in zip(batch, answers, strict=True):
            if request.future.done():
                continue
            bad = next((i for i, a in enumerate(request_answers) if isinstance(a, Exception)), None)
            if bad is None:
                request.future.set_result(request_answers)
            else:
                why = request_answers[bad]
                request.future.set_exception(TextRejected(bad, f"{type(why).__name__}: {why}"))

    @staticmethod
    def _settle(batch: list[_Request], err: Exception) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(err)

    def busy(self) -> bool:
        """A batch is running or a request waits (read from any thread: a snapshot)."""
        return self._busy or self._carry is not None or not self.queue.empty()

    async def drain(self, timeout: float = 30) -> None:
        """Let queued requests finish (graceful shutdown), then stop the worker."""
        deadline = time.perf_counter() + timeout

        while self.busy() and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # callers whose answers just arrived resume
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=True)
