"""Hot swap in a real uvicorn process: the server follows a resolver that reads a pointer
file (standing in for the registry's stage), while clients hammer it. A new version takes
over with no failed request; a corrupt one leaves the old version serving."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pandas as pd
import pytest

from lmops.config import apply_overrides
from lmops.engine import Engine
from tests.conftest import REPO_ROOT, free_port, start_server, stop_server

POLL_SECONDS = 0.25
CALLERS = 4

# The server as `lmops serve --stage` builds it, with a resolver that reads a JSON pointer
# file {"version": ..., "dir": ...} instead of the registry.
SERVER = """
import json, logging, sys
from pathlib import Path

import uvicorn

from lmops.config import load_params
from lmops.serving.app import create_app
from lmops.engine import Engine
from lmops.serving.swap import Following

root, pointer, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")


def resolve():
    current = json.loads(pointer.read_text("utf-8"))
    return current["version"], Path(current["dir"])


cfg = load_params(root).serve
version, model_dir = resolve()
engine = Engine(model_dir, cfg.require_gpu, cfg.max_batch_size, cfg.threads, version=version)
app = create_app(cfg, engine, root, Following(resolve))
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=30)
"""


@dataclass
class Answer:
    request_id: str
    sent: float
    received: float
    status: int | None
    version: str | None = None
    prediction_version: str | None = None
    score: float | None = None
    error: str | None = None


@dataclass
class Hammer:
    """Callers that each send one request after another until stopped."""

    url: str
    text: str
    answers: list[list[Answer]] = field(default_factory=lambda: [[] for _ in range(CALLERS)])
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.threads = [
            threading.Thread(target=self._call, args=(n,), daemon=True) for n in range(CALLERS)
        ]
        for thread in self.threads:
            thread.start()

    def _call(self, caller: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                request_id = f"{caller}-{len(self.answers[caller])}"
                sent = time.monotonic()
                try:
                    response = client.post(
                        "/v1/predict",
                        json={"texts": [self.text]},
                        headers={"x-request-id": request_id},
                    )
                except httpx.HTTPError as err:
                    self.answers[caller].append(
                        Answer(request_id, sent, time.monotonic(), None, error=repr(err))
                    )
                    continue
                answer = Answer(request_id, sent, time.monotonic(), response.status_code)
                if response.status_code == 200:
                    body = response.json()
                    (prediction,) = body["predictions"]
                    answer.version = body["version"]
                    answer.prediction_version = prediction["model_version"]
                    answer.score = prediction["probabilities"]["positive"]
                else:
                    answer.error = response.text
                self.answers[caller].append(answer)

    def all(self) -> list[Answer]:
        return [a for caller in self.answers for a in caller]

    def wait_for(self, version: str, timeout: float) -> float:
        """When the first answer from `version` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            arrived = [a.received for a in self.all() if a.version == version]
            if arrived:
                return min(arrived)
            time.sleep(0.02)
        pytest.fail(f"no answer from {version} within {timeout} s")

    def finish(self) -> list[Answer]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        return self.all()


def _point(pointer: Path, version: str, model_dir: Path) -> None:
    """Move the pointer atomically, as a registry move is."""
    scratch = pointer.with_suffix(".tmp")
    scratch.write_text(json.dumps({"version": version, "dir": str(model_dir)}), "utf-8")
    os.replace(scratch, pointer)


def _metric(metrics: str, name: str) -> float:
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name)))


@pytest.fixture(scope="module")
def models(tiny_export: Callable[[int], Path]) -> dict[str, Path]:
    return {"v1": tiny_export(0), "v2": tiny_export(1)}


@pytest.fixture(scope="module")
def probe(models: dict[str, Path], tiny_validated: Path) -> tuple[str, dict[str, float]]:
    """The test text on which the two versions disagree most, and each one's score: which
    version answered can then be read from the score, not only from the label on it. (The
    tiny models score everything near 0.5, so the gap is small, but far above the noise of a
    batch of identical texts.)"""
    engines = {
        v: Engine(d, require_gpu=False, max_batch_size=32, version=v) for v, d in models.items()
    }
    texts = pd.read_parquet(tiny_validated / "test.parquet")["text"].tolist()
    scores = {v: e.probabilities(texts)[:, 1] for v, e in engines.items()}
    best = int(abs(scores["v1"] - scores["v2"]).argmax())
    assert abs(scores["v1"][best] - scores["v2"][best]) > 1e-3, "the two seeds agree everywhere"
    return texts[best], {v: float(s[best]) for v, s in scores.items()}


