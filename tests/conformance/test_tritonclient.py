"""The Open Inference Protocol as a real client speaks it: NVIDIA's `tritonclient[http]`
against a real `lmops serve` process. Liveness, readiness, server and model metadata, the
model-configuration and statistics extensions, inference with JSON and with binary tensor
data (tritonclient's default), a bad input, and an unknown model and version."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from lmops.engine import Engine
from tests.conftest import bearer

pytestmark = pytest.mark.conformance

TEXTS = ["物流很快，质量很好，很满意。", "质量很差，不推荐", "这本书写得太精彩了"]


@pytest.fixture(scope="module")
def client(served: tuple[str, Path]) -> triton.InferenceServerClient:
    url, _ = served
    return triton.InferenceServerClient(url.removeprefix("http://"))


@pytest.fixture(scope="module")
def engine(served: tuple[str, Path]) -> Engine:
    _, root = served
    return Engine(root / "models" / "onnx", require_gpu=False, max_batch_size=32)


def _infer(
    client: triton.InferenceServerClient, texts: list[str], binary: bool, **kwargs: object
) -> triton.InferResult:
    text = triton.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=binary),
        triton.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    return client.infer("lmops", [text], outputs=outputs, **kwargs)


def test_health_and_metadata(client: triton.InferenceServerClient, engine: Engine) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lmops")
    assert client.is_model_ready("lmops", engine.version)
    assert not client.is_model_ready("lmops", "v9.9.9")
    server = client.get_server_metadata()
    assert server["name"] == "lmops"
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(server["extensions"])
    model = client.get_model_metadata("lmops")
    assert model["versions"] == [engine.version]
    assert [i["name"] for i in model["inputs"]] == ["text"]
    assert [o["name"] for o in model["outputs"]] == ["label", "probabilities"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_gives_the_engines_answers(
    client: triton.InferenceServerClient, engine: Engine, binary: bool
) -> None:
    result = _infer(client, TEXTS, binary, request_id="conformance-1")
    labels = [
        label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")
    ]
    probabilities = result.as_numpy("probabilities")
    expected = engine.predict(TEXTS)
    assert labels == [p.label for p in expected]
    assert probabilities.shape == (3, len(engine.labels)) and probabilities.dtype == np.float32
    want = np.array([[p.probabilities[label] for label in engine.labels] for p in expected])
    np.testing.assert_allclose(probabilities, want, atol=1e-3)  # int8: batch-mates move ~1e-4
    response = result.get_response()
    assert response["model_version"] == engine.version and response["id"] == "conformance-1"


def test_all_outputs_by_default_in_binary(client: triton.InferenceServerClient) -> None:
    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS[:2], dtype=object))
    result = client.infer("lmops", [text])  # no outputs named: binary_data_output
    assert result.as_numpy("label").shape == (2,)
    assert result.as_numpy("probabilities").shape[0] == 2


def test_infer_on_a_named_version(client: triton.InferenceServerClient, engine: Engine) -> None:
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS[:1], dtype=object))
    result = client.infer("lmops", [text], model_version=engine.version)
    assert result.get_response()["model_version"] == engine.version


def test_errors_are_the_protocols(client: triton.InferenceServerClient) -> None:
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array(["好"], dtype=object))
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [text])
    with pytest.raises(InferenceServerException, match="no version 'v9.9.9'"):
        client.infer("lmops", [text], model_version="v9.9.9")
    floats = triton.InferInput("text", [1], "FP32")
    floats.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="datatype BYTES"):
        client.infer("lmops", [floats])
    wrong = triton.InferRequestedOutput("logits")
    with pytest.raises(InferenceServerException, match="unknown output 'logits'"):
        client.infer("lmops", [text], outputs=[wrong])


def test_config_and_statistics(client: triton.InferenceServerClient, engine: Engine) -> None:
    config = client.get_model_config("lmops")
    assert config["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in config["input"]] == ["text"]
    assert config["output"][1]["dims"] == [-1, len(engine.labels)]
    before = client.get_inference_statistics("lmops")["model_stats"][0]
    _infer(client, TEXTS, True)
    after = client.get_inference_statistics("lmops")["model_stats"][0]
    assert after["version"] == engine.version
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"]["count"] + 1
    )
    assert after["execution_count"] > before["execution_count"]
    floats = triton.InferInput("text", [1], "FP32")
    floats.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("lmops", [floats])
    failed = client.get_inference_statistics("lmops")["model_stats"][0]["inference_stats"]["fail"]
    assert failed["count"] == after["inference_stats"]["fail"]["count"] + 1


def test_a_request_without_content_type_is_read_as_json(served: tuple[str, Path]) -> None:
    url, _ = served
    body = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\u597d"]}]}'
    response = httpx.post(f"{url}/v2/models/lmops/infer", content=body)
    assert "content-type" not in response.request.headers
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [1]
    wrong = httpx.post(
        f"{url}/v2/models/lmops/infer", content=body, headers={"content-type": "text/plain"}
    )
    assert wrong.status_code == 415 and "error" in wrong.json()


def test_tritonclient_sends_a_key(guarded: tuple[str, Path], engine: Engine) -> None:
    """Restricted groups through tritonclient's own `headers=`: inference and statistics
    with the key, 401 without it (health stays open)."""
    url, _ = guarded
    keyed = triton.InferenceServerClient(url.removeprefix("http://"))
    assert keyed.is_server_ready()
    headers = bearer("alice")
    answer = _infer(keyed, TEXTS, binary=True, headers=headers)
    assert list(answer.as_numpy("label").astype(str)) == [p.label for p in engine.predict(TEXTS)]
    assert keyed.get_model_metadata("lmops", headers=headers)["name"] == "lmops"
    assert keyed.get_inference_statistics("lmops", headers=headers)["model_stats"]
    for call in (
        lambda: _infer(keyed, TEXTS, binary=True),
        lambda: keyed.get_inference_statistics("lmops"),
    ):
        with pytest.raises(InferenceServerException, match="Authorization: Bearer KEY"):
            call()
