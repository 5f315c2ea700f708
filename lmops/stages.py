"""The pipeline's stages by name, in order, with the paths each reads and writes.

The paths below are the ones dvc.yaml declares: tests/unit/test_stages.py checks READS
and WRITES against dvc.yaml, against the paths each stage function in tasks/stages.py
uses, and the code each stage imports against its declared deps.
"""

from __future__ import annotations

from pathlib import Path

BASE_DIR = Path("models/base")
BASE_METRICS = Path("reports/base.json")
RAW_DIR = Path("data/raw")
INGESTED_DIR = Path("data/ingested")
VALIDATED_DIR = Path("data/validated")
QUARANTINE_DIR = Path("data/quarantine")
VALIDATION_DOCS_DIR = Path("reports/validation")
INGEST_METRICS = Path("reports/ingest.json")
VALIDATION_METRICS = Path("reports/validation.json")
LABELS_DIR = Path("data/labels")
LABELS_METRICS = Path("reports/labels.json")
LABELS_PAGE_DIR = Path("reports/labels")
# `lmops exp show`'s comparison page (not a stage's output: written on request).
EXPERIMENTS_PAGE_DIR = Path("reports/experiments")
TOKENIZER_DIR = Path("models/tokenizer")
TOKENIZER_METRICS = Path("reports/tokenizer.json")
PRETRAINED_DIR = Path("models/pretrained")
PRETRAIN_CHECKPOINTS = Path("models/checkpoints/pretrain")
TOKENS_DIR = Path("data/tokens")  # pretraining's token files (lmops/tokens.py)
PRETRAIN_LIVE = Path("reports/dvclive/pretrain")
PRETRAIN_METRICS = Path("reports/pretrain.json")
FINETUNED_DIR = Path("models/finetuned")
FINETUNE_LIVE = Path("reports/dvclive/finetune")
FINETUNE_METRICS = Path("reports/finetune.json")
STUDENT_DIR = Path("models/student")
DISTILL_METRICS = Path("reports/distill.json")
METRICS = Path("reports/metrics.json")
PLOTS_DIR = Path("reports/plots")
MODEL_CARD = Path("reports/model_card.md")
ERRORS = Path("reports/errors.md")
ONNX_DIR = Path("models/onnx")
TRITON_DIR = Path("models/triton")
COST_DIR = Path("reports/cost")


# The stages whose cost is the model's training cost (metrics.json's `cost`); every stage
# also writes its own cost to COST_DIR/STAGE.json (lmops/cost.py), not listed in WRITES
# below because `lmops stage` writes it, not the stage's function.
TRAINING = ("base", "ingest", "validate", "labels", "tokenizer", "pretrain", "finetune", "distill")
# The pipeline, in order (dvc.yaml's stage order).
PIPELINE = (*TRAINING, "evaluate", "export")


def cost_path(stage: str) -> Path:
    return COST_DIR / f"{stage}.json"


# The data each stage reads and the outputs DVC tracks for it (dvc.yaml's deps and outs).
READS: dict[str, list[Path]] = {
    "base": [],
    "ingest": [RAW_DIR],
    "validate": [INGESTED_DIR],
    "labels": [VALIDATED_DIR],
    "tokenizer": [BASE_DIR, VALIDATED_DIR],
    "pretrain": [BASE_DIR, TOKENIZER_DIR, VALIDATED_DIR],
    "finetune": [TOKENIZER_DIR, PRETRAINED_DIR, VALIDATED_DIR, LABELS_DIR],
    "distill": [FINETUNED_DIR, VALIDATED_DIR, LABELS_DIR],
    "evaluate": [
        FINETUNED_DIR,
        LABELS_DIR,
        LABELS_METRICS,
        STUDENT_DIR,
        DISTILL_METRICS,
        TOKENIZER_DIR,
        VALIDATED_DIR,
        PRETRAIN_LIVE,
        FINETUNE_LIVE,
        PRETRAIN_METRICS,
        FINETUNE_METRICS,
        BASE_METRICS,
        *(cost_path(stage) for stage in TRAINING),
    ],
    "export": [FINETUNED_DIR, STUDENT_DIR, DISTILL_METRICS, VALIDATED_DIR],
}
WRITES: dict[str, list[Path]] = {
    "base": [BASE_DIR, BASE_METRICS],
    "ingest": [INGESTED_DIR, INGEST_METRICS],
    "validate": [VALIDATED_DIR, VALIDATION_DOCS_DIR, VALIDATION_METRICS],
    "labels": [LABELS_DIR, LABELS_PAGE_DIR, LABELS_METRICS],
    "tokenizer": [TOKENIZER_DIR, TOKENIZER_METRICS],
    "pretrain": [PRETRAINED_DIR, TOKENS_DIR, PRETRAIN_LIVE, PRETRAIN_METRICS],
    "finetune": [FINETUNED_DIR, FINETUNE_LIVE, FINETUNE_METRICS],
    "distill": [STUDENT_DIR, DISTILL_METRICS],
    "evaluate": [PLOTS_DIR, MODEL_CARD, ERRORS, METRICS],
    "export": [ONNX_DIR, TRITON_DIR],
}
# Written outside DVC on purpose: rejected batches, and checkpoints a killed run resumes.
UNTRACKED: dict[str, list[Path]] = {
    "validate": [QUARANTINE_DIR],
    "pretrain": [PRETRAIN_CHECKPOINTS],
}
