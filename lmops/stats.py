"""Paired comparisons of two classifiers on the same texts, for the gates.

Two models scored on the same 1.7k test texts differ by about ±1.5 points at 95% through
sampling alone, so a raw difference cannot tell an improvement from noise. Each gate
instead takes a paired bootstrap confidence interval of the difference (resampling texts,
both models' predictions together) and decides by a rule named in params:

- superiority: the interval's lower end is above 0 (the challenger is better);
- non_inferiority: the lower end is above -margin (it is at most `margin` worse).

McNemar's exact test (on the texts where exactly one model is right) gives the p-value
reported beside the interval for accuracy.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Rule = Literal["superiority", "non_inferiority"]


def accuracy(targets: np.ndarray, predicted: np.ndarray) -> float:
    return float((targets == predicted).mean())


def macro_f1(targets: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-F1 over the classes present in targets or predictions (scikit-learn's)."""
    classes = np.union1d(targets, predicted)
    scores = []
    for c in classes:
        tp = np.sum((predicted == c) & (targets == c))
        fp = np.sum((predicted == c) & (targets != c))
        fn = np.sum((predicted != c) & (targets == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1}


def mcnemar_p_value(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar test: under H0 each discordant text is a fair coin."""
    from scipy.stats import binomtest

    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_bootstrap(
    targets: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    metric: str,
    confidence: float,
    samples: int,
    seed: int = 0,
) -> tuple[float, float, float]:
    """metric(a) - metric(b) and its percentile bootstrap interval, resampling texts."""
    score = METRICS[metric]
    observed = score(targets, predicted_a) - score(targets, predicted_b)
    rng = np.random.default_rng(seed)
    n = len(targets)
    if metric == "accuracy":  # vectorised: the difference of means of per-text correctness
        delta = (predicted_a == targets).astype(np.int8) - (predicted_b == targets)
        diffs = np.empty(samples)
        for start in range(0, samples, 1000):
            rows = rng.integers(0, n, size=(min(1000, samples - start), n))
            diffs[start : start + len(rows)] = delta[rows].mean(axis=1)
    else:
        diffs = np.empty(samples)
        for i in range(samples):
            rows = rng.integers(0, n, size=n)
            diffs[i] = score(targets[rows], predicted_a[rows]) - score(
                targets[rows], predicted_b[rows]
            )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return observed, float(low), float(high)


def reading(low: float, high: float) -> str:
    """What the interval says, in words a model card can carry."""
    if low > 0:
        return "better (the interval excludes no difference)"
    if high < 0:
        return "worse (the interval excludes no difference)"
    return "no significant difference (the interval includes 0): any gap may be noise"


def compare(
    targets: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    metric: str,
    rule: Rule,
    margin: float,
    confidence: float,
    samples: int,
) -> dict[str, Any]:
    """Model a against model b on one metric, decided by `rule`; everything a record needs."""
    difference, low, high = paired_bootstrap(
        targets, predicted_a, predicted_b, metric, confidence, samples
    )
    bound = 0.0 if rule == "superiority" else -margin
    result = {
        "metric": metric,
        "difference": round(difference, 5),
        "ci_low": round(low, 5),
        "ci_high": round(high, 5),
        "confidence": confidence,
        "bootstrap_samples": samples,
        "rule": rule,
        "margin": margin if rule == "non_inferiority" else 0.0,
        "passed": bool(low > bound),
        "reading": reading(low, high),
    }
    if metric == "accuracy":
        result["p_value_mcnemar"] = round(
            mcnemar_p_value(predicted_a == targets, predicted_b == targets), 6
        )
    return result


def estimated_accuracy(
    confidence: np.ndarray, window_rows: int, level: float
) -> tuple[float, float, float]:
    """CBPE (confidence-based performance estimation, as NannyML names it): with calibrated
    scores, a prediction made with confidence c is right with probability c, so the mean
    confidence is the accuracy the predictions are expected to have. Returns (estimate,
    low, high): the interval counts the luck of which predictions turn out right (a sum of
    Bernoulli(c), variance sum c(1-c)) and, when `confidence` is a sample of a window of
    `window_rows`, the sampling (finite-population corrected). It assumes calibration
    holds on the window: under concept shift (the same texts meaning another label) no
    label-free estimate can see the drop."""
    from scipy.stats import norm

    n = len(confidence)
    estimate = float(confidence.mean())
    outcome_variance = float((confidence * (1 - confidence)).sum()) / n**2
    unsampled = max(window_rows - n, 0) / max(window_rows - 1, 1)
    sampling_variance = float(confidence.var(ddof=1)) / n * unsampled if n > 1 else 0.0
    half = float(norm.ppf(0.5 + level / 2)) * (outcome_variance + sampling_variance) ** 0.5
    return estimate, max(estimate - half, 0.0), min(estimate + half, 1.0)


def paired_mean_interval(differences: np.ndarray, level: float) -> tuple[float, float, float]:
    """The mean of per-text differences and its normal-approximation interval (the
    sampling of texts; the live gates' paired comparison of two models' confidences)."""
    from scipy.stats import norm

    n = len(differences)
    mean = float(differences.mean())
    if n < 2:
        return mean, float("-inf"), float("inf")
    half = float(norm.ppf(0.5 + level / 2)) * float(differences.std(ddof=1)) / n**0.5
    return mean, mean - half, mean + half
