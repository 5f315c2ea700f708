"""The run summary's paragraph for a run that ends with no model in prod: the data's known
ceiling where lmops knows it (the Chinese reviews), what to try elsewhere."""

from __future__ import annotations

import pytest

from lmops.cli import _why_not_prod

pytestmark = pytest.mark.code


def test_the_chinese_reviews_point_at_their_label_noise() -> None:
    paragraph = _why_not_prod("builtin:zh-reviews")
    assert "never relaxed" in paragraph
    assert "On builtin:zh-reviews this is the expected verdict" in paragraph
    assert "reports/bench/recipes-zh.json" in paragraph and "labels' noise" in paragraph


def test_other_data_gets_what_to_try() -> None:
    for spec in ("data/mine.csv", "builtin:en-movie-reviews"):
        paragraph = _why_not_prod(spec)
        assert "noise" not in paragraph
        assert "model.init_from" in paragraph and "bench/recipes.py" in paragraph


def test_the_labels_stage_figures_join_the_paragraph() -> None:
    from lmops.artifacts import LabelIssuesOnTest

    found = LabelIssuesOnTest(
        policy="report",
        test_flagged=212,
        accuracy_all=0.841,
        accuracy_unflagged=0.9012,
        baseline_accuracy_all=0.8422,
        baseline_accuracy_unflagged=0.9034,
        dropped_train_rows=0,
    )
    paragraph = _why_not_prod("builtin:zh-reviews", found)
    assert "flags 212 test rows as likely mislabelled" in paragraph
    assert "the model scores 0.9012 and the baseline 0.9034 (lmops labels)" in paragraph
    assert "mislabelled" not in _why_not_prod("builtin:zh-reviews")
