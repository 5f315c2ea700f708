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
from lmops.config import FinetuneConfig, ModelConfig
from lmops.errors import DataError
from lmops.modeling import build_config, load_tokenizer
from lmops.trainloop import (
    accelerator_for,
    live_logger,
    optimizer_and_schedule,
    seed_everything,
    train_step,
)

log = logging.getLogger(__name__)


def _classifier(
    model_cfg: ModelConfig, tokenizer: Any, labels: list[str], pretrained_dir: Path | None
) -> Any:
    from transformers import AutoModelForSequenceClassification

    label_maps = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    if pretrained_dir is None:
        return AutoModelForSequenceClassification.from_config(
            build_config(model_cfg, tokenizer, **label_maps)
        )
    return AutoModelForSequenceClassification.from_pretrained(str(pretrained_dir), **label_maps)


def _val_loss_and_accuracy(
    model: Any, tokenizer: Any, texts: list[str], targets: Any, max_length: int
) -> tuple[float, float]:
    import numpy as np

    probs = predict_proba(model, tokenizer, texts, max_length)
    picked = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)
    return float(-np.log(picked).mean()), float((probs.argmax(1) == targets).mean())


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
    model = _classifier(model_cfg, tokenizer, labels, pretrained_dir)
    lengths = [len(s) for s in train_ids]
    steps_per_epoch = len(length_bucketed(lengths, cfg.batch_size, seed=0))
    steps_per_epoch //= accelerator.num_processes
    optimizer, schedule = optimizer_and_schedule(model, cfg, cfg.epochs * steps_per_epoch)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    live = live_logger(live_dir, resume=False) if live_dir and accelerator.is_main_process else None

    import torch
    from tqdm.auto import tqdm

    best: dict[str, Any] = {"val_loss": float("inf")}
    history, stale_epochs, started, seen = [], 0, time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        model.train()
        batches = length_bucketed(lengths, cfg.batch_size, seed=cfg.seed + epoch)
        mine = batches[accelerator.process_index :: accelerator.num_processes][:steps_per_epoch]
        for batch in tqdm(
            mine,
            desc=f"finetune epoch {epoch + 1}/{cfg.epochs}",
            disable=not accelerator.is_local_main_process,
        ):
            inputs = collate([train_ids[i] for i in batch], tokenizer.pad_token_id)
            inputs["labels"] = torch.tensor(train_targets[batch], dtype=torch.long)
            loss = train_step(model, inputs, accelerator, optimizer, schedule)
            seen += len(batch)
            if live is not None:
                live.log_metric("train/loss", loss.item())
                live.log_metric("train/learning_rate", schedule.get_last_lr()[0])
                live.next_step()
        unwrapped = accelerator.unwrap_model(model)
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
    model = accelerator.unwrap_model(model)
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
        "_main": accelerator.is_main_process,
    }
    return model, summary


def run(
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    tokenizer_dir: Path,
    pretrained_dir: Path,
    validated_dir: Path,
    out_dir: Path,
    live_dir: Path,
    metrics_path: Path,
) -> dict[str, Any]:
    tokenizer = load_tokenizer(tokenizer_dir)
    train = pd.read_parquet(validated_dir / "train.parquet")
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
    if summary.pop("_main"):
        with atomic_dir(out_dir) as scratch:
            model.save_pretrained(str(scratch), safe_serialization=True)
            tokenizer.save_pretrained(str(scratch))
        write_json(metrics_path, summary)
    log.info(
        "finetune: wrote %s: %s", out_dir, {k: v for k, v in summary.items() if k != "history"}
    )
    return summary
