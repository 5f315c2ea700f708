"""The evaluate stage's error analysis: the test split's most confident mistakes, explained,
and the deletion test that says whether the explanations point at what the model uses.

Both use the server's own method (lmops/explain.py: leave-one-token-out occlusion) on the
fine-tuned model with its calibration, so a mistake reads here as `/v1/explain` shows it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from lmops.artifacts import ExplanationCheck
from lmops.explain import Scorer, deletion_drop, occlusion

# The deletion test deletes this share of a text's tokens (at least one).
DELETED_SHARE = 0.2
RANDOM_DRAWS = 5
BOLD_TOKENS = 3
TEXT_CHARS = 160


def _encode(tokenizer: Any, text: str, max_length: int) -> tuple[list[int], list[tuple]]:
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    return encoded["input_ids"], encoded["offset_mapping"]


def deletion_check(
    texts: list[str],
    tokenizer: Any,
    max_length: int,
    score: Scorer,
    seed: int,
) -> ExplanationCheck:
    """Deleting the top-weighted tokens must lower the label's probability more than
    deleting as many random ones (mean of RANDOM_DRAWS draws), over `texts`."""
    rng = np.random.default_rng(seed)
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id}
    top, random = [], []
    for text in texts:
        ids, _ = _encode(tokenizer, text, max_length)
        found = occlusion(ids, special, score)
        if len(found.positions) < 2:
            continue
        k = max(1, round(DELETED_SHARE * len(found.positions)))
        heaviest = [found.positions[i] for i in np.argsort(-found.weights)[:k]]
        top.append(deletion_drop(ids, heaviest, found.label, score))
        random.append(
            np.mean(
                [
                    deletion_drop(
                        ids, list(rng.choice(found.positions, k, replace=False)), found.label, score
                    )
                    for _ in range(RANDOM_DRAWS)
                ]
            )
        )
    return ExplanationCheck(
        texts=len(top),
        deleted_share=DELETED_SHARE,
        top_tokens_drop=round(float(np.mean(top)), 5) if top else 0.0,
        random_tokens_drop=round(float(np.mean(random)), 5) if random else 0.0,
        top_drop_larger_share=round(float(np.mean(np.array(top) > np.array(random))), 4)
        if top
        else 0.0,
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def mistakes_markdown(
    texts: list[str],
    targets: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    tokenizer: Any,
    max_length: int,
    score: Scorer,
    count: int,
) -> str:
    """reports/errors.md: the `count` wrong answers with the highest scores, each text's
    strongest tokens for the wrong label in bold, and the tokens that pushed the wrong way
    most often across them."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != targets)
    ranked = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:count]
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id}
    rows, pushes = [], defaultdict(list)
    for rank, index in enumerate(ranked, 1):
        text = texts[index]
        ids, offsets = _encode(tokenizer, text, max_length)
        found = occlusion(ids, special, score)
        order = np.argsort(-found.weights)
        strongest = {found.positions[i] for i in order[:BOLD_TOKENS] if found.weights[i] > 0}
        for i in order[:BOLD_TOKENS]:
            start, end = offsets[found.positions[i]]
            if found.weights[i] > 0 and end > start:
                pushes[text[start:end]].append(float(found.weights[i]))
        shown, at = [], 0
        for position in sorted(strongest):
            start, end = offsets[position]
            if start < at or start >= TEXT_CHARS:
                continue
            shown += [_cell(text[at:start]), f"**{_cell(text[start:end])}**"]
            at = end
        shown.append(_cell(text[at:TEXT_CHARS]) + ("…" if len(text) > TEXT_CHARS else ""))
        rows.append(
            f"| {rank} | {labels[targets[index]]} | {labels[predicted[index]]} "
            f"({probs[index, predicted[index]]:.3f}) | {''.join(shown)} |"
        )
    often = sorted(pushes.items(), key=lambda item: (-len(item[1]), -np.mean(item[1])))[:15]
    lines = [
        "# Most confident mistakes (test split)",
        "",
        f"The {len(ranked)} test texts the model got wrong with the highest calibrated score "
        f"(of {len(wrong):,} mistakes in {len(texts):,} texts). In **bold**, up to "
        f"{BOLD_TOKENS} tokens per text that pushed most toward the wrong label: leaving one "
        "out lowers that label's probability the most (occlusion, as `POST /v1/explain`).",
        "",
        "| # | true | predicted (score) | text |",
        "|---:|---|---|---|",
        *rows,
        "",
        "## Tokens that pushed toward the wrong label most often",
        "",
        "| token | mistakes | mean weight |",
        "|---|---:|---:|",
        *(f"| {_cell(token)} | {len(w)} | {np.mean(w):.3f} |" for token, w in often),
    ]
    return "\n".join(lines) + "\n"


def calibrated_scorer(model: Any, pad_id: int, temperature: float) -> Scorer:
    """Probabilities of token-id sequences as the server gives them (with the temperature)."""
    from lmops.batching import proba_of_ids
    from lmops.calibration import apply_temperature

    return lambda ids: apply_temperature(proba_of_ids(model, ids, pad_id), temperature)