@pytest.fixture
def served(models: dict[str, Path], tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A server following the pointer, which starts at v1: (url, pointer, log)."""
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text("utf-8"), "utf-8")
    apply_overrides(tmp_path, {"serve.poll_seconds": POLL_SECONDS})
    pointer = tmp_path / "stage.json"
    _point(pointer, "v1", models["v1"])
    port = free_port()
    log = tmp_path / "server.log"
    server = start_server(
        [sys.executable, "-c", SERVER, str(tmp_path), str(pointer), str(port)], tmp_path, port, log
    )
    try:
        yield f"http://127.0.0.1:{port}", pointer, log
    finally:
        status = stop_server(server)
    # The watcher stops with the server: a graceful exit (uvicorn re-raises the SIGTERM it
    # caught once it has shut down), nothing left complaining.
    assert status in (0, -signal.SIGTERM), log.read_text("utf-8")
    assert "Traceback" not in log.read_text("utf-8")
    assert "Task was destroyed" not in log.read_text("utf-8")


def test_a_new_version_takes_over_without_a_failed_request(
    served: tuple[str, Path, Path], models: dict[str, Path], probe: tuple[str, dict[str, float]]
) -> None:
    url, pointer, log = served
    text, scores = probe
    hammer = Hammer(url, text)
    hammer.wait_for("v1", timeout=10)
    time.sleep(0.5)
    moved = time.monotonic()
    _point(pointer, "v2", models["v2"])
    switched = hammer.wait_for("v2", timeout=10)
    time.sleep(0.5)
    answers = hammer.finish()

    assert answers and all(a.status == 200 for a in answers), [a for a in answers if a.error][:3]
    # Each caller's requests are sequential: all v1, then all v2, never back.
    for caller in hammer.answers:
        versions = [a.version for a in caller]
        assert versions == sorted(versions) and set(versions) == {"v1", "v2"}
    # Every answer came from the model it names.
    tolerance = abs(scores["v1"] - scores["v2"]) / 4
    for answer in answers:
        assert answer.prediction_version == answer.version
        assert answer.score == pytest.approx(scores[answer.version], abs=tolerance)
    # Nothing sent after the move had begun went to v1 once v2 had answered someone.
    assert all(a.version == "v2" for a in answers if a.sent > switched)
    assert switched - moved < 8 * POLL_SECONDS, f"switched after {switched - moved:.2f} s"

    metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, 'lmops_model_swaps_total{result="ok"}') == 1
    assert _metric(metrics, 'lmops_model_swaps_total{result="failed"}') == 0
    info = [line for line in metrics.splitlines() if line.startswith("lmops_model_info{")]
    assert len(info) == 1 and 'version="v2"' in info[0]
    assert httpx.get(f"{url}/v2/models/lmops").json()["versions"] == ["v2"]
    assert "model swap: now serving v2" in log.read_text("utf-8")

    # The traffic log names, for each text, the version that answered it.
    logged = {
        record["request_id"]: record["model_version"]
        for path in (pointer.parent / "data" / "traffic").glob("*.jsonl")
        for record in map(json.loads, path.read_text("utf-8").splitlines())
    }
    assert {a.request_id: a.version for a in answers}.items() <= logged.items()


def test_a_corrupt_version_leaves_the_old_one_serving(
    served: tuple[str, Path, Path], models: dict[str, Path], tmp_path: Path
) -> None:
    url, pointer, log = served
    broken = tmp_path / "broken"
    shutil.copytree(models["v2"], broken)
    for model_file in broken.glob("*.onnx"):
        model_file.write_bytes(b"not an ONNX model")
    hammer = Hammer(url, "物流很快，质量很好")
    hammer.wait_for("v1", timeout=10)
    _point(pointer, "v3", broken)
    watched = 12 * POLL_SECONDS
    time.sleep(watched)

    metrics = httpx.get(f"{url}/metrics").text
    failed = _metric(metrics, 'lmops_model_swaps_total{result="failed"}')
    # Tried, then retried after 2, 4, 8 polls: not at every poll.
    assert 1 <= failed <= 3, failed
    assert _metric(metrics, 'lmops_model_swaps_total{result="ok"}') == 0
    assert httpx.get(f"{url}/v2/models/lmops").json()["versions"] == ["v1"]
    assert f"model swap to v3 ({broken}) failed, still serving v1" in log.read_text("utf-8")
    assert "does not match the sha256 in its manifest.json" in log.read_text("utf-8")

    # A good version named next is taken at once: the broken one wedged nothing.
    _point(pointer, "v2", models["v2"])
    hammer.wait_for("v2", timeout=10)
    answers = hammer.finish()
    assert answers and all(a.status == 200 for a in answers), [a for a in answers if a.error][:3]
    assert {a.version for a in answers} == {"v1", "v2"}
    metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, 'lmops_model_swaps_total{result="ok"}') == 1
