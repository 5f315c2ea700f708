"""The pipeline's stages by name, with the paths each reads and writes.

`lmops stage NAME` (the `cmd` of every stage in dvc.yaml) lands here; so does the
Prefect flow, through `dvc repro`. The paths below are the ones dvc.yaml declares:
tests/unit/test_stages.py checks READS and WRITES against dvc.yaml, against the paths each
stage function below uses, and the code each stage imports against its declared deps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmops.config import Params

RAW_DIR = Path("data/raw")
INGESTED_DIR = Path("data/ingested")
VALIDATED_DIR = Path("data/validated")
QUARANTINE_DIR = Path("data/quarantine")
VALIDATION_DOCS_DIR = Path("reports/validation")
INGEST_METRICS = Path("reports/ingest.json")
VALIDATION_METRICS = Path("reports/validation.json")
TOKENIZER_DIR = Path("models/tokenizer")
TOKENIZER_METRICS = Path("reports/tokenizer.json")
PRETRAINED_DIR = Path("models/pretrained")
PRETRAIN_CHECKPOINTS = Path("models/checkpoints/pretrain")
PRETRAIN_LIVE = Path("reports/dvclive/pretrain")
PRETRAIN_METRICS = Path("reports/pretrain.json")
FINETUNED_DIR = Path("models/finetuned")
FINETUNE_LIVE = Path("reports/dvclive/finetune")
FINETUNE_METRICS = Path("reports/finetune.json")
METRICS = Path("reports/metrics.json")
PLOTS_DIR = Path("reports/plots")
MODEL_CARD = Path("reports/model_card.md")
ONNX_DIR = Path("models/onnx")
TRITON_DIR = Path("models/triton")


def _ingest(params: Params, root: Path) -> Any:
    from tasks import ingest

    return ingest.run(params.data, root, root / INGESTED_DIR, root / INGEST_METRICS)


def _validate(params: Params, root: Path) -> Any:
    from tasks import validate

    return validate.run(
        params.validation,
        ingested_dir=root / INGESTED_DIR,
        validated_dir=root / VALIDATED_DIR,
        docs_dir=root / VALIDATION_DOCS_DIR,
        quarantine_root=root / QUARANTINE_DIR,
        metrics_path=root / VALIDATION_METRICS,
    )


def _tokenizer(params: Params, root: Path) -> Any:
    from lmops.modeling import init_checkpoint
    from tasks import tokenizer

    return tokenizer.run(
        params.tokenizer,
        params.model,
        root / VALIDATED_DIR,
        root / TOKENIZER_DIR,
        root / TOKENIZER_METRICS,
        init_dir=init_checkpoint(params.model, root),
    )


def _pretrain(params: Params, root: Path) -> Any:
    from lmops.modeling import init_checkpoint
    from tasks import pretrain

    return pretrain.run(
        params.pretrain,
        params.model,
        init_dir=init_checkpoint(params.model, root),
        used=params.finetune.from_pretrained,
        tokenizer_dir=root / TOKENIZER_DIR,
        validated_dir=root / VALIDATED_DIR,
        out_dir=root / PRETRAINED_DIR,
        checkpoint_dir=root / PRETRAIN_CHECKPOINTS,
        live_dir=root / PRETRAIN_LIVE,
        metrics_path=root / PRETRAIN_METRICS,
    )


def _finetune(params: Params, root: Path) -> Any:
    from tasks import finetune

    return finetune.run(
        params.finetune,
        params.model,
        tokenizer_dir=root / TOKENIZER_DIR,
        pretrained_dir=root / PRETRAINED_DIR,
        validated_dir=root / VALIDATED_DIR,
        out_dir=root / FINETUNED_DIR,
        live_dir=root / FINETUNE_LIVE,
        metrics_path=root / FINETUNE_METRICS,
    )


def _evaluate(params: Params, root: Path) -> Any:
    from tasks import evaluate

    return evaluate.run(
        params.evaluate,
        params.finetune,
        params.model,
        finetuned_dir=root / FINETUNED_DIR,
        tokenizer_dir=root / TOKENIZER_DIR,
        validated_dir=root / VALIDATED_DIR,
        metrics_path=root / METRICS,
        plots_dir=root / PLOTS_DIR,
        model_card_path=root / MODEL_CARD,
    )


def _export(params: Params, root: Path) -> Any:
    from tasks import export

    return export.run(
        params.export,
        params.model,
        finetuned_dir=root / FINETUNED_DIR,
        validated_dir=root / VALIDATED_DIR,
        out_dir=root / ONNX_DIR,
        triton_dir=root / TRITON_DIR,
    )


# The data each stage reads and the outputs DVC tracks for it (dvc.yaml's deps and outs).
READS: dict[str, list[Path]] = {
    "ingest": [RAW_DIR],
    "validate": [INGESTED_DIR],
    "tokenizer": [VALIDATED_DIR],
    "pretrain": [TOKENIZER_DIR, VALIDATED_DIR],
    "finetune": [TOKENIZER_DIR, PRETRAINED_DIR, VALIDATED_DIR],
    "evaluate": [FINETUNED_DIR, TOKENIZER_DIR, VALIDATED_DIR],
    "export": [FINETUNED_DIR, VALIDATED_DIR],
}
WRITES: dict[str, list[Path]] = {
    "ingest": [INGESTED_DIR, INGEST_METRICS],
    "validate": [VALIDATED_DIR, VALIDATION_DOCS_DIR, VALIDATION_METRICS],
    "tokenizer": [TOKENIZER_DIR, TOKENIZER_METRICS],
    "pretrain": [PRETRAINED_DIR, PRETRAIN_LIVE, PRETRAIN_METRICS],
    "finetune": [FINETUNED_DIR, FINETUNE_LIVE, FINETUNE_METRICS],
    "evaluate": [PLOTS_DIR, MODEL_CARD, METRICS],
    "export": [ONNX_DIR, TRITON_DIR],
}
# Written outside DVC on purpose: rejected batches, and checkpoints a killed run resumes.
UNTRACKED: dict[str, list[Path]] = {
    "validate": [QUARANTINE_DIR],
    "pretrain": [PRETRAIN_CHECKPOINTS],
}

# In pipeline order.
STAGES: dict[str, Callable[[Params, Path], Any]] = {
    "ingest": _ingest,
    "validate": _validate,
    "tokenizer": _tokenizer,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "evaluate": _evaluate,
    "export": _export,
}
