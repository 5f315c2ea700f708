"""Distill: the fine-tuned model (the teacher) taught to a copy of itself with fewer encoder
layers (the student), for serving: a pretrained base is accurate but several times slower
per text than a small model.

The student starts from the teacher's embeddings, head and an evenly spread subset of its
layers (as DistilBERT starts from BERT) and learns from the teacher's soft labels at a
temperature, mixed with the true labels (Hinton et al. 2015). It keeps the teacher's n-gram
channel, with the transformer's share of the vote chosen again on validation, and is
calibrated on validation like the teacher.

Which one is served is decided here, on validation (never test): the student when it is
within `distill.max_accuracy_gap` of the teacher and ahead of the TF-IDF + LR baseline,
else the teacher. The evaluate and export stages then take the served one; both models are
outputs of the pipeline, so each registered version holds both.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lmops.artifacts import DistillReport
from lmops.atomic import atomic_dir, write_json
from lmops.baseline import baseline_proba
from lmops.batching import collate, encode, length_bucketed, predict_proba
from lmops.config import DistillConfig, EvaluateConfig, NgramChannelConfig
from lmops.errors import DataError
from lmops.modeling import load_tokenizer
from lmops.trainloop import (
    LossOutput,
    accelerator_for,
    optimizer_and_schedule,
    progress,
    seed_everything,
    train_step,
)

log = logging.getLogger(__name__)


def kept_layers(total: int, layers: int) -> list[int]:
    """Which of the teacher's `total` layers the student starts from: spread evenly, the
    first and the last kept."""
    if layers == 1:
        return [0]
    return sorted({round(i * (total - 1) / (layers - 1)) for i in range(layers)})


def student_of(teacher: Any, layers: int) -> Any:
    """A copy of the teacher with `layers` of its encoder layers and its temperature reset."""
    import torch

    config = teacher.encoder.config
    if config.model_type != "bert":
        raise DataError(f"distill: the teacher must be a BERT encoder (got {config.model_type})")
    if layers >= config.num_hidden_layers:
        raise DataError(
            f"distill.layers={layers} must be fewer than the teacher's "
            f"{config.num_hidden_layers} layers"
        )
    student = copy.deepcopy(teacher)
    keep = kept_layers(config.num_hidden_layers, layers)
    student.encoder.encoder.layer = torch.nn.ModuleList(
        student.encoder.encoder.layer[i] for i in keep
    )
    student.encoder.config.num_hidden_layers = layers
    student.with_temperature(1.0)
    return student


def _loss(student: Any, temperature: float, soft_weight: float) -> Any:
    import torch
    import torch.nn.functional as F

    class DistillLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = student

        def forward(
            self, input_ids: Any, attention_mask: Any, labels: Any, teacher_logits: Any
        ) -> Any:
            logits = self.classifier.transformer_logits(input_ids, attention_mask)[0].float()
            soft = F.kl_div(
                F.log_softmax(logits / temperature, -1),
                F.softmax(teacher_logits / temperature, -1),
                reduction="batchmean",
            )
            hard = F.cross_entropy(logits, labels)
            return LossOutput(soft_weight * soft * temperature**2 + (1 - soft_weight) * hard)

    return DistillLoss()


def _teacher_logits(teacher: Any, ids: list[list[int]], pad_id: int) -> Any:
    import torch

    logits = torch.zeros((len(ids), len(teacher.spec.labels)))
    teacher.eval()
    with torch.no_grad():
        for batch in length_bucketed([len(s) for s in ids], 64, seed=None):
            inputs = collate([ids[i] for i in batch], pad_id)
            logits[batch] = teacher.transformer_logits(**inputs)[0].float()
    return logits


def train_student(
    cfg: DistillConfig, teacher: Any, tokenizer: Any, train: pd.DataFrame, max_length: int
) -> Any:
    import torch

    label_ids = {name: i for i, name in enumerate(teacher.spec.labels)}
    ids = encode(tokenizer, train["text"].tolist(), max_length)
    targets = torch.tensor(train["label"].map(label_ids).to_numpy(), dtype=torch.long)
    soft_targets = _teacher_logits(teacher, ids, tokenizer.pad_token_id)
    seed_everything(cfg.seed)
    student = student_of(teacher, cfg.layers)
    model = _loss(student, cfg.temperature, cfg.soft_weight)
    accelerator = accelerator_for(cfg)
    lengths = [len(s) for s in ids]
    steps_per_epoch = len(length_bucketed(lengths, cfg.batch_size, seed=0))
    optimizer, schedule = optimizer_and_schedule(model, cfg, cfg.epochs * steps_per_epoch)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    model.train()
    for epoch in range(cfg.epochs):
        batches = length_bucketed(lengths, cfg.batch_size, seed=cfg.seed + epoch)
        for batch in progress(batches, desc=f"distill epoch {epoch + 1}/{cfg.epochs}"):
            inputs = collate([ids[i] for i in batch], tokenizer.pad_token_id)
            inputs["labels"] = targets[batch]
            inputs["teacher_logits"] = soft_targets[batch]
            train_step(model, inputs, accelerator, optimizer, schedule)
    return accelerator.unwrap_model(model).classifier.eval()


def reweigh_ngram_channel(
    cfg: NgramChannelConfig, student: Any, tokenizer: Any, val: pd.DataFrame, max_length: int
) -> None:
    """The transformer's share of the vote, chosen again for the student (its transformer
    is weaker than the teacher's, the n-gram channel the same)."""
    from lmops.tasks.finetune import choose_transformer_weight

    if student.ngram is None:
        return
    texts = val["text"].tolist()
    targets = val["label"].map({n: i for i, n in enumerate(student.spec.labels)}).to_numpy()
    transformer = predict_proba(student, tokenizer, texts, max_length, transformer_only=True)
    student.with_ngram(student.ngram, student.spec.ngram, 0.0)
    ngram = predict_proba(student, tokenizer, texts, max_length)
    weight, _ = choose_transformer_weight(cfg.transformer_weights, transformer, ngram, targets)
    student.with_ngram(student.ngram, student.spec.ngram, weight)


