"""The stage watcher, one poll at a time, with real engines of two tiny exports and the
app's real metrics: a new version switches in, a broken one is retried with backoff, an
unreadable registry keeps the old version serving."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lmops.engine import Engine
from lmops.errors import LmopsError
from lmops.serving.app import Metrics
from lmops.serving.swap import MAX_BACKOFF_POLLS, LiveModel, StageWatcher


def _load(version: str, model_dir: Path) -> Engine:
    return Engine(model_dir, require_gpu=False, max_batch_size=8, version=version)


class Stage:
    """A resolver whose answer the test sets, or makes fail."""

    def __init__(self, version: str, model_dir: Path) -> None:
        self.answer: tuple[str, Path] | Exception = (version, model_dir)

    def __call__(self) -> tuple[str, Path]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture(scope="module")
def exports(tiny_export: Callable[[int], Path]) -> dict[str, Path]:
    return {"v1": tiny_export(0), "v2": tiny_export(1)}


@pytest.fixture
def watched(exports: dict[str, Path]) -> tuple[LiveModel, Stage, Metrics, StageWatcher]:
    engine = _load("v1", exports["v1"])
    live, stage, metrics = LiveModel(engine), Stage("v1", exports["v1"]), Metrics(engine, "lmops")
    return live, stage, metrics, StageWatcher(live, stage, _load, metrics)


def _count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_new_version_is_switched_in_and_the_metrics_follow(
    watched: tuple, exports: dict[str, Path]
) -> None:
    live, stage, metrics, watcher = watched
    asyncio.run(watcher.poll())
    assert live.engine.version == "v1"
    assert _count(metrics, "lmops_model_swaps_total", result="ok") == 0
    stage.answer = ("v2", exports["v2"])
    asyncio.run(watcher.poll())
    assert live.engine.version == "v2"
    assert {p.model_version for p in live.predict(["质量很好", "太差了"])} == {"v2"}
    assert _count(metrics, "lmops_model_swaps_total", result="ok") == 1
    info = {s.labels["version"]: s.value for s in metrics.info.collect()[0].samples}
    assert info == {"v2": 1.0}


def test_a_broken_version_is_retried_with_backoff_and_a_good_one_at_once(
    watched: tuple, exports: dict[str, Path], tmp_path: Path
) -> None:
    live, stage, metrics, watcher = watched
    broken = tmp_path / "broken"
    shutil.copytree(exports["v2"], broken)
    for model_file in broken.glob("*.onnx"):
        model_file.write_bytes(b"not an ONNX model")
    stage.answer = ("v3", broken)

    async def polls(n: int) -> list[int]:
        tried = []
        for index in range(1, n + 1):
            before = _count(metrics, "lmops_model_swaps_total", result="failed")
            await watcher.poll()
            if _count(metrics, "lmops_model_swaps_total", result="failed") > before:
                tried.append(index)
        return tried

    # Tried at once, then after 2, 4, 8, 16 polls, then every MAX_BACKOFF_POLLS.
    assert MAX_BACKOFF_POLLS == 32
    assert asyncio.run(polls(100)) == [1, 3, 7, 15, 31, 63, 95]
    assert live.engine.version == "v1"
    stage.answer = ("v2", exports["v2"])
    asyncio.run(watcher.poll())
    assert live.engine.version == "v2"
    # The broken version named again is tried at once: its backoff ended with the change.
    stage.answer = ("v3", broken)
    assert asyncio.run(polls(1)) == [1]


def test_an_unreadable_registry_is_counted_and_the_old_version_serves(
    watched: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    live, stage, metrics, watcher = watched
    stage.answer = LmopsError("cannot read the registry: not a git repository")
    asyncio.run(watcher.poll())
    assert live.engine.version == "v1"
    assert _count(metrics, "lmops_model_resolve_errors_total") == 1
    assert _count(metrics, "lmops_model_swaps_total", result="failed") == 0
    assert "cannot tell which version to serve (cannot read the registry" in caplog.text
