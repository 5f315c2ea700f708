"""Shadow and canary in a real uvicorn process (serving/challenger.py): prod and a challenger
each follow a pointer file (standing in for the registry's prod and staging), real ONNX
Runtime engines behind both. The challenger scores prod's requests off the response path;
as a canary it answers a share of them; a challenger that fails is never seen by a caller
and a failing canary switches itself off."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmops import feedback
from lmops.artifacts import ShadowRecord, TrafficRecord, traffic_files
from lmops.config import MonitorWindowConfig, apply_overrides
from lmops.tasks.monitor import read_traffic, realized_accuracy
from tests.conftest import REPO_ROOT, free_port, start_server, stop_server

# The server as `lmops serve --stage prod --challenger staging` builds it, with resolvers
# that read JSON pointer files {"version": ..., "dir": ...} instead of the registry.
SERVER = """
import json, logging, sys
from pathlib import Path

import uvicorn

from lmops.config import load_params
from lmops.engine import Engine
from lmops.serving.app import create_app
from lmops.serving.stage import start_challenger
from lmops.serving.swap import Following

root, port = Path(sys.argv[1]), int(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")


def resolver(name):
    def resolve():
        current = json.loads((root / name).read_text("utf-8"))
        return current["version"], Path(current["dir"])
    return resolve


cfg = load_params(root).serve


def load(version, model_dir):
    return Engine(model_dir, cfg.require_gpu, cfg.max_batch_size, cfg.threads, version=version)


prod = resolver("prod.json")
engine = load(*prod())
candidate, follow = start_challenger(resolver("staging.json"), "staging", load)
app = create_app(cfg, engine, root, Following(prod), None, follow, candidate)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=30)
"""

SHORT = ["质量很好，很满意", "太差了，不会再买", "一般般吧"]
# Longer than the tiny model's positions: the broken challenger below fails on it alone.
LONG = "物流很快，包装也很好，" * 30


def _point(root: Path, name: str, version: str, model_dir: Path) -> None:
    (root / name).write_text(json.dumps({"version": version, "dir": str(model_dir)}), "utf-8")


def _metric(metrics: str, name: str) -> float:
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name)))


def broken_copy(export: Path, dest: Path) -> Path:
    """The export with its manifest's max_length raised past the model's positions: real
    ONNX Runtime then fails on every long text (and answers short ones, the warm-up too)."""
    import shutil

    shutil.copytree(export, dest)
    manifest = json.loads((dest / "manifest.json").read_text("utf-8"))
    manifest["max_length"] = 4096
    (dest / "manifest.json").write_text(json.dumps(manifest), "utf-8")
    return dest


@pytest.fixture
def serve_pair(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path]]]:
    """`serve_pair(prod_dir, challenger_dir, **params)`: a server with prod v1 and the
    challenger v2 running: (url, its log)."""
    servers: list[tuple[Any, Path]] = []

    def start(prod_dir: Path, challenger_dir: Path, **params: Any) -> tuple[str, Path]:
        (tmp_path / "params.yaml").write_text(
            (REPO_ROOT / "params.yaml").read_text("utf-8"), "utf-8"
        )
        apply_overrides(tmp_path, params)
        _point(tmp_path, "prod.json", "v1", prod_dir)
        _point(tmp_path, "staging.json", "v2", challenger_dir)
        port, log = free_port(), tmp_path / "server.log"
        server = start_server(
            [sys.executable, "-c", SERVER, str(tmp_path), str(port)], tmp_path, port, log
        )
        servers.append((server, log))
        return f"http://127.0.0.1:{port}", log

    yield start
    for server, log in servers:
        assert stop_server(server) in (0, -signal.SIGTERM), log.read_text("utf-8")
        assert "Traceback" not in log.read_text("utf-8")


def _ask(url: str, batches: list[list[str]]) -> list[httpx.Response]:
    """Every batch as one request, four callers at a time."""
    with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(4) as pool:
        return list(
            pool.map(
                lambda n: client.post(
                    "/v1/predict", json={"texts": batches[n]}, headers={"x-request-id": f"r{n}"}
                ),
                range(len(batches)),
            )
        )


def _challenger_status(url: str, texts: int, timeout: float = 30) -> dict[str, Any]:
    """The challenger's status once the shadow has scored `texts` texts."""
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/v2/models/lmops").json()["parameters"]["challenger"]
        if status["shadow"]["texts"] >= texts or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_the_shadow_scores_prod_requests_and_logs_both_models(
    tiny_export: Callable[[int], Path], serve_pair: Callable[..., tuple[str, Path]], tmp_path: Path
) -> None:
    url, _ = serve_pair(tiny_export(0), tiny_export(1))
    batches = [[SHORT[n % 3], SHORT[(n + 1) % 3]] for n in range(30)]
    answers = _ask(url, batches)
    assert [a.status_code for a in answers] == [200] * 30
    # Prod answers every request: the shadow never does.
    assert {p["model_version"] for a in answers for p in a.json()["predictions"]} == {"v1"}

    status = _challenger_status(url, 60)
    assert status["version"] == "v2" and status["active"] is True
    assert status["shadow"]["texts"] == 60
    metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, 'lmops_shadow_requests_total{result="scored"}') == 30
    assert 'lmops_challenger_info{stage="staging",version="v2"} 1.0' in metrics

    # The shadow log beside the traffic log: one record per text, both models' answers.
    folder = tmp_path / "data" / "traffic"
    (shadow_file,) = traffic_files(folder, kind="shadow")
    records = [ShadowRecord.from_line(line) for line in shadow_file.read_text("utf-8").splitlines()]
    assert len(records) == 60 and all(r is not None for r in records)
    served = {
        (f"r{n}", i): p
        for n, a in enumerate(answers)
        for i, p in enumerate(a.json()["predictions"])
    }
    for record in records:
        prod = served[(record.request_id, record.index)]
        assert (record.prod_label, record.prod_version) == (prod["label"], "v1")
        assert record.prod_score == pytest.approx(prod["score"], abs=1e-6)
        assert record.challenger_version == "v2" and record.challenger_latency_ms > 0
    agreement = sum(r.prod_label == r.challenger_label for r in records) / 60
    assert status["shadow"]["agreement"] == pytest.approx(agreement, abs=1e-5)
    assert _metric(metrics, "lmops_shadow_agreement") == pytest.approx(agreement)
    for model, version in (("prod", "v1"), ("challenger", "v2")):
        mean = sum(getattr(r, f"{model}_score") for r in records) / 60
        gauge = f'lmops_shadow_estimated_accuracy{{model="{model}",version="{version}"}}'
        assert _metric(metrics, gauge) == pytest.approx(mean, abs=1e-6)
        assert status["shadow"]["estimated_accuracy"][model] == pytest.approx(mean, abs=1e-5)
    # The traffic log (what the monitor reads) holds the served answers only.
    (traffic_file,) = traffic_files(folder)
    lines = traffic_file.read_text("utf-8").splitlines()
    assert len(lines) == 60
    assert {TrafficRecord.from_line(line).model_version for line in lines} == {"v1"}


