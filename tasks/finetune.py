"""Finetune: a sequence classifier initialised from the pretrained language model (or
from random weights, the ablation), with early stopping on the validation loss.

Label names and ids come from the data (sorted label names, ids in that order).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lmops.atomic import atomic_dir, write_json
from lmops.batching import collate, encode, length_bucketed, predict_proba
from lmops.config import FinetuneConfig, ModelConfig, NgramChannelConfig
from lmops.errors import DataError
from lmops.modeling import build_config, load_tokenizer
from lmops.trainloop import (
    LossOutput,
    accelerator_for,
    device_peak_flops,
    live_logger,
    optimizer_and_schedule,
    progress,
    seed_everything,
    train_step,
)

log = logging.getLogger(__name__)


def _classifier(
    model_cfg: ModelConfig, tokenizer: Any, labels: list[str], pretrained_dir: Path | None
) -> Any:
    from lmops.classifier import from_pretrained_encoder, input_ngram_spec, new_classifier

    ngrams = input_ngram_spec(model_cfg, tokenizer)
    if pretrained_dir is None:
        config = build_config(model_cfg, tokenizer)
        return new_classifier(config, labels, model_cfg.dropout, ngrams)
    return from_pretrained_encoder(pretrained_dir, labels, model_cfg.dropout, ngrams)


def _with_loss(model: Any, label_smoothing: float) -> Any:
    """The classifier as a training step wants it: a `.loss` from (ids, mask, labels)."""
    import torch

    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = model

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
            logits, _ = self.classifier.transformer_logits(input_ids, attention_mask)
            loss = torch.nn.functional.cross_entropy(
                logits.float(), labels, label_smoothing=label_smoothing
            )
            return LossOutput(loss)

    return WithLoss()


def _val_loss_and_accuracy(
    model: Any, tokenizer: Any, texts: list[str], targets: Any, max_length: int
) -> tuple[float, float]:
    from lmops.ngrams import log_loss

    probs = predict_proba(model, tokenizer, texts, max_length)
    return log_loss(probs, targets), float((probs.argmax(1) == targets).mean())


def train_classifier(
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    labels: list[str],
    train: pd.DataFrame,
    val: pd.DataFrame,
    pretrained_dir: Path | None,
    live_dir: Path | None,
) -> tuple[Any, dict[str, Any]]:
    """Train; return the best model (lowest validation loss) and the training history."""
    label_ids = {name: i for i, name in enumerate(labels)}
    train_ids = encode(tokenizer, train["text"].tolist(), model_cfg.max_length)
    train_targets = train["label"].map(label_ids).to_numpy()
    val_targets = val["label"].map(label_ids).to_numpy()
    accelerator = accelerator_for(cfg)
    if len(train_ids) < cfg.batch_size * accelerator.num_processes:
        raise DataError(
            f"finetune: {len(train_ids)} training texts are fewer than one batch "
            f"(finetune.batch_size={cfg.batch_size} x {accelerator.num_processes} process(es))"
        )
    seed_everything(cfg.seed)
    classifier = _classifier(model_cfg, tokenizer, labels, pretrained_dir)
    model = _with_loss(classifier, cfg.label_smoothing)
    lengths = [len(s) for s in train_ids]
    # Model FLOPs of each training text, padding left out: what MFU counts as work done.
    text_flops = [n * classifier.flops_per_token(n) for n in lengths]
    steps_per_epoch = len(length_bucketed(lengths, cfg.batch_size, seed=0))
    steps_per_epoch //= accelerator.num_processes
    optimizer, schedule = optimizer_and_schedule(model, cfg, cfg.epochs * steps_per_epoch)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    live = live_logger(live_dir, resume=False) if live_dir and accelerator.is_main_process else None

    import torch

    peak = device_peak_flops(accelerator)
    best: dict[str, Any] = {"val_loss": float("inf")}
    history, stale_epochs, started, seen = [], 0, time.perf_counter(), 0
    # This process's tokens, FLOPs and seconds in training steps (validation is not training).
    train_tokens, train_flops, train_seconds = 0, 0.0, 0.0
    for epoch in range(cfg.epochs):
        model.train()
        batches = length_bucketed(lengths, cfg.batch_size, seed=cfg.seed + epoch)
        mine = batches[accelerator.process_index :: accelerator.num_processes][:steps_per_epoch]
        epoch_started = time.perf_counter()
        for batch in progress(
            mine,
            desc=f"finetune epoch {epoch + 1}/{cfg.epochs}",
            disable=not accelerator.is_local_main_process,
        ):
            inputs = collate([train_ids[i] for i in batch], tokenizer.pad_token_id)
            inputs["labels"] = torch.tensor(train_targets[batch], dtype=torch.long)
            loss = train_step(model, inputs, accelerator, optimizer, schedule)
            seen += len(batch)
            train_tokens += sum(lengths[i] for i in batch)
            train_flops += sum(text_flops[i] for i in batch)
            if live is not None:
                live.log_metric("train/loss", loss.item())
                live.log_metric("train/learning_rate", schedule.get_last_lr()[0])
                if peak:
                    elapsed = train_seconds + time.perf_counter() - epoch_started
                    live.log_metric("train/mfu", train_flops / elapsed / peak)
                live.next_step()
        train_seconds += time.perf_counter() - epoch_started
        unwrapped = accelerator.unwrap_model(model).classifier
        val_loss, val_accuracy = _val_loss_and_accuracy(
            unwrapped, tokenizer, val["text"].tolist(), val_targets, model_cfg.max_length
        )
        history.append(
            {
                "epoch": epoch + 1,
                "val_loss": round(val_loss, 5),
                "val_accuracy": round(val_accuracy, 5),
            }
        )
        log.info(
            "finetune: epoch %d val_loss %.4f val_accuracy %.4f", epoch + 1, val_loss, val_accuracy
        )
        if live is not None:
            live.log_metric("val/loss", val_loss, plot=True)
            live.log_metric("val/accuracy", val_accuracy, plot=True)
        if val_loss < best["val_loss"]:
            best = {
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "epoch": epoch + 1,
                "state": copy.deepcopy(unwrapped.state_dict()),
            }
            stale_epochs = 0
        else:
            stale_epochs += 1
            if cfg.patience and stale_epochs >= cfg.patience:
                log.info(
                    "finetune: early stop after epoch %d (best was %d)", epoch + 1, best["epoch"]
                )
                break
    if live is not None:
        live.end()
    seconds = time.perf_counter() - started
    model = accelerator.unwrap_model(model).classifier
    model.load_state_dict(best.pop("state"))
    summary = {
        "from_pretrained": pretrained_dir is not None,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "val_loss": round(best["val_loss"], 5),
        "val_accuracy": round(best["val_accuracy"], 5),
        "history": history,
        "seconds": round(seconds, 2),
        "train_examples_per_s": round(seen / seconds, 1) if seconds else 0.0,
        "device": str(accelerator.device),
        "precision": accelerator.mixed_precision,
        # The work of every process (lmops/cost.py), padding left out.
        "tokens_this_run": train_tokens * accelerator.num_processes,
        "flops_this_run": round(train_flops * accelerator.num_processes),
        "_main": accelerator.is_main_process,
    }
    if peak and train_seconds > 0:
        summary["mfu"] = round(train_flops / train_seconds / peak, 4)
    return model, summary


def choose_transformer_weight(
    weights: list[float], transformer_probs: Any, ngram_probs: Any, targets: Any
) -> tuple[float, dict[float, float]]:
    """The transformer's share of the served vote with the lowest validation log-loss."""
    from lmops.ngrams import log_loss, mix

    losses = {w: log_loss(mix(transformer_probs, ngram_probs, w), targets) for w in weights}
    return min(losses, key=losses.get), losses


