"""Micro-batching: requests wait up to `max_wait_ms` to share one session run of at most
`max_batch_size` texts. Each caller gets exactly its own answers back, in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """The queue is full: the caller should retry later (503 + Retry-After)."""


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
        loop = asyncio.get_running_loop()
        while True:
            if self._carry is not None:
                batch, self._carry = [self._carry], None
            else:
                batch = await self._gather()
            texts = [t for request in batch for t in request.texts]
            self._on_batch(len(texts), self.queue.qsize())
            self._busy = True
            try:
                results = await loop.run_in_executor(self._executor, self._predict, texts)
            except Exception as err:  # the engine failed: every waiting caller hears why
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(err)
                continue
            finally:
                self._busy = False
            start = 0
            for request in batch:
                end = start + len(request.texts)
                if not request.future.done():
                    request.future.set_result(results[start:end])
                start = end

    async def drain(self, timeout: float = 30) -> None:
        """Let queued requests finish (graceful shutdown), then stop the worker."""
        deadline = time.perf_counter() + timeout

        def pending() -> bool:
            return not self.queue.empty() or self._carry is not None or self._busy

        while pending() and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # callers whose answers just arrived resume
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=True)