def test_a_canary_answers_its_share_and_names_its_version(
    tiny_export: Callable[[int], Path],
    serve_pair: Callable[..., tuple[str, Path]],
    tmp_path: Path,
) -> None:
    url, _ = serve_pair(
        tiny_export(0),
        tiny_export(1),
        **{"serve.canary.share": 0.5, "serve.canary.max_latency_ratio": 100.0},
    )
    answers = _ask(url, [[SHORT[n % 3]] for n in range(60)])
    assert [a.status_code for a in answers] == [200] * 60
    versions = [a.json()["version"] for a in answers]
    # 60 fair coins: both sides answer (all-one-side has probability 2 * 2^-60).
    assert set(versions) == {"v1", "v2"}
    for answer in answers:
        (prediction,) = answer.json()["predictions"]
        assert prediction["model_version"] == answer.json()["version"]
    metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, 'lmops_canary_requests_total{result="answered"}') == versions.count(
        "v2"
    )
    assert _metric(metrics, "lmops_canary_enabled") == 1
    # Requests the canary answered are not shadowed; the rest are.
    status = _challenger_status(url, versions.count("v1"))
    assert status["shadow"]["texts"] == versions.count("v1")
    assert status["canary"] == {"share": 0.5, "enabled": True, "switched_off": None}

    # Delayed labels, through the real endpoint: the served label for even requests, the
    # other one for odd ones. The monitor's realized accuracy then splits by version.
    folder = tmp_path / "data" / "traffic"
    deadline = time.monotonic() + 10  # the log is written by its own thread
    while not feedback.find_requests(folder, {"r59"}):
        assert time.monotonic() < deadline, "the traffic log never got the requests"
        time.sleep(0.1)
    expected: dict[str, list[bool]] = {"v1": [], "v2": []}
    for n, answer in enumerate(answers):
        (prediction,) = answer.json()["predictions"]
        other = next(label for label in prediction["probabilities"] if label != prediction["label"])
        given = prediction["label"] if n % 2 == 0 else other
        stored = httpx.post(f"{url}/v1/feedback", json={"request_id": f"r{n}", "labels": [given]})
        assert stored.status_code == 200, stored.text
        expected[versions[n]].append(n % 2 == 0)
    window = read_traffic(folder, MonitorWindowConfig(hours=None, max_rows=None), datetime.now(UTC))
    by_version = realized_accuracy(window, folder)["realized_by_version"]
    for version, right in expected.items():
        assert by_version[version]["labelled_rows"] == len(right)
        assert by_version[version]["accuracy"] == pytest.approx(sum(right) / len(right), abs=1e-5)