def choose(
    cfg: DistillConfig, teacher_layers: int, teacher: float, student: float, baseline: float
) -> DistillReport:
    """The served model, on validation accuracy: the student when it is within the gap of
    the teacher and ahead of the baseline."""
    close = student >= teacher - cfg.max_accuracy_gap
    ahead = student > baseline
    if close and ahead:
        served, why = "student", "within the gap of the teacher and ahead of the baseline"
    elif not close:
        served = "teacher"
        why = f"the student trails the teacher by more than {cfg.max_accuracy_gap:.4f}"
    else:
        served, why = "teacher", "the student does not beat the baseline"
    return DistillReport(
        served=served,
        why=why,
        teacher_layers=teacher_layers,
        teacher_val_accuracy=round(teacher, 5),
        student_layers=cfg.layers,
        student_val_accuracy=round(student, 5),
        baseline_val_accuracy=round(baseline, 5),
        max_accuracy_gap=cfg.max_accuracy_gap,
    )


def run(
    cfg: DistillConfig,
    channel_cfg: NgramChannelConfig,
    evaluate_cfg: EvaluateConfig,
    max_length: int,
    finetuned_dir: Path,
    validated_dir: Path,
    labels_dir: Path,
    out_dir: Path,
    report_path: Path,
) -> DistillReport:
    from lmops.classifier import load, save
    from lmops.tasks.finetune import calibrate

    started = time.perf_counter()
    teacher = load(finetuned_dir)
    teacher_layers = teacher.encoder.config.num_hidden_layers
    if not cfg.enabled:
        report = DistillReport(
            served="teacher", why="distill.enabled is false", teacher_layers=teacher_layers
        )
        with atomic_dir(out_dir) as scratch:
            write_json(scratch / "skipped.json", {"why": report.why})
        report.write(report_path)
        return report
    tokenizer = load_tokenizer(finetuned_dir)
    train = pd.read_parquet(labels_dir / "train.parquet")  # the rows the labels stage kept
    val = pd.read_parquet(validated_dir / "val.parquet")
    student = train_student(cfg, teacher, tokenizer, train, max_length)
    reweigh_ngram_channel(channel_cfg, student, tokenizer, val, max_length)
    calibrate(student, tokenizer, val, max_length)
    labels = teacher.spec.labels
    targets = val["label"].map({n: i for i, n in enumerate(labels)}).to_numpy()
    texts = val["text"].tolist()

    def accuracy(probs: Any) -> float:
        return float((probs.argmax(1) == targets).mean())

    report = choose(
        cfg,
        teacher_layers,
        accuracy(predict_proba(teacher, tokenizer, texts, max_length)),
        accuracy(predict_proba(student, tokenizer, texts, max_length)),
        accuracy(baseline_proba(evaluate_cfg, train, texts, labels)),
    )
    report = report.model_copy(update={"seconds": round(time.perf_counter() - started, 2)})
    with atomic_dir(out_dir) as scratch:
        save(student, scratch)
        tokenizer.save_pretrained(str(scratch))
    report.write(report_path)
    log.info("distill: %s", report.line().removeprefix("- distillation: "))
    return report
