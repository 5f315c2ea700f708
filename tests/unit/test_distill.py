"""The distill stage: a student with fewer layers learns from the fine-tuned teacher, the
choice of the served model is made on validation, and the later stages take that one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from lmops.artifacts import DistillReport, ExportManifest, Metrics
from lmops.config import Params
from lmops.errors import DataError
from lmops.stages import (
    DISTILL_METRICS,
    FINETUNED_DIR,
    METRICS,
    ONNX_DIR,
    STUDENT_DIR,
    VALIDATED_DIR,
)
from lmops.tasks.distill import choose, kept_layers
from lmops.tasks.stages import run_stage
from tests.conftest import params_with, tiny_raw


def _params(repo_params_raw: dict, **dotted: Any) -> Params:
    # A two-layer teacher (the tiny profile's one layer leaves nothing to take away).
    return params_with(tiny_raw(repo_params_raw), model__layers=2, **dotted)


def _teacher(params: Params, root: Path, validated: Path) -> None:
    shutil.copytree(validated, root / VALIDATED_DIR)
    for stage in ("base", "labels", "tokenizer", "pretrain", "finetune"):
        run_stage(stage, params, root)


@pytest.mark.code
def test_the_student_starts_from_layers_spread_over_the_teachers() -> None:
    assert kept_layers(6, 2) == [0, 5]
    assert kept_layers(6, 3) == [0, 2, 5]
    assert kept_layers(12, 4) == [0, 4, 7, 11]
    assert kept_layers(2, 1) == [0]


@pytest.mark.code
def test_the_choice_is_made_on_validation_with_the_gap_and_the_baseline(
    repo_params_raw: dict,
) -> None:
    cfg = _params(repo_params_raw, distill__max_accuracy_gap=0.01).distill
    assert choose(cfg, 6, 0.84, 0.835, 0.76).served == "student"
    trailing = choose(cfg, 6, 0.84, 0.82, 0.76)
    assert trailing.served == "teacher" and "trails the teacher by more than 0.0100" in (
        trailing.why
    )
    behind = choose(cfg, 6, 0.80, 0.795, 0.80)
    assert behind.served == "teacher" and behind.why == "the student does not beat the baseline"


@pytest.mark.model
def test_a_distilled_student_is_evaluated_and_exported_when_chosen(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    from lmops.classifier import load

    # A gap of 1 and no n-gram channel: the student is served whenever it beats the baseline,
    # which the tiny models do not always do; the test follows the recorded choice.
    params = _params(
        repo_params_raw, distill__enabled=True, distill__layers=1, distill__max_accuracy_gap=1.0
    )
    _teacher(params, tmp_path, tiny_validated)
    run_stage("distill", params, tmp_path)
    report = DistillReport.read(tmp_path / DISTILL_METRICS)
    student = load(tmp_path / STUDENT_DIR)
    assert student.encoder.config.num_hidden_layers == 1
    assert (report.teacher_layers, report.student_layers) == (2, 1)
    assert 0 <= report.student_val_accuracy <= 1 and report.seconds > 0
    assert report.served == (
        "student" if report.student_val_accuracy > report.baseline_val_accuracy else "teacher"
    )

    run_stage("evaluate", params, tmp_path)
    run_stage("export", params, tmp_path)
    metrics = Metrics.read(tmp_path / METRICS)
    assert metrics.distillation == report
    # The labels stage ran first: the test rows it flagged are named, with both accuracies.
    found = metrics.label_issues
    assert found is not None and found.policy == "report" and found.dropped_train_rows == 0
    assert 0 < found.test_flagged < metrics.test_rows
    assert found.accuracy_all == pytest.approx(metrics.model.accuracy, abs=1e-4)
    card = (tmp_path / "reports" / "model_card.md").read_text("utf-8")
    assert "- label issues:" in card
    assert "- distillation: a 1-layer student of the 2-layer teacher" in card
    # The export is the served model's graph: its logits are that model's, not the other's.
    served = STUDENT_DIR if report.served == "student" else FINETUNED_DIR
    other = FINETUNED_DIR if report.served == "student" else STUDENT_DIR
    exported, served_logits = _onnx_logits(tmp_path), _torch_logits(tmp_path / served)
    assert abs(exported - served_logits).max() < 1e-4
    assert abs(exported - _torch_logits(tmp_path / other)).max() > 1e-3


def _texts(root: Path) -> list[str]:
    import pandas as pd

    return pd.read_parquet(root / VALIDATED_DIR / "val.parquet")["text"].tolist()[:16]


def _torch_logits(model_dir: Path) -> Any:
    import torch

    from lmops.classifier import load
    from lmops.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load(model_dir)
    inputs = tokenizer(
        _texts(model_dir.parent.parent), padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["attention_mask"])[0].numpy()


def _onnx_logits(root: Path) -> Any:
    import numpy as np
    import onnxruntime as ort

    from lmops.modeling import load_tokenizer

    exported = ExportManifest.of(root / ONNX_DIR)
    tokenizer = load_tokenizer(root / ONNX_DIR / exported.tokenizer)
    inputs = tokenizer(_texts(root), padding=True, truncation=True, return_tensors="np")
    session = ort.InferenceSession(str(root / ONNX_DIR / exported.variants["fp32"].file))
    feed = {k: inputs[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    return session.run(["logits"], feed)[0]


@pytest.mark.model
def test_without_distillation_the_teacher_is_served(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    params = _params(repo_params_raw)  # distill.enabled: false, the default
    _teacher(params, tmp_path, tiny_validated)
    run_stage("distill", params, tmp_path)
    report = DistillReport.read(tmp_path / DISTILL_METRICS)
    assert (report.served, report.why, report.student_layers) == (
        "teacher",
        "distill.enabled is false",
        None,
    )
    assert [p.name for p in (tmp_path / STUDENT_DIR).iterdir()] == ["skipped.json"]


@pytest.mark.model
def test_a_student_as_deep_as_its_teacher_is_refused_and_nothing_is_written(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    params = _params(repo_params_raw, distill__enabled=True, distill__layers=2)
    _teacher(params, tmp_path, tiny_validated)
    with pytest.raises(DataError, match=r"distill.layers=2 must be fewer than the teacher's 2"):
        run_stage("distill", params, tmp_path)
    assert not (tmp_path / STUDENT_DIR).exists()
    assert not (tmp_path / DISTILL_METRICS).exists()
