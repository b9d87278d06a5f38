"""Calibrated confidence: one temperature fitted after training, and the numbers that check it.

A network's softmax output is not a probability you can take at its word. Label smoothing (which the
default recipes use because it adds accuracy) makes a model underconfident: a perfect digit comes out at
~94%, and so does a wrong one. Temperature scaling (Guo et al., "On Calibration of Modern Neural
Networks", 2017) fixes that with one number T: probabilities = softmax(logits / T), with T chosen to
minimise the negative log-likelihood on held-out data (the validation split, never the test set). Dividing
every logit by the same T keeps their order, so the predicted digit and the accuracy do not change.

The check is the expected calibration error (ECE): sort the answers into 15 equal-width bins by their
confidence, and average |accuracy - mean confidence| over the bins, weighted by how many answers each holds.
ECE 0.01 means that the confidence shown is, on average, within one point of how often such answers are right.
Only numpy here (no torch), so that the ONNX Runtime path can use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # far beyond anything a trained digit model needs


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits (N, classes) / temperature, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tolerance: float = 1e-4) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T): a golden-section search over log T.

    The NLL is convex in 1/T, so it has one minimum along log T and the search finds it without gradients,
    learning rates or an optimizer. Returns 1.0 for an empty set.
    """
    logits, labels = np.asarray(logits), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    low, high = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    while high - low > tolerance:
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(logits, labels, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(logits, labels, math.exp(b))
    return float(math.exp((low + high) / 2))


@dataclass
class ReliabilityBin:
    low: float
    high: float
    count: int
    confidence: float  # mean confidence of the answers in the bin (0 when empty)
    accuracy: float  # share of them that are right (0 when empty)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """The answers grouped by confidence into `bins` equal-width bins over [0, 1]."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == labels
    # Bin k holds confidences in (k/bins, (k+1)/bins]; a confidence of exactly 0 cannot occur.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        members = index == k
        count = int(members.sum())
        out.append(
            ReliabilityBin(
                k / bins,
                (k + 1) / bins,
                count,
                float(confidence[members].mean()) if count else 0.0,
                float(right[members].mean()) if count else 0.0,
            )
        )
    return out


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean of |accuracy - confidence| over equal-width confidence bins (a fraction)."""
    table = reliability(probabilities, labels, bins)
    total = sum(b.count for b in table)
    if total == 0:
        return 0.0
    return float(sum(b.count * abs(b.accuracy - b.confidence) for b in table) / total)


def selective_accuracy(
    probabilities: np.ndarray, labels: np.ndarray, thresholds: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99)
) -> list[dict[str, float]]:
    """What `--reject-below T` buys, for each T: the share of answers kept (confidence >= T) and the
    accuracy on them."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == labels
    rows = []
    for t in thresholds:
        kept = confidence >= t
        rows.append(
            {
                "threshold": float(t),
                "kept": float(kept.mean()) if len(kept) else 0.0,
                "accuracy": float(right[kept].mean()) if kept.any() else 1.0,
            }
        )
    return rows
