"""KServe's own Python SDK (`kserve.InferenceRESTClient`, Open Inference Protocol v2)
against a real `lmops serve`. kserve 0.21 would downgrade protobuf (7 → 6) and psutil
(7 → 5.9) in the project's venv, so it lives in its own, `.venv-kserve`, built here once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmops.engine import Engine
from tests.conftest import REPO_ROOT, bearer

pytestmark = pytest.mark.conformance

KSERVE = "kserve==0.21.0"
VENV = REPO_ROOT / ".venv-kserve"

CLIENT = """
import asyncio, json, sys

from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

url = sys.argv[1]
headers = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None


def request(model, datatype, data):
    text = InferInput(name="text", shape=[len(data)], datatype=datatype, data=data)
    return InferRequest(model_name=model, infer_inputs=[text])


async def refused(client, model, datatype, data):
    try:
        await client.infer(url, request(model, datatype, data), model_name=model, headers=headers)
    except Exception as err:
        return str(err)
    return None


async def main():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    out = {
        "live": await client.is_server_live(url, headers=headers),
        "ready": await client.is_server_ready(url, headers=headers),
        "model_ready": await client.is_model_ready(url, "lmops", headers=headers),
        "unknown_model_ready": await client.is_model_ready(url, "nope", headers=headers),
    }
    texts = json.loads(sys.argv[2])
    answer = await client.infer(
        url, request("lmops", "BYTES", texts), model_name="lmops", headers=headers
    )
    out["outputs"] = {o.name: {"shape": o.shape, "data": list(o.data)} for o in answer.outputs}
    out["bad_input"] = await refused(client, "lmops", "FP32", [1.0])
    out["unknown_model"] = await refused(client, "nope", "BYTES", ["x"])
    await client.close()
    print(json.dumps(out, ensure_ascii=False, default=str))


asyncio.run(main())
"""


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", KSERVE],
            check=True,
            capture_output=True,
            timeout=900,
        )
        (VENV / ".installed").write_text(KSERVE)
    return python


def test_kserve_sdk_lives_reads_and_infers(kserve_python: Path, served: tuple[str, Path]) -> None:
    url, root = served
    engine = Engine(root / "models" / "onnx", require_gpu=False, max_batch_size=32)
    texts = ["物流很快，质量很好，很满意。", "质量很差，不推荐"]
    result = subprocess.run(
        [str(kserve_python), "-c", CLIENT, url, json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model_ready"]
    assert not out["unknown_model_ready"]
    # (No model_version check: kserve 0.21's InferResponse.from_bytes drops it whenever
    # the answer carries binary data, which the SDK asks for.)
    assert out["outputs"]["label"]["data"] == [p.label for p in engine.predict(texts)]
    assert out["outputs"]["probabilities"]["shape"] == [2, len(engine.labels)]
    assert "datatype BYTES" in out["bad_input"]
    assert "unknown model 'nope'" in out["unknown_model"]


def test_kserve_sdk_sends_a_key(kserve_python: Path, guarded: tuple[str, Path]) -> None:
    """Through the SDK's own `headers=`: the key opens the restricted inference group."""
    url, root = guarded
    engine = Engine(root / "models" / "onnx", require_gpu=False, max_batch_size=32)
    texts = ["物流很快，质量很好，很满意。"]

    def run(*headers: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(kserve_python), "-c", CLIENT, url, json.dumps(texts), *headers],
            capture_output=True,
            text=True,
            timeout=120,
        )

    keyed = run(json.dumps(bearer("alice")))
    assert keyed.returncode == 0, keyed.stderr
    out = json.loads(keyed.stdout.strip().splitlines()[-1])
    assert out["outputs"]["label"]["data"] == [p.label for p in engine.predict(texts)]
    refused = run()
    assert refused.returncode != 0
    assert "401" in refused.stderr