def test_a_failing_challenger_never_fails_a_caller_and_the_canary_switches_itself_off(
    tiny_export: Callable[[int], Path],
    serve_pair: Callable[..., tuple[str, Path]],
    tmp_path: Path,
) -> None:
    broken = broken_copy(tiny_export(1), tmp_path / "broken")
    url, log = serve_pair(
        tiny_export(0),
        broken,
        **{"serve.canary.share": 0.5, "serve.canary.min_requests": 5},
    )
    answers = _ask(url, [[LONG] if n % 2 else [SHORT[n % 3]] for n in range(80)])
    assert [a.status_code for a in answers] == [200] * 80
    # Every long text was answered by prod, whichever side it was sent to first.
    long_versions = {a.json()["version"] for n, a in enumerate(answers) if n % 2}
    assert long_versions == {"v1"}
    metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, 'lmops_canary_requests_total{result="failed"}') >= 1
    assert _metric(metrics, "lmops_canary_enabled") == 0
    assert _metric(metrics, "lmops_canary_switched_off_total") == 1
    status = httpx.get(f"{url}/v2/models/lmops").json()["parameters"]["challenger"]
    assert status["canary"]["enabled"] is False
    assert status["canary"]["switched_off"].startswith("error rate ")
    assert "CANARY SWITCHED OFF: v2 (staging) is worse than prod v1: error rate" in log.read_text(
        "utf-8"
    )
    # Once off, prod answers everything; the shadow goes on, failing on the long texts.
    later = _ask(url, [[LONG]] * 10)
    assert {a.json()["version"] for a in later} == {"v1"}
    _challenger_status(url, 10**6, timeout=2)  # let the shadow catch up
    failed = _metric(
        httpx.get(f"{url}/metrics").text, 'lmops_shadow_requests_total{result="failed"}'
    )
    assert failed >= 10


def test_a_challenger_that_cannot_load_leaves_prod_serving_until_it_can(
    tiny_export: Callable[[int], Path],
    serve_pair: Callable[..., tuple[str, Path]],
    tmp_path: Path,
) -> None:
    """Staging names a damaged export: prod serves alone (nothing shadowed, nothing
    failed); once staging names a good one, the watcher loads it and the shadow begins."""
    import shutil

    damaged = shutil.copytree(tiny_export(1), tmp_path / "damaged")
    for model in damaged.glob("*.onnx"):
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    url, log = serve_pair(tiny_export(0), damaged, **{"serve.poll_seconds": 0.3})
    answers = _ask(url, [[text] for text in SHORT])
    assert {a.status_code for a in answers} == {200}
    status = httpx.get(f"{url}/v2/models/lmops").json()["parameters"]["challenger"]
    assert status["version"] is None and status["active"] is False
    assert "challenger: v2 cannot be served" in log.read_text("utf-8")

    _point(tmp_path, "staging.json", "v2", tiny_export(1))
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v2/models/lmops").json()["parameters"]["challenger"]["version"] != "v2":
        assert time.monotonic() < deadline, "the challenger never loaded"
        time.sleep(0.1)
    _ask(url, [[text] for text in SHORT])
    assert _challenger_status(url, len(SHORT))["shadow"]["texts"] == len(SHORT)
    assert "challenger swap: now serving v2 (" in log.read_text("utf-8")
