"""Tokenizer: trained here with Hugging Face `tokenizers` on the corpus plus the training
split (never val or test), saved so `AutoTokenizer.from_pretrained(dir)` loads it offline.

CJK text: WordPiece splits every CJK character into its own token (BERT's
`handle_chinese_chars`); BPE learns merges from raw text, so frequent Chinese words become
single tokens. Latin text gets word pieces in both.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from lmops.atomic import atomic_dir, write_json
from lmops.config import ModelConfig, TokenizerConfig
from lmops.tokens import parquet_texts

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _texts(validated_dir: Path, sample_docs: int | None) -> Iterator[str]:
    """The corpus and train texts, a chunk at a time; or a seeded uniform sample of
    `sample_docs` of them (reservoir sampling: memory holds the sample, never the tables)."""
    chunks = parquet_texts(validated_dir / f"{table}.parquet" for table in ("corpus", "train"))
    if sample_docs is None:
        for chunk in chunks:
            yield from chunk
        return
    rng = random.Random(0)
    sample: list[str] = []
    seen = 0
    for chunk in chunks:
        for text in chunk:
            seen += 1
            if len(sample) < sample_docs:
                sample.append(text)
            elif (slot := rng.randrange(seen)) < sample_docs:
                sample[slot] = text
    log.info("tokenizer: trains on %d of %d documents (tokenizer.sample_docs)", len(sample), seen)
    yield from sample


def _train_backend(cfg: TokenizerConfig, texts: Iterator[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if cfg.kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        # NFKC first: served text arrives un-normalised (full-width "，" must not be [UNK]).
        tokenizer.normalizer = normalizers.Sequence(
            [
                normalizers.NFKC(),
                normalizers.BertNormalizer(
                    clean_text=True,
                    handle_chinese_chars=True,
                    strip_accents=None,
                    lowercase=cfg.lowercase,
                ),
            ]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        # limit_alphabet: the trainer keeps only 1,000 distinct characters by default,
        # which left 6.7% of Chinese review tokens unknown.
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            limit_alphabet=cfg.limit_alphabet,
        )
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
        tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            max_token_length=8,
            limit_alphabet=cfg.limit_alphabet,
        )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build(cfg: TokenizerConfig, model_cfg: ModelConfig, texts: Iterator[str]) -> Any:
    """A trained fast tokenizer that adds `[CLS] … [SEP]` and truncates at max_length."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = _train_backend(cfg, texts)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    # A tokenizer trained from scratch has no post-processor: without this, encodings
    # silently lack [CLS]/[SEP] and a classifier pools an ordinary token.
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_cfg.max_length,
    )


def unknown_rate(tokenizer: Any, texts: list[str]) -> float:
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    total = sum(len(seq) for seq in ids)
    unknown = sum(seq.count(tokenizer.unk_token_id) for seq in ids)
    return unknown / total if total else 0.0


def run(
    cfg: TokenizerConfig,
    model_cfg: ModelConfig,
    validated_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    init_dir: Path | None = None,
) -> dict[str, Any]:
    """Train a tokenizer, or take the one of the `model.init_from` checkpoint (its weights
    only understand its own vocabulary)."""
    if init_dir is None:
        tokenizer = build(cfg, model_cfg, _texts(validated_dir, cfg.sample_docs))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(init_dir))
        tokenizer.model_max_length = model_cfg.max_length
    val_texts = pd.read_parquet(validated_dir / "val.parquet")["text"].tolist()
    encoded = tokenizer.backend_tokenizer.encode_batch(val_texts, add_special_tokens=False)
    lengths = [len(e.ids) for e in encoded]
    metrics = {
        "vocab_size": len(tokenizer),
        "val_unknown_token_rate": round(unknown_rate(tokenizer, val_texts), 6),
        "val_tokens_per_text_median": float(pd.Series(lengths).median()),
        "val_share_truncated": round(
            sum(n + 2 > model_cfg.max_length for n in lengths) / max(len(lengths), 1), 4
        ),
    }
    with atomic_dir(out_dir) as scratch:
        tokenizer.save_pretrained(str(scratch))
    write_json(metrics_path, metrics)
    log.info(
        "tokenizer: %s; wrote %s: %s",
        f"taken from {init_dir}" if init_dir else f"trained {cfg.kind} on {validated_dir}",
        out_dir,
        metrics,
    )
    return metrics
