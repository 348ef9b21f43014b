"""Regression detection on raw samples: significant AND big enough; noise alone never flags."""

from __future__ import annotations

import numpy as np

from pipeline.regression import RegressionPolicy, compare

POLICY = RegressionPolicy()


def _runs(rng, centre, n_runs=3, n=200, noise=0.03):
    return [list(rng.normal(centre, centre * noise, n)) for _ in range(n_runs)]


def test_same_distribution_is_not_a_regression():
    rng = np.random.default_rng(1)
    history = _runs(rng, 10.0)
    verdict = compare(list(rng.normal(10.0, 0.3, 200)), 0.99, history, [0.99] * 3, POLICY)
    assert not verdict.regressed and verdict.compared_runs == 3


def test_ten_percent_slower_is_flagged():
    rng = np.random.default_rng(2)
    verdict = compare(list(rng.normal(11.0, 0.3, 200)), 0.99, _runs(rng, 10.0), [0.99] * 3, POLICY)
    assert verdict.latency_regression and 0.08 < verdict.latency_shift < 0.12
    assert verdict.latency_p_value < 1e-6 and "latency +" in verdict.reasons[0]


def test_significant_but_tiny_shift_is_not_flagged():
    """2 % slower with thousands of samples is significant, and still below the 5 % threshold."""
    rng = np.random.default_rng(3)
    verdict = compare(list(rng.normal(10.2, 0.1, 3000)), None, _runs(rng, 10.0, n=3000, noise=0.01), [], POLICY)
    assert verdict.latency_p_value < 0.01 and not verdict.latency_regression


def test_same_medians_different_tail_is_judged_on_samples():
    """Two medians could hide it: half the iterations got 30 % slower."""
    rng = np.random.default_rng(4)
    old = _runs(rng, 10.0, noise=0.01)
    new = list(rng.normal(10.0, 0.1, 100)) + list(rng.normal(13.0, 0.1, 100))
    assert compare(new, None, old, [], POLICY).latency_regression


def test_faster_is_never_a_regression():
    rng = np.random.default_rng(5)
    assert not compare(list(rng.normal(7.0, 0.2, 200)), None, _runs(rng, 10.0), [], POLICY).regressed


def test_accuracy_drop_beyond_budget():
    verdict = compare([1.0] * 10, 0.95, [[1.0] * 10], [0.99], POLICY)
    assert verdict.accuracy_regression and abs(verdict.accuracy_drop - 0.04) < 1e-9
    assert not compare([1.0] * 10, 0.985, [[1.0] * 10], [0.99], POLICY).accuracy_regression


def test_no_history_no_verdict():
    verdict = compare([1.0] * 50, 0.9, [], [], POLICY)
    assert not verdict.regressed and verdict.compared_runs == 0


def test_a_slowdown_within_ordinary_night_to_night_variation_is_not_flagged():
    """Nights at 10, 12, 9 and 11.5 ms: a 12.5 ms night is slower than the pooled history, and still ordinary."""
    rng = np.random.default_rng(6)
    noisy = [list(rng.normal(c, 0.1, 200)) for c in (10.0, 12.0, 9.0, 11.5)]
    verdict = compare(list(rng.normal(12.5, 0.1, 200)), None, noisy, [], POLICY)
    assert verdict.latency_p_value < 0.01 and verdict.latency_shift > POLICY.threshold
    assert verdict.night_to_night > 0.1 and not verdict.latency_regression
    steady = [list(rng.normal(10.0, 0.1, 200)) for _ in range(4)]
    assert compare(list(rng.normal(12.5, 0.1, 200)), None, steady, [], POLICY).latency_regression
