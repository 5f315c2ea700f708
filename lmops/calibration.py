"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one
scalar T > 0, fitted on the validation split by log-loss, divides the served logits so
that a score of 0.8 is right about 80% of the time. Dividing by T never changes a label.

Probabilities are turned back into logits as their logs (equal up to a per-text constant,
which softmax ignores), so this works on whatever the graph serves: the transformer alone
or its mix with the n-gram channel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmops.ngrams import log_loss, softmax


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.log(np.clip(probs, 1e-12, 1.0)) / temperature)


def fit_temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the log-loss of `probs` on `targets`."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(
        lambda log_t: log_loss(apply_temperature(probs, float(np.exp(log_t))), targets),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(found.x))


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, bins: int) -> float:
    confidence, predicted = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = (predicted[inside] == targets[inside]).mean() - confidence[inside].mean()
            error += inside.mean() * abs(gap)
    return float(error)


def reliability_rows(
    targets: np.ndarray, probs: np.ndarray, bins: int, which: str
) -> list[dict[str, Any]]:
    """The reliability diagram's points: per confidence bin, mean confidence and accuracy."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            rows.append(
                {
                    "scores": which,
                    "confidence": round(float(confidence[inside].mean()), 5),
                    "accuracy": round(float((predicted[inside] == targets[inside]).mean()), 5),
                    "texts": int(inside.sum()),
                }
            )
    return rows
