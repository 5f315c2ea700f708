"""Batches of variable-length texts for classification: encode once, group by length so
little padding is computed, pad each batch to its longest member."""

from __future__ import annotations

import random
from typing import Any


def encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def length_bucketed(lengths: list[int], batch_size: int, seed: int | None) -> list[list[int]]:
    """Index batches of similar lengths; shuffled within and across pools when seeded."""
    order = list(range(len(lengths)))
    if seed is None:
        return [
            sorted(order, key=lengths.__getitem__)[i : i + batch_size]
            for i in range(0, len(order), batch_size)
        ]
    rng = random.Random(seed)
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(ids: list[list[int]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(seq) for seq in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


def predict_proba(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
    transformer_only: bool = False,
) -> Any:
    """A classifier's (lmops/classifier.py) class probabilities, in the order of `texts`;
    `transformer_only` leaves out an n-gram channel."""
    ids = encode(tokenizer, texts, max_length)
    return proba_of_ids(model, ids, tokenizer.pad_token_id, batch_size, transformer_only)


def proba_of_ids(
    model: Any,
    ids: list[list[int]],
    pad_id: int,
    batch_size: int = 64,
    transformer_only: bool = False,
) -> Any:
    """Class probabilities of token-id sequences, in their order (the explanations score
    texts with tokens left out this way)."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    probs = np.zeros((len(ids), len(model.spec.labels)), dtype=np.float32)
    forward = model.transformer_logits if transformer_only else model
    model.eval()
    with torch.no_grad():
        for batch in length_bucketed([len(s) for s in ids], batch_size, seed=None):
            inputs = collate([ids[i] for i in batch], pad_id)
            logits = forward(**{k: v.to(device) for k, v in inputs.items()})[0]
            probs[batch] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return probs
