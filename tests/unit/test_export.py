"""ONNX export of a tiny fine-tuned classifier: parity on the whole test split, variants
published or refused with the reason, the manifest and the Triton repository."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from lmops.tasks import export
from tests.conftest import build_tiny_classifier, params_with, tiny_raw


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def exported(
    request: pytest.FixtureRequest,
    repo_params_raw: dict,
    tiny_validated: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict, Path, str]:
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    dirs = build_tiny_classifier(repo_params_raw, tiny_validated, root, request.param)
    params = params_with(tiny_raw(repo_params_raw), model__architecture=request.param)
    manifest = export.run(
        params.export,
        params.model,
        dirs["finetuned"],
        tiny_validated,
        root / "onnx",
        root / "triton",
    )
    return manifest, root, request.param


@pytest.mark.model
def test_fp32_matches_pytorch_on_the_whole_test_split(exported: tuple) -> None:
    manifest, root, _ = exported
    parity = manifest["variants"]["fp32"]["parity"]
    assert parity["max_abs_logit_diff_vs_torch"] <= 1e-4
    assert parity["label_agreement_vs_torch"] == 1.0
    assert parity["accuracy"] == pytest.approx(manifest["torch_accuracy"])
    assert manifest["test_rows"] == 150


@pytest.mark.model
def test_int8_is_published_only_within_a_point_of_fp32(exported: tuple) -> None:
    manifest, root, _ = exported
    if "int8" in manifest["variants"]:
        drop = (
            manifest["variants"]["fp32"]["parity"]["accuracy"]
            - manifest["variants"]["int8"]["parity"]["accuracy"]
        )
        assert drop <= 0.01
        assert (root / "onnx" / "model.int8.onnx").is_file()
    else:
        assert "over export.parity.max_int8_accuracy_drop" in manifest["refused"]["int8"]
        assert not (root / "onnx" / "model.int8.onnx").exists()


def test_fp16_without_cuda_is_refused_and_says_why(exported: tuple) -> None:
    """onnxruntime-gpu falls back to CPU silently; the export reads get_providers()."""
    manifest, root, _ = exported
    if "CUDAExecutionProvider" in ort.get_available_providers() and "fp16" in manifest["variants"]:
        pytest.skip("a working CUDA provider verified fp16 here")
    assert manifest["refused"]["fp16"].startswith("not verified: ONNX Runtime has no working CUDA")
    assert not (root / "onnx" / "model.fp16.onnx").exists()
    assert manifest["recommended"]["CUDAExecutionProvider"] == "fp32"


def test_manifest_describes_the_files(exported: tuple) -> None:
    manifest, root, architecture = exported
    for variant in manifest["variants"].values():
        data = (root / "onnx" / variant["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == variant["sha256"]
    assert manifest["labels"] == ["negative", "positive"]
    assert manifest["architecture"] == architecture
    assert json.loads((root / "onnx" / "manifest.json").read_text("utf-8")) == manifest
    assert (root / "onnx" / "tokenizer" / "tokenizer.json").is_file()


def test_session_gives_logits_and_the_embedding_for_any_batch_and_length(exported: tuple) -> None:
    manifest, root, _ = exported
    session = ort.InferenceSession(
        str(root / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for batch, length in ((1, 5), (3, 17)):
        inputs = {
            "input_ids": np.full((batch, length), 7, dtype=np.int64),
            "attention_mask": np.ones((batch, length), dtype=np.int64),
        }
        logits, embedding = session.run(["logits", "embedding"], inputs)
        assert logits.shape == (batch, 2)
        assert embedding.shape == (batch, manifest["outputs"]["embedding"]["shape"][1])


def test_triton_repository_serves_the_fp32_model(exported: tuple) -> None:
    manifest, root, _ = exported
    model_dir = root / "triton" / "lmops"
    config = (model_dir / "config.pbtxt").read_text("utf-8")
    assert 'backend: "onnxruntime"' in config and 'name: "logits"' in config
    assert (model_dir / "1" / "model.onnx").read_bytes() == (
        root / "onnx" / "model.onnx"
    ).read_bytes()
    assert (model_dir / "labels.txt").read_text("utf-8").split() == manifest["labels"]


@pytest.mark.model
def test_padding_does_not_change_a_text_s_logits(exported: tuple, tiny_validated: Path) -> None:
    """A text alone and the same text padded inside a batch must score the same."""
    from lmops.batching import collate, encode
    from lmops.modeling import load_tokenizer

    _, root, _ = exported
    tokenizer = load_tokenizer(root / "onnx" / "tokenizer")
    texts = pd.read_parquet(tiny_validated / "test.parquet")["text"].head(4).tolist()
    ids = encode(tokenizer, texts, 32)
    session = ort.InferenceSession(
        str(root / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    together = session.run(
        ["logits"], {k: v.numpy() for k, v in collate(ids, tokenizer.pad_token_id).items()}
    )[0]
    for row, seq in enumerate(ids):
        alone = session.run(
            ["logits"], {k: v.numpy() for k, v in collate([seq], tokenizer.pad_token_id).items()}
        )[0]
        np.testing.assert_allclose(alone[0], together[row], atol=1e-4)


@pytest.mark.model
def test_the_engine_serves_calibrated_scores_from_the_raw_logits(exported: tuple) -> None:
    """The temperature fitted on val travels in the manifest; the graph's logits stay raw
    (parity is on them) and the engine divides them before the softmax."""
    import numpy as np

    from lmops.classifier import load
    from lmops.engine import Engine
    from lmops.ngrams import softmax

    manifest, root, _ = exported
    assert manifest["temperature"] == load(root / "finetuned").spec.temperature
    engine = Engine(root / "onnx", require_gpu=False, max_batch_size=8, variant="fp32")
    text = "质量很好，很满意"
    ids = engine.tokenizer.encode(text).ids
    logits = engine._session_run([ids], ["logits"])[0]
    served = np.array([list(engine.predict([text])[0].probabilities.values())])
    np.testing.assert_allclose(served, softmax(logits / manifest["temperature"]), atol=1e-6)
