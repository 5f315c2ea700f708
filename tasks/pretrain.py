"""Pretrain: a transformer language model from scratch on the corpus plus the training
split — masked-LM for encoders (BERT), causal-LM for decoders (GPT-2).

One linear loop: packed sequences, AdamW with warm-up, checkpoints every N steps. A
restarted run finds the last checkpoint whose fingerprint matches this run's params,
tokenizer and data, and continues from its step; nothing else ever resumes from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmops import tokens
from lmops.atomic import atomic_dir, write_json
from lmops.config import ModelConfig, PretrainConfig
from lmops.errors import DataError
from lmops.modeling import count_parameters, language_model, load_tokenizer
from lmops.tokens import Windows
from lmops.trainloop import (
    LossOutput,
    accelerator_for,
    device_peak_flops,
    flops_per_token,
    live_logger,
    optimizer_and_schedule,
    perplexity,
    progress,
    seed_everything,
    train_step,
)

log = logging.getLogger(__name__)


def _collator(tokenizer: Any, architecture: str, mask_probability: float) -> Any:
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(
        tokenizer,
        mlm=architecture == "bert",
        mlm_probability=mask_probability,
        return_tensors="pt",
    )


def masked_positions_only(language_model: Any, input_ngrams: Any = None) -> Any:
    """BERT masked-LM whose prediction head runs only on the masked positions.

    The head maps every position to the whole vocabulary (8k x 256 per token here, ~40% of
    the model's FLOPs), yet only the masked positions enter the loss. Same loss as the
    Hugging Face model; the language model itself is `.lm`. With `input_ngrams`
    (lmops/ngrams.py) their embeddings are added to the token embeddings; an n-gram that
    covers a masked position holds [MASK], so it reveals nothing the token would not.
    """
    import torch

    class MaskedPositionsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = language_model
            self.input_ngrams = input_ngrams

        def forward(self, input_ids: Any, labels: Any, **_: Any) -> Any:
            if self.input_ngrams is None:
                hidden = self.lm.bert(input_ids=input_ids).last_hidden_state
            else:
                embeds = self.lm.bert.embeddings.word_embeddings(input_ids)
                embeds = embeds + self.input_ngrams(input_ids, torch.ones_like(input_ids))
                hidden = self.lm.bert(inputs_embeds=embeds).last_hidden_state
            masked = labels != -100
            logits = self.lm.cls(hidden[masked])
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[masked])
            return LossOutput(loss)

    return MaskedPositionsOnly()


def lm_flops_per_token(config: Any, seq_len: int, mask_probability: float, ngram_dim: int) -> float:
    """Training FLOPs per token (lmops/trainloop.py) of the language model `config`
    describes. Masked-LM's head (a hidden x hidden transform, then the vocabulary) runs on
    the masked positions only (`masked_positions_only`): `mask_probability` of the tokens,
    a little fewer in fact, as [CLS] and [SEP] are never masked. Causal-LM's vocabulary
    projection runs on every position. `ngram_dim`: the n-gram embeddings' width (0: none)."""
    hidden, vocab = config.hidden_size, config.vocab_size
    if config.model_type == "bert":
        return flops_per_token(
            config, seq_len, hidden * (hidden + vocab), mask_probability, ngram_dim * hidden
        )
    return flops_per_token(config, seq_len, hidden * vocab)


def unigram_perplexity(train: Windows, val: Windows, tokenizer: Any) -> float:
    """Perplexity on the validation tokens of a model that knows only the training token
    frequencies (add-one smoothed) — the level a language model that learnt nothing sits
    at. Masked positions are drawn uniformly from non-special tokens, so this is the
    masked-LM loss's floor too."""
    vocab = len(tokenizer)
    special = list(tokenizer.all_special_ids)
    train_counts, val_counts = (w.token_counts(vocab).astype(np.float64) for w in (train, val))
    train_counts[special] = val_counts[special] = 0
    log_p = np.log((train_counts + 1) / (train_counts.sum() + vocab))
    return perplexity(float(-(val_counts * log_p).sum() / val_counts.sum()))


def _language_model_from(init_dir: Path, model_cfg: ModelConfig, dropout: float) -> Any:
    """A user's checkpoint as a masked-LM to continue pretraining (domain-adaptive); a
    checkpoint saved without its LM head gets a fresh one."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(str(init_dir))
    if config.model_type != "bert" or model_cfg.architecture != "bert":
        raise DataError(
            f"model.init_from: continuing pretraining needs a BERT checkpoint with "
            f"model.architecture=bert (got {config.model_type}); set "
            "model.init_pretraining=skip to fine-tune it directly"
        )
    if config.max_position_embeddings < model_cfg.max_length:
        raise DataError(
            f"model.init_from: the checkpoint takes at most {config.max_position_embeddings} "
            f"positions, fewer than model.max_length={model_cfg.max_length}"
        )
    return AutoModelForMaskedLM.from_pretrained(
        str(init_dir), hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
    )


def _skip(
    out_dir: Path, token_dir: Path, live_dir: Path, metrics_path: Path, why: str
) -> dict[str, Any]:
    metrics = {"objective": f"none ({why})", "steps": 0}
    for folder in (out_dir, token_dir):
        with atomic_dir(folder) as scratch:
            write_json(scratch / "skipped.json", metrics)
    # The stage's other outputs exist too, saying why they hold no curves (DVC wants them).
    write_json(live_dir / "skipped.json", metrics)
    write_json(metrics_path, metrics)
    log.info("pretrain: skipped: %s", why)
    return metrics


def _skip_with_init(
    init_dir: Path, out_dir: Path, token_dir: Path, live_dir: Path, metrics_path: Path
) -> dict[str, Any]:
    """model.init_pretraining=skip: the checkpoint is the pretrained encoder, as it is."""
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(str(init_dir))
    with atomic_dir(out_dir) as scratch:
        encoder.save_pretrained(str(scratch), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(init_dir)).save_pretrained(str(scratch))
    metrics = {
        "objective": "none (model.init_pretraining=skip)",
        "init_from": str(init_dir),
        "parameters": count_parameters(encoder),
        "steps": 0,
    }
    with atomic_dir(token_dir) as scratch:
        write_json(scratch / "skipped.json", metrics)
    write_json(live_dir / "skipped.json", metrics)
    write_json(metrics_path, metrics)
    log.info("pretrain: skipped; the encoder is %s as it is", init_dir)
    return metrics


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dir_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


class Checkpoints:
    """`checkpoint_dir/step-N/` written atomically; only the newest is kept."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint

    def latest(self) -> tuple[int, Path] | None:
        found = []
        for state in self.directory.glob("step-*/lmops_state.json"):
            meta = json.loads(state.read_text(encoding="utf-8"))
            if meta.get("fingerprint") == self.fingerprint:
                found.append((meta["step"], state.parent))
        return max(found) if found else None

    def save(self, accelerator: Any, step: int) -> None:
        """Every process saves its part (its RNG state); the main process publishes."""
        target = self.directory / f"step-{step}"
        scratch = self.directory / f".step-{step}.tmp"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(scratch, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(scratch))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "fingerprint": self.fingerprint}
            write_json(scratch / "lmops_state.json", state)
            # A checkpoint of the same step from other data or params (not resumed) goes.
            shutil.rmtree(target, ignore_errors=True)
            os.replace(scratch, target)
            for old in self.directory.glob("step-*"):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _pass_order(rows: int, seed: int) -> Any:
    """One pass's seeded order of the rows, drawn once per pass (drawing it every step
    cost time in proportion to the corpus: 0.32 s a step at 100x the news corpus)."""
    import torch

    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return order.to(torch.int32) if rows < 2**31 else order


