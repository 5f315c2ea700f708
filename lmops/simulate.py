"""Simulated traffic for the drift monitor: real texts sent to a running server.

`in-domain`: reviews from the held-out test split (what the model was tested on).
`shifted`: sentences of the run's pretraining corpus (movie plots for the English default,
People's Daily news for the zh profile) of review-like length, so what drifts is the content
and style, not just the length.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmops.errors import DataError, LmopsError

SCENARIOS = ("in-domain", "shifted")
# Reviews run from ~10 to ~190 characters (p5-p95); news sentences are kept in that range.
SENTENCE_CHARS = (10, 200)
# After Chinese full stops at once; after Latin ones where a space follows ("3.5" stays).
_SENTENCE_END = re.compile(r"(?<=[。！？；])|(?<=[.!?;])\s+")


def in_domain_texts(validated_dir: Path, n: int, seed: int) -> list[str]:
    """`n` reviews of the test split, in a seeded random order (repeating past its size)."""
    import pandas as pd

    path = validated_dir / "test.parquet"
    if not path.is_file():
        raise DataError(f"no test split at {path} (run the pipeline first)")
    texts = pd.read_parquet(path, columns=["text"])["text"]
    return _draw(texts.tolist(), n, seed)


def corpus_sentences(corpus: str, n: int, seed: int, root: Path = Path(".")) -> list[str]:
    """`n` sentences of review-like length from the corpus `corpus` names (a builtin or a
    file, as data.corpus takes it), in a seeded order."""
    from lmops.sources import read_corpus

    low, high = SENTENCE_CHARS
    sentences = [
        sentence.strip()
        for doc in read_corpus(corpus, root).frame["text"]
        for sentence in _SENTENCE_END.split(doc)
        if low <= len(sentence.strip()) <= high
    ]
    if not sentences:
        raise DataError(f"{corpus} has no sentence of {low}-{high} characters to send")
    return _draw(sentences, n, seed)


def _draw(texts: list[str], n: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n:
        order.extend(rng.permutation(len(texts)).tolist())
    return [texts[i] for i in order[:n]]


def scenario_texts(scenario: str, n: int, seed: int, root: Path, validated_dir: Path) -> list[str]:
    if scenario == "in-domain":
        return in_domain_texts(validated_dir, n, seed)
    if scenario == "shifted":
        from lmops.artifacts import DataManifest

        return corpus_sentences(DataManifest.of(validated_dir).corpus.spec, n, seed, root)
    raise LmopsError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")


def send(url: str, texts: list[str], batch_size: int) -> int:
    """POST the texts to `{url}/v1/predict` in batches; returns how many were answered."""
    import httpx

    from lmops.client import api_headers

    answered = 0
    with httpx.Client(base_url=url, headers=api_headers(), timeout=60) as client:
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            try:
                response = client.post("/v1/predict", json={"texts": batch})
            except httpx.TransportError as err:
                raise LmopsError(
                    f"cannot reach the server at {url} ({type(err).__name__}: {err}); "
                    "start it with `lmops serve`"
                ) from None
            if response.status_code != 200:
                try:
                    reason = response.json().get("error", response.text)
                except ValueError:
                    reason = response.text
                raise LmopsError(
                    f"{url}/v1/predict answered {response.status_code} after {answered:,} "
                    f"texts: {reason}"
                )
            answered += len(response.json()["predictions"])
    return answered
