"""Occlusion against a scorer whose answer is known by hand: a token's weight is the fall in
the label's probability without it, special tokens are never weighed, and the deletion drop
is the fall with several tokens gone at once."""

from __future__ import annotations

import numpy as np
import pytest

from lmops.explain import deletion_drop, occlusion

CLS, SEP, GOOD = 101, 102, 7


def share_of_good(batch: list[list[int]]) -> np.ndarray:
    """P(positive) = the share of GOOD among a sequence's non-special tokens."""
    rows = []
    for ids in batch:
        words = [t for t in ids if t not in (CLS, SEP)]
        p = sum(t == GOOD for t in words) / max(1, len(words))
        rows.append([1 - p, p])
    return np.array(rows)


def test_each_weight_is_the_fall_without_that_token() -> None:
    ids = [CLS, GOOD, GOOD, GOOD, 3, SEP]  # P(positive) = 3/4
    found = occlusion(ids, {CLS, SEP}, share_of_good)
    assert found.label == 1 and found.score == pytest.approx(0.75)
    assert found.positions == [1, 2, 3, 4]  # [CLS] and [SEP] are not weighed
    # Without a GOOD: 2/3 (weight 0.75 - 2/3); without the 3: 3/3 (weight -0.25).
    assert found.weights == pytest.approx([0.75 - 2 / 3] * 3 + [-0.25])


def test_deletion_drop_removes_the_tokens_together() -> None:
    ids = [CLS, GOOD, GOOD, 3, 4, SEP]  # P(positive) = 1/2
    assert deletion_drop(ids, [1, 2], 1, share_of_good) == pytest.approx(0.5)  # to 0/2
    assert deletion_drop(ids, [3, 4], 1, share_of_good) == pytest.approx(-0.5)  # to 2/2
