"""Temperature scaling and the calibration numbers, checked against hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from digitlab import calibration


def overconfident(n: int = 4000, seed: int = 0, sharpness: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true temperature is `sharpness`: labels are drawn from softmax(logits / sharpness)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, 10)) * sharpness
    p = calibration.softmax(logits, sharpness)
    labels = np.array([rng.choice(10, p=row) for row in p])
    return logits, labels


def test_the_fitted_temperature_recovers_the_one_that_made_the_labels():
    logits, labels = overconfident(sharpness=4.0)
    t = calibration.fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.1)
    assert calibration.nll(logits, labels, t) < calibration.nll(logits, labels, 1.0)


def test_temperature_lowers_the_calibration_error_and_keeps_the_answers():
    logits, labels = overconfident(sharpness=3.0)
    t = calibration.fit_temperature(logits, labels)
    raw, scaled = calibration.softmax(logits), calibration.softmax(logits, t)
    assert (raw.argmax(1) == scaled.argmax(1)).all()
    assert calibration.expected_calibration_error(scaled, labels) < 0.03
    assert calibration.expected_calibration_error(raw, labels) > 0.1


def test_ece_by_hand():
    # Two answers at 0.95 (one right), two at 0.55 (both right): bins 15 and 9 of 15.
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    expected = (2 * abs(0.5 - 0.95) + 2 * abs(1.0 - 0.55)) / 4
    assert calibration.expected_calibration_error(p, labels) == pytest.approx(expected)
    table = calibration.reliability(p, labels)
    assert len(table) == 15 and sum(b.count for b in table) == 4
    assert [b.count for b in table if b.count] == [2, 2]


def test_a_perfectly_calibrated_set_has_an_ece_near_zero():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1.0, 20000)
    right = rng.uniform(size=20000) < confidence
    p = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.where(right, 0, 1)
    assert calibration.expected_calibration_error(p, labels) < 0.01


def test_selective_accuracy_counts_what_a_threshold_keeps():
    p = np.array([[0.99, 0.01], [0.6, 0.4], [0.7, 0.3], [0.95, 0.05]])
    labels = np.array([0, 1, 0, 0])
    rows = {r["threshold"]: r for r in calibration.selective_accuracy(p, labels, thresholds=(0.5, 0.9))}
    assert rows[0.5]["kept"] == 1.0 and rows[0.5]["accuracy"] == 0.75
    assert rows[0.9]["kept"] == 0.5 and rows[0.9]["accuracy"] == 1.0


def test_an_empty_set_gives_a_neutral_temperature():
    assert calibration.fit_temperature(np.zeros((0, 10)), np.zeros(0, dtype=np.int64)) == 1.0
