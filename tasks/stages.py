"""`lmops stage NAME` (the `cmd` of every stage in dvc.yaml) lands here; so does the
Prefect flow, through `dvc repro`. Each stage function reads and writes the paths
lmops/stages.py declares for it; `run_stage` also records what the stage cost."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmops.config import Params
from lmops.stages import (
    BASE_DIR,
    BASE_METRICS,
    DISTILL_METRICS,
    ERRORS,
    FINETUNE_LIVE,
    FINETUNE_METRICS,
    FINETUNED_DIR,
    INGEST_METRICS,
    INGESTED_DIR,
    LABELS_DIR,
    LABELS_METRICS,
    LABELS_PAGE_DIR,
    METRICS,
    MODEL_CARD,
    ONNX_DIR,
    PLOTS_DIR,
    PRETRAIN_CHECKPOINTS,
    PRETRAIN_LIVE,
    PRETRAIN_METRICS,
    PRETRAINED_DIR,
    QUARANTINE_DIR,
    STUDENT_DIR,
    TOKENIZER_DIR,
    TOKENIZER_METRICS,
    TOKENS_DIR,
    TRAINING,
    TRITON_DIR,
    VALIDATED_DIR,
    VALIDATION_DOCS_DIR,
    VALIDATION_METRICS,
    cost_path,
)


def base_checkpoint(base_dir: Path) -> Path | None:
    """The checkpoint the base stage imported into `base_dir`, or None (from scratch)."""
    from lmops.artifacts import BaseManifest

    return None if BaseManifest.of(base_dir).kind == "none" else base_dir


def _base(params: Params, root: Path) -> Any:
    from lmops.tasks import base

    return base.run(params.model, root, root / BASE_DIR, root / BASE_METRICS)


def _ingest(params: Params, root: Path) -> Any:
    from lmops.tasks import ingest

    return ingest.run(params.data, root, root / INGESTED_DIR, root / INGEST_METRICS)


def _validate(params: Params, root: Path) -> Any:
    from lmops.tasks import validate

    return validate.run(
        params.validation,
        ingested_dir=root / INGESTED_DIR,
        validated_dir=root / VALIDATED_DIR,
        docs_dir=root / VALIDATION_DOCS_DIR,
        quarantine_root=root / QUARANTINE_DIR,
        metrics_path=root / VALIDATION_METRICS,
    )


def _labels(params: Params, root: Path) -> Any:
    from lmops.tasks import labels

    return labels.run(
        params.data,
        params.evaluate,
        validated_dir=root / VALIDATED_DIR,
        out_dir=root / LABELS_DIR,
        report_path=root / LABELS_METRICS,
        page_dir=root / LABELS_PAGE_DIR,
    )


def _tokenizer(params: Params, root: Path) -> Any:
    from lmops.tasks import tokenizer

    return tokenizer.run(
        params.tokenizer,
        params.model,
        root / VALIDATED_DIR,
        root / TOKENIZER_DIR,
        root / TOKENIZER_METRICS,
        init_dir=base_checkpoint(root / BASE_DIR),
    )


def _pretrain(params: Params, root: Path) -> Any:
    from lmops.tasks import pretrain

    return pretrain.run(
        params.pretrain,
        params.model,
        init_dir=base_checkpoint(root / BASE_DIR),
        used=params.finetune.from_pretrained,
        tokenizer_dir=root / TOKENIZER_DIR,
        validated_dir=root / VALIDATED_DIR,
        out_dir=root / PRETRAINED_DIR,
        token_dir=root / TOKENS_DIR,
        checkpoint_dir=root / PRETRAIN_CHECKPOINTS,
        live_dir=root / PRETRAIN_LIVE,
        metrics_path=root / PRETRAIN_METRICS,
    )


def _finetune(params: Params, root: Path) -> Any:
    from lmops.tasks import finetune

    return finetune.run(
        params.finetune,
        params.model,
        tokenizer_dir=root / TOKENIZER_DIR,
        pretrained_dir=root / PRETRAINED_DIR,
        validated_dir=root / VALIDATED_DIR,
        labels_dir=root / LABELS_DIR,
        out_dir=root / FINETUNED_DIR,
        live_dir=root / FINETUNE_LIVE,
        metrics_path=root / FINETUNE_METRICS,
    )


def served_model(root: Path) -> Path:
    """The model the distill stage chose to serve: the fine-tuned teacher or its student."""
    from lmops.artifacts import DistillReport

    served = DistillReport.read(root / DISTILL_METRICS).served
    return root / (STUDENT_DIR if served == "student" else FINETUNED_DIR)


def _distill(params: Params, root: Path) -> Any:
    from lmops.tasks import distill

    return distill.run(
        params.distill,
        params.finetune.ngram_channel,
        params.evaluate,
        params.model.max_length,
        finetuned_dir=root / FINETUNED_DIR,
        validated_dir=root / VALIDATED_DIR,
        labels_dir=root / LABELS_DIR,
        out_dir=root / STUDENT_DIR,
        report_path=root / DISTILL_METRICS,
    )


def _evaluate(params: Params, root: Path) -> Any:
    from lmops.tasks import evaluate

    return evaluate.run(
        params.evaluate,
        params.finetune,
        params.model,
        finetuned_dir=served_model(root),
        tokenizer_dir=root / TOKENIZER_DIR,
        validated_dir=root / VALIDATED_DIR,
        labels_dir=root / LABELS_DIR,
        metrics_path=root / METRICS,
        plots_dir=root / PLOTS_DIR,
        model_card_path=root / MODEL_CARD,
        errors_path=root / ERRORS,
        live_dirs={"pretrain": root / PRETRAIN_LIVE, "finetune": root / FINETUNE_LIVE},
        stage_runs={"pretraining": root / PRETRAIN_METRICS, "fine-tuning": root / FINETUNE_METRICS},
        cost_paths={stage: root / cost_path(stage) for stage in TRAINING},
        base_path=root / BASE_METRICS,
        distill_path=root / DISTILL_METRICS,
        labels_path=root / LABELS_METRICS,
    )


def _export(params: Params, root: Path) -> Any:
    from lmops.tasks import export

    return export.run(
        params.export,
        params.model,
        finetuned_dir=served_model(root),
        validated_dir=root / VALIDATED_DIR,
        out_dir=root / ONNX_DIR,
        triton_dir=root / TRITON_DIR,
    )


# In pipeline order (lmops.stages.PIPELINE).
STAGES: dict[str, Callable[[Params, Path], Any]] = {
    "base": _base,
    "ingest": _ingest,
    "validate": _validate,
    "labels": _labels,
    "tokenizer": _tokenizer,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "distill": _distill,
    "evaluate": _evaluate,
    "export": _export,
}


def run_stage(name: str, params: Params, root: Path) -> Any:
    """Run a stage and write what it cost to reports/cost/NAME.json (lmops/cost.py)."""
    from lmops.cost import Meter, work_of

    with Meter(name, params.cost) as meter:
        result = STAGES[name](params, root)
    meter.record(**work_of(result)).write(root / cost_path(name))
    return result
