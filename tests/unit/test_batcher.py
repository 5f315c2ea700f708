"""The micro-batcher's queue logic, with a slow predict function standing in for a busy
engine so that batching and overload are deterministic."""

from __future__ import annotations

import asyncio
import time

import pytest

from lmops.serving.batcher import MicroBatcher, Overloaded, TextRejected


def _slow_echo(calls: list[int]):
    def predict(texts: list[str]) -> list[str]:
        calls.append(len(texts))
        time.sleep(0.05)
        return [t.upper() for t in texts]

    return predict


def test_requests_share_batches_and_get_their_own_answers() -> None:
    calls: list[int] = []

    async def scenario() -> list[list[str]]:
        batcher = MicroBatcher(_slow_echo(calls), max_batch_size=8, max_wait_ms=20, max_queue=100)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit([f"a{i}", f"b{i}"]) for i in range(10)))
        await batcher.drain()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [[f"A{i}", f"B{i}"] for i in range(10)]
    assert sum(calls) == 20 and max(calls) <= 8 and len(calls) < 10


def test_a_full_queue_is_overloaded() -> None:
    async def scenario() -> None:
        batcher = MicroBatcher(_slow_echo([]), max_batch_size=1, max_wait_ms=0, max_queue=2)
        batcher.start()
        first = asyncio.create_task(batcher.submit(["x"]))
        await asyncio.sleep(0.01)  # the worker is busy with it for 50 ms
        waiting = [first] + [asyncio.create_task(batcher.submit(["x"])) for _ in range(2)]
        await asyncio.sleep(0)  # both wait in the queue, which is now full
        with pytest.raises(Overloaded):
            await batcher.submit(["y"])
        assert await asyncio.gather(*waiting) == [["X"]] * 3
        await batcher.drain()

    asyncio.run(scenario())


def test_drain_answers_everything_queued_before_stopping() -> None:
    async def scenario() -> list[list[str]]:
        batcher = MicroBatcher(_slow_echo([]), max_batch_size=2, max_wait_ms=0, max_queue=50)
        batcher.start()
        pending = [asyncio.create_task(batcher.submit([str(i)])) for i in range(10)]
        await asyncio.sleep(0)
        await batcher.drain()
        return [task.result() for task in pending]

    assert asyncio.run(scenario()) == [[str(i)] for i in range(10)]


def _fails_on(poison: str, broken: list[bool]):
    """An engine that cannot take `poison` (in any batch), and fails on everything while
    `broken[0]` is set."""

    def predict(texts: list[str]) -> list[str]:
        if broken[0] or poison in texts:
            raise ValueError("cannot encode")
        return [t.upper() for t in texts]

    return predict


def test_a_poison_text_fails_only_its_own_request() -> None:
    async def scenario() -> list[object]:
        batcher = MicroBatcher(
            _fails_on("bad", [False]), max_batch_size=16, max_wait_ms=20, max_queue=100
        )
        batcher.start()
        answers = await asyncio.gather(
            batcher.submit(["a", "b"]),
            batcher.submit(["c", "bad", "d"]),
            batcher.submit(["e"]),
            return_exceptions=True,
        )
        after = await batcher.submit(["f"])  # the batcher lives on
        await batcher.drain()
        return [*answers, after]

    first, poisoned, third, after = asyncio.run(scenario())
    assert first == ["A", "B"] and third == ["E"] and after == ["F"]
    assert isinstance(poisoned, TextRejected) and poisoned.index == 1
    assert "text 1" in str(poisoned) and "cannot encode" in str(poisoned)


def test_a_broken_engine_is_not_blamed_on_the_texts() -> None:
    broken = [True]

    async def scenario() -> tuple[object, list[str]]:
        batcher = MicroBatcher(
            _fails_on("bad", broken), max_batch_size=8, max_wait_ms=0, max_queue=9
        )
        batcher.start()
        (failure,) = await asyncio.gather(batcher.submit(["a"]), return_exceptions=True)
        broken[0] = False
        recovered = await batcher.submit(["b"])
        await batcher.drain()
        return failure, recovered

    failure, recovered = asyncio.run(scenario())
    assert isinstance(failure, ValueError) and not isinstance(failure, TextRejected)
    assert recovered == ["B"]
