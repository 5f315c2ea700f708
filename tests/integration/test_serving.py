"""`lmops serve` as a real uvicorn process on a free loopback port, serving a tiny exported
model: both APIs, metrics, the traffic log, every bad input, and 200 concurrent callers
each getting their own answers."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from lmops.config import apply_overrides, load_params
from lmops.engine import Engine
from tests.conftest import REPO_ROOT, free_port, serve, stop_server, tool_env


@pytest.fixture(scope="module")
def workspace(tiny_export: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    shutil.copytree(tiny_export(0), root / "models" / "onnx")
    (root / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text("utf-8"), "utf-8")
    return root


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[str]:
    url, process = serve(workspace)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def engine(workspace: Path) -> Engine:
    return Engine(workspace / "models" / "onnx", require_gpu=False, max_batch_size=32)


@pytest.fixture(scope="module")
def texts(tiny_validated: Path) -> list[str]:
    return pd.read_parquet(tiny_validated / "test.parquet")["text"].tolist()


def test_v1_predict_answers_each_text(server: str, engine: Engine, texts: list[str]) -> None:
    response = httpx.post(f"{server}/v1/predict", json={"texts": texts[:3]})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == engine.version and body["model"] == "lmops"
    expected = engine.predict(texts[:3])
    for got, want in zip(body["predictions"], expected, strict=True):
        assert got["label"] == want.label
        assert got["model_version"] == engine.version
        assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        for label, p in want.probabilities.items():
            assert got["probabilities"][label] == pytest.approx(p, abs=1e-5)


def test_v2_protocol(server: str, engine: Engine, texts: list[str]) -> None:
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    ready = httpx.get(f"{server}/v2/health/ready").json()
    assert ready["ready"] is True and ready["draining"] is False
    assert ready["traffic_log"]["status"] == "ok"
    metadata = httpx.get(f"{server}/v2/models/lmops").json()
    assert metadata["inputs"][0]["datatype"] == "BYTES"
    # onnxruntime-gpu lists CUDA here, but without CUDA libraries the session falls back
    # to CPU: what is reported is what the session really runs on.
    assert metadata["parameters"]["providers"] == engine.providers
    assert metadata["parameters"]["device"] == engine.device
    request = {
        "id": "r1",
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts[:2]}],
    }
    body = httpx.post(f"{server}/v2/models/lmops/infer", json=request).json()
    assert body["id"] == "r1" and body["model_version"] == engine.version
    labels, probabilities = body["outputs"]
    assert labels["data"] == [p.label for p in engine.predict(texts[:2])]
    assert probabilities["shape"] == [2, 2] and len(probabilities["data"]) == 4


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        ("post", "/v1/predict", {"json": {"texts": []}}, 422, "at least one text"),
        ("post", "/v1/predict", {"json": {"texts": ["ok", 3]}}, 422, "texts.1"),
        ("post", "/v1/predict", {"json": {"text": "ok"}}, 422, "texts: Field required"),
        (
            "post",
            "/v1/predict",
            {"content": b'{"texts": [', "headers": {"content-type": "application/json"}},
            400,
            "invalid JSON",
        ),
        (
            "post",
            "/v1/predict",
            {"json": {"texts": ["x" * 10 * 1024 * 1024]}},
            413,
            "over serve.max_body_bytes",
        ),
        (
            "post",
            "/v1/predict",
            {"json": {"texts": ["a"] * 65}},
            422,
            "65 texts, over serve.max_texts_per_request=64",
        ),
        (
            "post",
            "/v1/predict",
            {"json": {"texts": ["a", "b" * 5001]}},
            422,
            "text 1 has 5,001 characters, over serve.max_chars_per_text",
        ),
        (
            "post",
            "/v1/predict",
            {
                "content": "texts=a",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            415,
            "content type must be application/json",
        ),
        ("get", "/v2/models/bert", {}, 404, "unknown model 'bert'"),
        ("post", "/v2/models/bert/infer", {"json": {"inputs": []}}, 404, "unknown model"),
        (
            "post",
            "/v2/models/lmops/infer",
            {
                "json": {
                    "inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]
                }
            },
            422,
            "datatype BYTES",
        ),
        (
            "post",
            "/v2/models/lmops/infer",
            {
                "json": {
                    "inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]
                }
            },
            422,
            "does not match 1 elements",
        ),
    ],
    ids=[
        "empty list",
        "non-string item",
        "missing field",
        "invalid JSON",
        "10 MB text",
        "too many texts",
        "text too long",
        "wrong content type",
        "unknown model",
        "unknown model infer",
        "v2 not BYTES",
        "v2 shape mismatch",
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(
    server: str, method: str, path: str, kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = getattr(httpx, method)(f"{server}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert httpx.post(f"{server}/v1/predict", json={"texts": ["still here"]}).status_code == 200


def test_explain_weighs_each_token_by_what_leaving_it_out_costs(
    server: str, engine: Engine, texts: list[str]
) -> None:
    """Each token's weight is the fall in the label's probability without that token:
    checked against /v1/predict on the text with that character cut out (the tiny model's
    tokens are single CJK characters)."""
    text = next(t for t in texts if 8 <= len(t) <= 20 and all("\u4e00" <= c <= "\u9fff" for c in t))
    response = httpx.post(f"{server}/v1/explain", json={"text": text}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == engine.version and body["truncated"] is False
    tokens = body["tokens"]
    assert [t["text"] for t in tokens] == list(text)  # one span per character, in order
    assert [(t["start"], t["end"]) for t in tokens] == [(i, i + 1) for i in range(len(text))]
    label = body["label"]
    cut = [text[: t["start"]] + text[t["end"] :] for t in tokens]
    predicted = httpx.post(f"{server}/v1/predict", json={"texts": [text, *cut]}).json()
    whole, *without = (p["probabilities"][label] for p in predicted["predictions"])
    assert whole == pytest.approx(body["score"], abs=0.02)
    # int8 quantises per batch: the same texts in another batch differ by a little.
    for token, alone in zip(tokens, without, strict=True):
        assert token["weight"] == pytest.approx(whole - alone, abs=0.03)
    assert max(abs(t["weight"]) for t in tokens) > 0.001  # not all zero


def test_explain_refuses_a_text_over_max_tokens_and_keeps_serving(server: str) -> None:
    limit = load_params(REPO_ROOT).serve.explain.max_tokens
    response = httpx.post(f"{server}/v1/explain", json={"text": "好" * (limit + 1)}, timeout=30)
    assert response.status_code == 422
    assert f"{limit + 1} tokens" in response.json()["error"]
    assert "serve.explain.max_tokens" in response.json()["error"]
    # A field misnamed, a list, a lone surrogate (escaped in the JSON itself).
    for bad in ('{"txt": "x"}', '{"text": ["a list"]}', '{"text": "\\ud800"}'):
        refused = httpx.post(
            f"{server}/v1/explain",
            content=bad,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert refused.status_code == 422, bad
    at_limit = httpx.post(f"{server}/v1/explain", json={"text": "好" * limit}, timeout=30)
    assert at_limit.status_code == 200 and len(at_limit.json()["tokens"]) <= limit
    assert httpx.post(f"{server}/v1/predict", json={"texts": ["still here"]}).status_code == 200


def test_200_concurrent_callers_each_get_their_own_answers(
    server: str, engine: Engine, texts: list[str]
) -> None:
    requests = [texts[i % len(texts) : i % len(texts) + 1 + i % 3] for i in range(200)]

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/v1/predict", json={"texts": r}) for r in requests)
            )

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    # Dynamic int8 quantises activations per batch, so a text's scores move slightly with
    # what it shares a batch with: scores within 5e-3; labels wherever that cannot flip them.
    for sent, response in zip(requests, responses, strict=True):
        expected = engine.predict(sent)
        got = response.json()["predictions"]
        assert len(got) == len(sent)
        for g, e in zip(got, expected, strict=True):
            assert g["score"] == pytest.approx(e.score, abs=5e-3)
            if e.score > 0.51:
                assert g["label"] == e.label
    metrics = httpx.get(f"{server}/metrics").text
    count = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("lmops_batch_size_count")
        )
    )
    total = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("lmops_batch_size_sum")
        )
    )
    assert total / count > 1.5  # requests were batched together


def test_metrics_expose_requests_errors_and_the_provider(server: str, engine: Engine) -> None:
    httpx.post(f"{server}/v1/predict", json={"texts": []})
    metrics = httpx.get(f"{server}/metrics").text
    assert 'lmops_requests_total{code="200",endpoint="/v1/predict"}' in metrics
    assert 'lmops_requests_total{code="422",endpoint="/v1/predict"}' in metrics
    assert f'provider="{engine.providers[0]}"' in metrics
    assert "lmops_request_latency_seconds_bucket" in metrics
    assert "lmops_queue_depth" in metrics


def test_traffic_log_records_every_prediction(server: str, workspace: Path) -> None:
    marker = f"traffic check {time.time()}"
    httpx.post(f"{server}/v1/predict", json={"texts": [marker]}, headers={"x-request-id": "t-1"})
    deadline = time.monotonic() + 10
    while True:  # written off the request path, by the log's own thread
        records = [
            json.loads(line)
            for path in (workspace / "data" / "traffic").glob("*.jsonl")
            for line in path.read_text("utf-8").splitlines()
        ]
        matching = [r for r in records if r.get("text") == marker]
        if matching or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (record,) = matching
    assert record["request_id"] == "t-1"
    assert set(record) >= {"timestamp", "label", "score", "latency_ms", "model_version"}


def test_personal_data_never_reaches_the_traffic_log(server: str, workspace: Path) -> None:
    """serve.traffic.redact_pii (on by default): the answer is the model's, the log keeps
    the text with [PHONE] and [ID] in place of the numbers, and counts them."""
    marker = f"pii check {time.time()}"
    text = f"{marker} 快递员电话13812345678，身份证11010519491231002X"
    answer = httpx.post(
        f"{server}/v1/predict", json={"texts": [text]}, headers={"x-request-id": "p-1"}
    )
    assert answer.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        raw = "".join(
            path.read_text("utf-8") for path in (workspace / "data" / "traffic").glob("*.jsonl")
        )
        if marker in raw or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "13812345678" not in raw and "11010519491231002X" not in raw
    (record,) = [json.loads(line) for line in raw.splitlines() if marker in line]
    assert record["text"] == f"{marker} 快递员电话[PHONE]，身份证[ID]"
    assert record["pii_redacted"] == {"PHONE": 1, "ID": 1}


def test_traffic_log_can_store_a_hash_instead_of_the_text(tmp_path: Path) -> None:
    from lmops.engine import Prediction
    from lmops.serving.traffic import TrafficLog

    log = TrafficLog(tmp_path, store_text=False, rotate_mb=1)
    log.append("r", ["secret review"], [Prediction("positive", 0.9, {}, "v")], 1.0)
    log.close()
    (path,) = tmp_path.glob("*.jsonl")
    record = json.loads(path.read_text("utf-8"))
    assert "text" not in record and len(record["text_sha256"]) == 64
    assert "secret" not in path.read_text("utf-8")


def test_require_gpu_refuses_to_start_without_cuda(workspace: Path, engine: Engine) -> None:
    if engine.device == "cuda":
        pytest.skip("CUDA really works here")
    apply_overrides(workspace, {"serve.require_gpu": True})
    try:
        result = subprocess.run(
            [sys.executable, "-m", "lmops", "serve", "--port", str(free_port())],
            cwd=workspace,
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        apply_overrides(workspace, {"serve.require_gpu": False})
    assert result.returncode == 1
    assert "error: serve.require_gpu is true but ONNX Runtime runs on" in result.stderr
    assert "Traceback" not in result.stderr
    assert load_params(workspace).serve.require_gpu is False


def test_serving_code_imports_no_heavy_library() -> None:
    probe = (
        "import sys, lmops.cli, lmops.serving.app, lmops.engine; "
        "print(sorted({'torch', 'transformers', 'great_expectations', 'evidently', 'cleanlab', "
        "'sklearn'} "
        "& set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=tool_env(), check=True
    )
    assert result.stdout.strip() == "[]"
