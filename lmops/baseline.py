"""The classical baseline every model must beat: TF-IDF over character n-grams + logistic
regression, trained on the same train split (the evaluate stage's gate, and the distill
stage's choice on validation)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmops.config import EvaluateConfig


def baseline_proba(
    cfg: EvaluateConfig, train: pd.DataFrame, texts: list[str], labels: list[str]
) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(
        TfidfVectorizer(
            analyzer="char",
            ngram_range=(1, cfg.baseline.ngram_max),
            sublinear_tf=True,
            min_df=cfg.baseline.min_df,
        ),
        LogisticRegression(C=cfg.baseline.C, max_iter=2000),
    )
    pipeline.fit(train["text"], train["label"])
    order = [list(pipeline.classes_).index(name) for name in labels]
    return pipeline.predict_proba(texts)[:, order]