def _batch_indices(step: int, batch: int, rows: int, seed: int, rank: int, world: int) -> Any:
    """Rows for this process at `step`: a fresh seeded permutation each pass over the data,
    so a resumed run draws exactly the batches the killed run would have drawn."""
    per_step = batch * world
    steps_per_pass = rows // per_step
    pass_index, offset = divmod(step, steps_per_pass)
    start = offset * per_step + rank * batch
    return _pass_order(rows, seed + pass_index)[start : start + batch].long()


def evaluate_loss(
    model: Any, rows: Windows, collator: Any, cfg: PretrainConfig, device: Any
) -> float:
    """Mean LM loss over the first `eval_batches` validation batches, with fixed masking."""
    import torch

    model.eval()
    losses = []
    end = min(len(rows), cfg.eval_batches * cfg.batch_size)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        for start in range(0, end, cfg.batch_size):
            window = rows.rows(range(start, min(end, start + cfg.batch_size)))
            batch = collator([{"input_ids": r} for r in window])
            out = model(**{k: v.to(device) for k, v in batch.items()})
            losses.append(out.loss.item())
    model.train()
    return sum(losses) / len(losses)


def run(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    tokenizer_dir: Path,
    validated_dir: Path,
    out_dir: Path,
    token_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path,
    metrics_path: Path,
    init_dir: Path | None = None,
    used: bool = True,
) -> dict[str, Any]:
    """Pretrain; `used` is false when fine-tuning starts from random weights
    (`finetune.from_pretrained: false`), and then nothing is trained for nobody. The texts
    are tokenized once into `token_dir` (lmops/tokens.py) and windows are read from there."""

    if not used:
        return _skip(
            out_dir, token_dir, live_dir, metrics_path, "finetune.from_pretrained is false"
        )
    if init_dir is not None and model_cfg.init_pretraining == "skip":
        return _skip_with_init(init_dir, out_dir, token_dir, live_dir, metrics_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer_sha256 = _dir_digest(tokenizer_dir)
    accelerator = accelerator_for(cfg)
    world = accelerator.num_processes
    # Task-adaptive pretraining: `pretrain.texts` may leave the general corpus out.
    sources = {
        "train": [validated_dir / f"{table}.parquet" for table in cfg.texts],
        "val": [validated_dir / "val.parquet"],
    }
    if accelerator.is_main_process:
        with atomic_dir(token_dir) as scratch:  # the folder DVC tracks appears whole
            for split, tables in sources.items():
                made = tokens.write(
                    tokens.parquet_texts(tables), tokenizer, scratch / split, tokenizer_sha256
                )
                log.info(
                    "pretrain: %s: %d documents, %d tokens", split, made.documents, made.tokens
                )
    accelerator.wait_for_everyone()
    train_rows, val_rows = (
        Windows(
            token_dir / split,
            model_cfg.max_length,
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            tokenizer_sha256,
        )
        for split in sources
    )

    if len(train_rows) < cfg.batch_size * world:
        raise DataError(
            f"pretrain: the corpus + train split pack into {len(train_rows)} sequences of "
            f"model.max_length={model_cfg.max_length} tokens, fewer than one batch "
            f"(pretrain.batch_size={cfg.batch_size} x {world} process(es)); add text or "
            "lower them"
        )
    if len(val_rows) == 0:
        raise DataError(
            f"pretrain: the val split is shorter than one sequence of "
            f"model.max_length={model_cfg.max_length} tokens; perplexity cannot be measured"
        )

    seed_everything(cfg.seed)
    if init_dir is None:
        # Pretraining has its own dropout (none, as in Cramming: one pass never overfits).
        model = language_model(model_cfg.model_copy(update={"dropout": cfg.dropout}), tokenizer)
    else:
        model = _language_model_from(init_dir, model_cfg, cfg.dropout)
    n_params = count_parameters(model)
    flops_token = lm_flops_per_token(
        model.config,
        model_cfg.max_length,
        cfg.mask_probability,
        model_cfg.input_ngram_dim if model_cfg.input_ngram_order else 0,
    )
    if model_cfg.architecture == "bert":
        from lmops.classifier import input_ngram_spec
        from lmops.ngrams import ngram_embedding

        spec = input_ngram_spec(model_cfg, tokenizer)
        ngrams = (
            ngram_embedding(
                spec.vocab_size, spec.order, spec.buckets, spec.dim, model.config.hidden_size
            )
            if spec
            else None
        )
        model = masked_positions_only(model, ngrams)
    optimizer, schedule = optimizer_and_schedule(model, cfg, cfg.steps)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    collator = _collator(tokenizer, model_cfg.architecture, cfg.mask_probability)

    checkpoints = Checkpoints(
        checkpoint_dir,
        _fingerprint(
            cfg.model_dump(),
            model_cfg.model_dump(),
            _dir_digest(tokenizer_dir),
            # The token windows themselves: changed data never resumes a stale checkpoint.
            train_rows.digest(),
            world,
        ),
    )
    start_step = 0
    if (latest := checkpoints.latest()) is not None:
        start_step, state_dir = latest
        accelerator.load_state(str(state_dir))
        log.info("pretrain: resuming from the checkpoint at step %d (%s)", start_step, state_dir)
    live = live_logger(live_dir, resume=start_step > 0) if accelerator.is_main_process else None
    if live is not None:
        # The curve goes on from the checkpoint's step; steps logged after it are replayed.
        live.step = start_step

    tokens_per_step = cfg.batch_size * world * model_cfg.max_length
    # Tokens/s counts every process's tokens, so the peak is that of all their devices.
    device_peak = device_peak_flops(accelerator)
    peak = device_peak * world if device_peak else None
    model.train()
    started = time.perf_counter()
    shown = progress(
        range(start_step, cfg.steps),
        desc="pretrain",
        total=cfg.steps,
        initial=start_step,
        disable=not accelerator.is_local_main_process,
    )
    window_start, window_tokens = time.perf_counter(), 0
    for step in shown:
        rows = train_rows.rows(
            _batch_indices(
                step, cfg.batch_size, len(train_rows), cfg.seed, accelerator.process_index, world
            ).tolist()
        )
        batch = collator([{"input_ids": r} for r in rows])
        loss = train_step(model, batch, accelerator, optimizer, schedule).item()
        window_tokens += tokens_per_step
        elapsed = time.perf_counter() - window_start
        tokens_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
        shown.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if live is not None:
            live.log_metric("train/loss", loss)
            live.log_metric("train/perplexity", perplexity(loss))
            live.log_metric("train/learning_rate", schedule.get_last_lr()[0])
            live.log_metric("train/tokens_per_s", tokens_per_s)
            if peak:
                live.log_metric("train/mfu", tokens_per_s * flops_token / peak)
            live.next_step()
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoints.save(accelerator, step + 1)
    seconds = time.perf_counter() - started
    trained_steps = cfg.steps - start_step

    unwrapped = accelerator.unwrap_model(model)
    val_loss = evaluate_loss(unwrapped, val_rows, collator, cfg, accelerator.device)
    trained_lm = getattr(unwrapped, "lm", unwrapped)
    trained_ngrams = getattr(unwrapped, "input_ngrams", None)
    tokens_per_s = trained_steps * tokens_per_step / seconds if seconds > 0 else 0.0
    metrics = {
        "objective": "masked-lm" if model_cfg.architecture == "bert" else "causal-lm",
        "parameters": n_params,
        "steps": cfg.steps,
        "resumed_from_step": start_step,
        "val_loss": round(val_loss, 5),
        "val_perplexity": round(perplexity(val_loss), 4),
        # What knowing only token frequencies gives: the floor pretraining must get under.
        "val_unigram_perplexity": round(unigram_perplexity(train_rows, val_rows, tokenizer), 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "train_tokens": cfg.steps * tokens_per_step,
        # This run's work (lmops/cost.py), without the steps a resumed checkpoint had done.
        "tokens_this_run": trained_steps * tokens_per_step,
        "flops_this_run": round(trained_steps * tokens_per_step * flops_token),
        "seconds": round(seconds, 2),
        "device": str(accelerator.device),
        "precision": accelerator.mixed_precision,
    }
    if peak:
        metrics["mfu"] = round(tokens_per_s * flops_token / peak, 4)
    if accelerator.is_main_process:
        with atomic_dir(out_dir) as scratch:
            trained_lm.save_pretrained(str(scratch), safe_serialization=True)
            # With its tokenizer the directory is a whole checkpoint: model.init_from of a
            # later run (or any Hugging Face tool) can start from it.
            tokenizer.save_pretrained(str(scratch))
            if trained_ngrams is not None:
                from safetensors.torch import save_file

                from lmops.classifier import INPUT_NGRAMS_FILE

                save_file(trained_ngrams.state_dict(), str(scratch / INPUT_NGRAMS_FILE))
        write_json(metrics_path, metrics)
        live.end()
        checkpoints.clear()
    log.info("pretrain: %s", metrics)
    return metrics
