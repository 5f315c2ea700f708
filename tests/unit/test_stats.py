"""The paired statistics behind the baseline and champion–challenger gates, on cases whose
answers are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmops.stats import compare, macro_f1, mcnemar_p_value, paired_bootstrap


def _pair(only_a: int, only_b: int, both: int, neither: int = 0):
    """Targets and two prediction vectors with the given counts of who is right."""
    n = only_a + only_b + both + neither
    targets = np.ones(n, dtype=int)
    a = np.r_[np.ones(only_a), np.zeros(only_b), np.ones(both), np.zeros(neither)].astype(int)
    b = np.r_[np.zeros(only_a), np.ones(only_b), np.ones(both), np.zeros(neither)].astype(int)
    return targets, a, b


def test_mcnemar_exact_p_value_by_hand() -> None:
    # 8 texts only A gets right, 2 only B: p = 2 * P(X <= 2 | n=10, 1/2) = 2 * 56 / 1024.
    targets, a, b = _pair(only_a=8, only_b=2, both=90)
    assert mcnemar_p_value(a == targets, b == targets) == pytest.approx(112 / 1024)
    same = _pair(only_a=0, only_b=0, both=50)
    assert mcnemar_p_value(same[1] == same[0], same[2] == same[0]) == 1.0


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    # 100 texts only A right, 50 only B, 850 both: d = 0.05, per-text variance
    # E[delta^2] - d^2 = 0.15 - 0.0025, standard error sqrt(0.1475 / 1000) = 0.01214.
    targets, a, b = _pair(only_a=100, only_b=50, both=850)
    difference, low, high = paired_bootstrap(targets, a, b, "accuracy", 0.95, 20_000)
    se = math.sqrt(0.1475 / 1000)
    assert difference == pytest.approx(0.05)
    assert low == pytest.approx(0.05 - 1.96 * se, abs=0.003)
    assert high == pytest.approx(0.05 + 1.96 * se, abs=0.003)


def test_rules_decide_on_the_interval_not_the_point_estimate() -> None:
    # +1 point that is noise: 30 vs 20 discordant texts of 1,000.
    targets, a, b = _pair(only_a=30, only_b=20, both=950)
    superiority = compare(targets, a, b, "accuracy", "superiority", 0.0, 0.95, 5000)
    assert superiority["difference"] == pytest.approx(0.01)
    assert superiority["ci_low"] < 0 < superiority["ci_high"]
    assert not superiority["passed"]
    assert "may be noise" in superiority["reading"]
    non_inferior = compare(targets, a, b, "accuracy", "non_inferiority", 0.01, 0.95, 5000)
    assert non_inferior["passed"] and non_inferior["margin"] == 0.01
    # A clear 5-point gain passes superiority too.
    targets, a, b = _pair(only_a=100, only_b=50, both=850)
    assert compare(targets, a, b, "accuracy", "superiority", 0.0, 0.95, 5000)["passed"]
    # And a clear loss fails non-inferiority within 1 point.
    assert not compare(targets, b, a, "accuracy", "non_inferiority", 0.01, 0.95, 5000)["passed"]


def test_macro_f1_by_hand_and_its_paired_interval() -> None:
    targets = np.array([0, 0, 1, 1])
    predicted = np.array([0, 1, 1, 1])
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 2, fp 1 -> 4/5.
    assert macro_f1(targets, predicted) == pytest.approx((2 / 3 + 4 / 5) / 2)
    difference, low, high = paired_bootstrap(targets, targets, targets, "macro_f1", 0.9, 200)
    assert difference == low == high == 0.0


def test_cbpe_interval_covers_the_realized_accuracy_of_calibrated_predictions() -> None:
    """Calibrated predictions (right with probability = their confidence): the realized
    accuracy of a window falls inside the 95% interval about 95% of the time."""
    from lmops.stats import estimated_accuracy

    rng = np.random.default_rng(0)
    inside, errors = 0, []
    for _ in range(400):
        confidence = rng.uniform(0.5, 1.0, size=300)
        realized = float((rng.random(300) < confidence).mean())
        estimate, low, high = estimated_accuracy(confidence, 300, 0.95)
        inside += low <= realized <= high
        errors.append(abs(estimate - realized))
    assert 0.92 <= inside / 400 <= 0.98
    assert np.mean(errors) < 0.02  # within 2 points on average at 300 texts


def test_cbpe_interval_widens_when_the_window_is_sampled() -> None:
    from lmops.stats import estimated_accuracy

    confidence = np.random.default_rng(1).uniform(0.5, 1.0, size=500)
    whole = estimated_accuracy(confidence, 500, 0.95)
    sampled = estimated_accuracy(confidence, 50_000, 0.95)
    assert whole[0] == sampled[0]
    assert sampled[2] - sampled[1] > whole[2] - whole[1]