def attach_ngram_channel(
    cfg: NgramChannelConfig,
    model: Any,
    tokenizer: Any,
    train: pd.DataFrame,
    val: pd.DataFrame,
    max_length: int,
) -> dict[str, Any]:
    """Fit the hashed n-gram logistic regression on the train split and put it inside the
    classifier; C and the transformer's share of the vote are chosen by validation
    log-loss (never on test)."""
    import numpy as np

    from lmops.classifier import NgramSpec
    from lmops.ngrams import fit_logistic, mix, ngram_module

    started = time.perf_counter()
    label_ids = {name: i for i, name in enumerate(model.spec.labels)}
    train_targets = train["label"].map(label_ids).to_numpy()
    val_targets = val["label"].map(label_ids).to_numpy()
    spec = NgramSpec(
        order=cfg.order,
        buckets=cfg.buckets,
        vocab_size=len(tokenizer),
        special_ids=sorted({tokenizer.cls_token_id, tokenizer.sep_token_id}),
    )
    fitted = fit_logistic(
        encode(tokenizer, train["text"].tolist(), max_length),
        train_targets,
        encode(tokenizer, val["text"].tolist(), max_length),
        val_targets,
        len(label_ids),
        set(spec.special_ids) | {tokenizer.pad_token_id},
        spec.vocab_size,
        cfg.order,
        cfg.buckets,
        cfg.min_df,
        cfg.C,
    )
    transformer_probs = predict_proba(
        model, tokenizer, val["text"].tolist(), max_length, transformer_only=True
    )
    weight, losses = choose_transformer_weight(
        cfg.transformer_weights, transformer_probs, fitted["val_probs"], val_targets
    )
    module = ngram_module(
        fitted["weights"],
        fitted["idf"],
        fitted["bias"],
        spec.vocab_size,
        cfg.order,
        spec.special_ids,
    )
    model.with_ngram(module, spec, weight)

    def accuracy(probs: Any) -> float:
        return round(float((probs.argmax(1) == val_targets).mean()), 5)

    return {
        "C": fitted["C"],
        "transformer_weight": weight,
        "val_log_loss_by_weight": {str(w): round(v, 5) for w, v in losses.items()},
        "val_accuracy_ngram": accuracy(fitted["val_probs"]),
        "val_accuracy_transformer": accuracy(transformer_probs),
        "val_accuracy_combined": accuracy(mix(transformer_probs, fitted["val_probs"], weight)),
        "used_buckets": int(np.count_nonzero(fitted["idf"])),
        "seconds": round(time.perf_counter() - started, 2),
    }


