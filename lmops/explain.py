"""Why the model said it: leave-one-token-out occlusion over any scorer of token ids.

A token's weight is how much the predicted label's probability falls when that token alone
is left out (negative: the label gains without it). All the texts with one token left out
go through the scorer in one batch, so on the served ONNX engine an explanation costs one
session run of n+1 rows, the same on CPU and GPU, with nothing but the engine itself.
Evaluation calls it with the same engine: what it reports is what the server answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Scorer = Callable[[list[list[int]]], np.ndarray]


@dataclass(frozen=True)
class Explanation:
    label: int
    score: float
    # Per explained token: its position in the ids, and its weight.
    positions: list[int]
    weights: np.ndarray


def occlusion(ids: Sequence[int], special: set[int], score: Scorer) -> Explanation:
    """Weights of every token of `ids` but the special ones ([CLS], [SEP])."""
    ids = list(ids)
    positions = [i for i, token in enumerate(ids) if token not in special]
    variants = [ids, *(ids[:i] + ids[i + 1 :] for i in positions)]
    probs = score(variants)
    label = int(probs[0].argmax())
    return Explanation(
        label=label,
        score=float(probs[0, label]),
        positions=positions,
        weights=probs[0, label] - probs[1:, label],
    )


def deletion_drop(ids: Sequence[int], positions: Sequence[int], label: int, score: Scorer) -> float:
    """How far the label's probability falls when the tokens at `positions` are deleted
    together: the deletion test compares the top-weighted tokens with random ones."""
    gone = set(positions)
    kept = [token for i, token in enumerate(ids) if i not in gone]
    probs = score([list(ids), kept])
    return float(probs[0, label] - probs[1, label])