def calibrate(model: Any, tokenizer: Any, val: pd.DataFrame, max_length: int) -> dict[str, Any]:
    """Fit the served model's temperature on the val split (what export puts in the
    manifest and the engine divides the logits by)."""
    from lmops.calibration import apply_temperature, fit_temperature
    from lmops.ngrams import log_loss

    probs = predict_proba(model, tokenizer, val["text"].tolist(), max_length)
    targets = val["label"].map({n: i for i, n in enumerate(model.spec.labels)}).to_numpy()
    temperature = round(fit_temperature(probs, targets), 5)
    model.with_temperature(temperature)
    return {
        "temperature": temperature,
        "val_log_loss_before": round(log_loss(probs, targets), 5),
        "val_log_loss_after": round(log_loss(apply_temperature(probs, temperature), targets), 5),
    }


def run(
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    tokenizer_dir: Path,
    pretrained_dir: Path,
    validated_dir: Path,
    labels_dir: Path,
    out_dir: Path,
    live_dir: Path,
    metrics_path: Path,
) -> dict[str, Any]:
    """Fine-tune on the training rows the labels stage kept (`labels_dir`: all of them
    unless data.label_issues is drop_train), and choose on validation."""
    tokenizer = load_tokenizer(tokenizer_dir)
    train = pd.read_parquet(labels_dir / "train.parquet")
    val = pd.read_parquet(validated_dir / "val.parquet")
    labels = sorted(train["label"].unique())
    model, summary = train_classifier(
        cfg,
        model_cfg,
        tokenizer,
        labels,
        train,
        val,
        pretrained_dir if cfg.from_pretrained else None,
        live_dir,
    )
    if cfg.ngram_channel.enabled:
        summary["ngram_channel"] = attach_ngram_channel(
            cfg.ngram_channel, model, tokenizer, train, val, model_cfg.max_length
        )
    summary["calibration"] = calibrate(model, tokenizer, val, model_cfg.max_length)
    if summary.pop("_main"):
        from lmops.classifier import save

        with atomic_dir(out_dir) as scratch:
            save(model, scratch)
            tokenizer.save_pretrained(str(scratch))
        write_json(metrics_path, summary)
    log.info(
        "finetune: wrote %s: %s", out_dir, {k: v for k, v in summary.items() if k != "history"}
    )
    return summary
